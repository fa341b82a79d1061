"""The Dramatiq actors: thin adapters over `billing/jobs/`, one per periodic job.

Each is idempotent and safe to run twice or concurrently because its service function is (a row lock or a
status re-checked under one), so Dramatiq's at-least-once delivery — a retry, a message redelivered after a
worker died, two schedulers — can never move money twice. Each has a time limit and a retry budget with
exponential backoff; a message that exhausts it lands in the queue's dead-letter set (`billing dead-letters`).

Importing this module declares the actors on the broker from the environment (`workers.broker`).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import dramatiq
import stripe
from redis.asyncio import Redis

from billing import clock
from billing.context import Context
from billing.db.engine import make_engine
from billing.db.journal import Journal
from billing.jobs import byok, expiry, holds
from billing.jobs import verify as verification
from billing.ledger.money import format_money
from billing.purchases import auto_topup as topups
from billing.reconcile import service as reconciler
from billing.settings import Settings
from billing.stripe_client import make_stripe
from workers.broker import QUEUE, setup_broker

log = logging.getLogger(__name__)

broker = setup_broker()

SECOND = 1000  # Dramatiq's options are in milliseconds
MINUTE = 60 * SECOND


class _Process:
    """What the actors of one worker process share, made on first use inside its event loop."""

    context: Context | None = None
    redis: Redis | None = None
    stripe: stripe.StripeClient | None = None


def context() -> Context:
    if _Process.context is None:
        settings = Settings.from_env()
        # One connection per worker thread is all the actors can use at once.
        settings = replace(settings, db_pool_size=settings.worker_threads, db_max_overflow=0)
        _Process.context = Context(db=make_engine(settings), journal=Journal(), settings=settings)
    return _Process.context


def redis() -> Redis:
    if _Process.redis is None:
        _Process.redis = Redis.from_url(context().settings.redis_url or "", socket_timeout=5)
    return _Process.redis


@dramatiq.actor(queue_name=QUEUE, time_limit=1 * MINUTE, max_retries=5, min_backoff=1 * SECOND, max_backoff=MINUTE)
async def expire_holds() -> None:
    """Mark open holds past their expiry (and the grace) `expired`; a status change only."""
    ctx = context()
    count = await holds.expire_holds(ctx, now=clock.now(), grace=timedelta(seconds=ctx.settings.hold_expiry_grace))
    log.info("expire_holds: %d hold(s) marked expired", count)


@dramatiq.actor(
    queue_name=QUEUE, time_limit=10 * MINUTE, max_retries=5, min_backoff=10 * SECOND, max_backoff=10 * MINUTE
)
async def expire_credits() -> None:
    """Post breakage for every lot past its expiry with credits left, one entry per account."""
    run = await expiry.expire_credits(context(), now=clock.now())
    log.info(
        "expire_credits: %s USD of %d lot(s) on %d account(s) to breakage",
        format_money(run.total),
        run.lots,
        len(run.accounts),
    )


@dramatiq.actor(queue_name=QUEUE, time_limit=15 * MINUTE, max_retries=3, min_backoff=MINUTE, max_backoff=10 * MINUTE)
async def verify_ledger() -> None:
    """Check every ledger invariant; problems are logged at ERROR and published, never fixed here.
    A broken invariant is a finding, not a failure: the job succeeds and the metric says `ok 0`."""
    ctx = context()
    result = await verification.verify(ctx)
    await redis().set(
        f"{ctx.settings.queue_namespace}:{verification.LAST_RESULT_KEY}", verification.result_json(result)
    )
    log.info("verify_ledger: %s", "ok" if result.ok else f"{len(result.problems)} invariant(s) broken")


def stripe_client() -> stripe.StripeClient | None:
    if _Process.stripe is None:
        _Process.stripe = make_stripe(context().settings)
    return _Process.stripe


@dramatiq.actor(
    queue_name=QUEUE, time_limit=10 * MINUTE, max_retries=3, min_backoff=30 * SECOND, max_backoff=10 * MINUTE
)
async def reconcile_payments() -> None:
    """Credit Stripe's succeeded payments of the window that the ledger is missing (lost webhooks), through
    `fulfil_payment`, once; report credits Stripe does not show as paid. Stripe unreachable: retried."""
    sdk = stripe_client()
    if sdk is None:
        log.warning("reconcile_payments: Stripe is not configured (STRIPE_API_KEY); nothing to reconcile")
        return
    run = await reconciler.reconcile_payments(context(), sdk)
    log.log(
        logging.WARNING if run.needs_review or run.unpaid_credits or run.amount_mismatches else logging.INFO,
        "reconcile_payments: %s",
        reconciler.summary(run),
    )


# The previous month is closed this long after it ended (a charge in flight at midnight has committed).
BYOK_CLOSE_AFTER = timedelta(hours=1)


@dramatiq.actor(
    queue_name=QUEUE, time_limit=15 * MINUTE, max_retries=5, min_backoff=10 * SECOND, max_backoff=10 * MINUTE
)
async def reconcile_byok_fees() -> None:
    """Recompute this month's BYOK fees from the recorded requests and post a correction wherever the hot
    path charged them wrong; once the previous month has ended, reconcile and close it (once)."""
    ctx = context()
    now = clock.now()
    month = now.date().replace(day=1)
    previous = (month - timedelta(days=1)).replace(day=1)
    started = datetime.combine(month, datetime.min.time(), UTC)
    last = await byok.reconcile_byok(ctx, previous, close=now - started >= BYOK_CLOSE_AFTER, now=now)
    log.info("reconcile_byok_fees: %s", byok.summary(last))
    run = await byok.reconcile_byok(ctx, month, now=now)
    log.info("reconcile_byok_fees: %s", byok.summary(run))


@dramatiq.actor(queue_name=QUEUE, time_limit=5 * MINUTE, max_retries=0)
async def auto_topup() -> None:
    """Top up accounts below their auto top-up threshold (one off-session payment each, at most one in
    flight); settle earlier attempts. Not retried: the next scheduled run is the retry."""
    sdk = stripe_client()
    if sdk is None:
        log.warning("auto_topup: Stripe is not configured (STRIPE_API_KEY); nothing to do")
        return
    run = await topups.run_auto_topups(context(), sdk)
    log.info("auto_topup: %s", topups.summary(run))


PERIODIC = (expire_holds, expire_credits, verify_ledger, reconcile_payments, reconcile_byok_fees, auto_topup)
