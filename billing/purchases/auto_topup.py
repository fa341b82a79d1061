"""Auto top-up (issue 5 item 6): when a charge takes an account's balance below its threshold, buy its
amount off-session with the saved card, through an ordinary purchase.

The gateway's hot path is not touched: the periodic job `run_auto_topups` (actor `auto_topup`) finds the
accounts below their threshold. For each it first claims an attempt — a `pending` row that the partial
unique index keeps to one per account, inserted under the settings row's lock with the cooldown and the
monthly cap re-checked and the amount priced — and commits it; only the winner of that claim creates the
purchase and its off-session PaymentIntent (confirmed at once, idempotency key per attempt). Credits arrive
the normal way: `payment_intent.succeeded` → `fulfil_payment` (or the reconciler). Each run settles pending
attempts from their purchases' status. A decline (at once as a card error, or later as
`payment_intent.payment_failed` failing the purchase) counts: the next attempt waits
`cooldown_seconds * 2^declines`; the third consecutive decline disables auto top-up and records why. A
success resets the count.

The amount was valid under the pricing in force when it was saved, but a newer pricing version may refuse
it (a higher minimum purchase, a lower maximum): retrying cannot help, so the claim disables that account's
auto top-up and records why, as for declines, and leaves no attempt (a `PUT` with an amount the pricing
allows re-enables it). One account's failure never stops the run for the others: it is logged, counted as
`failed`, and the next account is tried.

A run can die after asking Stripe for the payment and before saving what Stripe answered. Stripe may then
have charged the card, so such an attempt is never given up and tried afresh (that could charge twice):
once it is `STALE_AFTER` old, a later run asks again with the same idempotency key, and Stripe answers
with the same PaymentIntent (or makes it now, if the first request never arrived). Only an attempt that
died before its purchase existed, when no request can have reached Stripe, or one older than Stripe keeps
idempotency keys (`IDEMPOTENCY_WINDOW`), is marked failed; should Stripe have made the latter's payment,
its webhook (or the reconciler) still credits the purchase.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import msgspec
import stripe
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from billing import clock
from billing.auth.audit import audit, require_reason
from billing.auth.principal import Principal
from billing.context import Context
from billing.errors import API, INVALID_REQUEST, ApiError, from_refusal, invalid, not_found
from billing.ledger.money import format_money
from billing.ledger.outcomes import Refused
from billing.organizations.service import find_account_to_act_for
from billing.purchases import fees
from billing.purchases.fees import to_cents
from billing.purchases.service import fail_payment, pricing_in_force, stripe_unavailable, trailing_volume
from billing.schemas import StaffReason, money_field, money_or_none
from billing.stripe_client import CURRENCY

log = logging.getLogger("billing.auto_topup")

MAX_DECLINES = 3
# A pending attempt with no PaymentIntent this old was abandoned (its run died before Stripe answered):
# well past a Stripe call's own limit (30 s timeout, two retries).
STALE_AFTER = timedelta(minutes=10)
# Stripe keeps an idempotency key's answer for 24 hours; asking again is safe well inside that.
IDEMPOTENCY_WINDOW = timedelta(hours=23)
# Stripe's answers that say it did nothing; any other error leaves the outcome unknown.
REFUSED = (stripe.InvalidRequestError, stripe.AuthenticationError, stripe.PermissionError)
DEFAULT_COOLDOWN_SECONDS = 600


class SetAutoTopup(msgspec.Struct, forbid_unknown_fields=True):
    threshold: str
    amount: str
    stripe_customer: str
    payment_method: str
    enabled: bool = True
    monthly_cap: str | None = None
    cooldown_seconds: int = DEFAULT_COOLDOWN_SECONDS
    reason: StaffReason | None = None  # staff: kept in the audit log


class PendingAttempt(msgspec.Struct):
    """The attempt in flight: while it is, no other starts. A purchase in `needs_review` keeps it so until
    support resolves the purchase (then the next run settles it)."""

    purchase: str | None  # None: its run died before the purchase existed (given up after STALE_AFTER)
    purchase_status: str | None
    review_reason: str | None
    payment_intent: str | None
    since: datetime


class AutoTopup(msgspec.Struct):
    account: str
    enabled: bool
    threshold: str
    amount: str
    stripe_customer: str
    payment_method: str
    monthly_cap: str | None
    cooldown_seconds: int
    declines: int
    disabled_reason: str | None
    next_attempt_at: datetime | None
    pending_attempt: PendingAttempt | None = None


_PENDING = text(
    "SELECT p.public_id AS purchase, p.status AS purchase_status, p.review_reason,"
    " coalesce(a.payment_intent, p.payment_intent) AS payment_intent, a.created_at AS since"
    " FROM auto_topup_attempts a LEFT JOIN purchases p ON p.id = a.purchase_id"
    " WHERE a.account_id = :a AND a.status = 'pending'"
)


async def _pending(conn: AsyncConnection, account_id: int) -> PendingAttempt | None:
    r = (await conn.execute(_PENDING, {"a": account_id})).first()
    return PendingAttempt(r.purchase, r.purchase_status, r.review_reason, r.payment_intent, r.since) if r else None


def _view(account: str, r: Any, pending: PendingAttempt | None = None) -> AutoTopup:
    return AutoTopup(
        account=account,
        enabled=r.enabled,
        threshold=format_money(r.threshold),
        amount=format_money(r.amount),
        stripe_customer=r.stripe_customer,
        payment_method=r.payment_method,
        monthly_cap=money_or_none(r.monthly_cap),
        cooldown_seconds=r.cooldown_seconds,
        declines=r.declines,
        disabled_reason=r.disabled_reason,
        next_attempt_at=r.next_attempt_at,
        pending_attempt=pending,
    )


async def set_auto_topup(
    ctx: Context, principal: Principal, account: str, data: SetAutoTopup, *, stripe_client: stripe.StripeClient | None
) -> AutoTopup:
    """Create or replace the account's auto top-up; (re-)enabling it clears the declines and the reason. Set
    by staff, it is audit-logged with what was set (SPEC §7).

    A token never moves another account's money (SPEC §7): Stripe must say the payment method is attached to
    the customer (else 400 `payment_method_not_attached`), and a customer belongs to one account — one that
    another account's auto top-up names is refused with 409 `stripe_customer_of_another_account` (the unique
    index `uq_auto_topups_stripe_customer` decides a race), and nothing is saved."""
    require_reason(principal, data.reason)
    threshold = money_field(data.threshold, "threshold")
    amount = money_field(data.amount, "amount")
    cap = money_field(data.monthly_cap, "monthly_cap")
    assert threshold is not None and amount is not None
    if not data.stripe_customer.startswith("cus_"):
        raise invalid("invalid_stripe_customer", "`stripe_customer` must be a Stripe customer id.", "stripe_customer")
    if not data.payment_method.startswith("pm_"):
        raise invalid("invalid_payment_method", "`payment_method` must be a Stripe PaymentMethod id.", "payment_method")
    if not 0 <= data.cooldown_seconds <= 30 * 86400:
        raise invalid("invalid_cooldown", "`cooldown_seconds` must be 0 to 2592000.", "cooldown_seconds")
    if cap is not None and cap < amount:
        raise invalid("monthly_cap_below_amount", "`monthly_cap` must allow at least one top-up.", "monthly_cap")
    async with ctx.db.connect() as conn:
        row = await find_account_to_act_for(conn, principal, account)  # 404 before Stripe is asked
    await _check_card(stripe_client, data.stripe_customer, data.payment_method)
    async with ctx.db.begin() as conn:
        row = await find_account_to_act_for(conn, principal, account)
        try:
            fees.quote(await pricing_in_force(conn, clock.now()), fees.Method.CARD, amount, Decimal(0))
        except Refused as refused:
            raise from_refusal(refused) from refused
        try:
            saved = await _save(conn, row.id, data, threshold, amount, cap)
        except IntegrityError as exc:
            if "uq_auto_topups_stripe_customer" not in str(exc):
                raise
            raise customer_of_another_account(data.stripe_customer) from exc
        if principal.is_staff:
            await audit(
                conn, principal, "auto_topup.set", account_id=row.id, reason=data.reason,
                details=msgspec.to_builtins(data),
            )  # fmt: skip
        pending = await _pending(conn, row.id)
    return _view(account, saved, pending)


def customer_of_another_account(customer: str) -> ApiError:
    return ApiError(
        409,
        INVALID_REQUEST,
        "stripe_customer_of_another_account",
        f"Stripe customer {customer!r} is another account's; use a customer of this account.",
        "stripe_customer",
    )


async def _check_card(stripe_client: stripe.StripeClient | None, customer: str, method: str) -> None:
    """Stripe says `method` is attached to `customer`, or the request is refused (nothing saved)."""
    if stripe_client is None:
        raise ApiError(503, API, "stripe_not_configured", "Payments are not configured (STRIPE_API_KEY).")
    try:
        pm = await stripe_client.v1.payment_methods.retrieve_async(method)
    except stripe.InvalidRequestError as exc:
        raise invalid(
            "no_such_payment_method", f"Stripe knows no payment method {method!r}.", "payment_method"
        ) from exc
    except stripe.StripeError as exc:
        raise stripe_unavailable(exc) from exc
    attached = pm.customer if isinstance(pm.customer, str | None) else pm.customer.id
    if attached != customer:
        raise invalid(
            "payment_method_not_attached",
            f"Payment method {method!r} is not attached to Stripe customer {customer!r}.",
            "payment_method",
        )


async def _save(
    conn: AsyncConnection, account_id: int, data: SetAutoTopup, threshold: Decimal, amount: Decimal, cap: Decimal | None
) -> Any:
    return (
        await conn.execute(
            text(
                "INSERT INTO auto_topups (account_id, enabled, threshold, amount, stripe_customer, payment_method,"
                " monthly_cap, cooldown_seconds) VALUES (:a, :e, :t, :amt, :cus, :pm, :cap, :cd)"
                " ON CONFLICT (account_id) DO UPDATE SET enabled = EXCLUDED.enabled,"
                " threshold = EXCLUDED.threshold, amount = EXCLUDED.amount,"
                " stripe_customer = EXCLUDED.stripe_customer, payment_method = EXCLUDED.payment_method,"
                " monthly_cap = EXCLUDED.monthly_cap, cooldown_seconds = EXCLUDED.cooldown_seconds,"
                " declines = CASE WHEN EXCLUDED.enabled THEN 0 ELSE auto_topups.declines END,"
                " disabled_reason = CASE WHEN EXCLUDED.enabled THEN NULL ELSE auto_topups.disabled_reason END,"
                " next_attempt_at = CASE WHEN EXCLUDED.enabled THEN NULL ELSE auto_topups.next_attempt_at END,"
                " updated_at = now() RETURNING *"
            ),
            {
                "a": account_id,
                "e": data.enabled,
                "t": threshold,
                "amt": amount,
                "cus": data.stripe_customer,
                "pm": data.payment_method,
                "cap": cap,
                "cd": data.cooldown_seconds,
            },
        )
    ).one()


async def get_auto_topup(ctx: Context, principal: Principal, account: str) -> AutoTopup:
    async with ctx.db.connect() as conn:
        row = await find_account_to_act_for(conn, principal, account)
        saved = (await conn.execute(text("SELECT * FROM auto_topups WHERE account_id = :a"), {"a": row.id})).first()
        pending = await _pending(conn, row.id)
    if saved is None:
        raise not_found("auto_topup", account)
    return _view(account, saved, pending)


# --- the job ---------------------------------------------------------------------------------------


@dataclass
class Run:
    attempted: int = 0
    succeeded: int = 0
    declined: int = 0
    disabled: int = 0
    failed: int = 0
    resumed: int = 0  # abandoned after asking Stripe: asked again with the same idempotency key
    unanswered: int = 0  # Stripe's answer did not arrive: left pending, to be asked again


def summary(run: Run) -> str:
    return (
        f"{run.attempted} attempted, {run.succeeded} succeeded, {run.declined} declined, {run.disabled} disabled,"
        f" {run.failed} failed, {run.resumed} resumed, {run.unanswered} unanswered"
    )


async def _declined(conn: AsyncConnection, account_id: int, reason: str, now: datetime, run: Run) -> None:
    """Count a decline: back off (cooldown doubled per consecutive decline), disable at MAX_DECLINES."""
    row = (
        await conn.execute(
            text(
                "UPDATE auto_topups SET declines = declines + 1,"
                " next_attempt_at = CAST(:now AS timestamptz)"
                "   + make_interval(secs => cooldown_seconds * power(2, declines + 1)),"
                " enabled = CASE WHEN declines + 1 >= :max THEN false ELSE enabled END,"
                " disabled_reason = CASE WHEN declines + 1 >= :max THEN :why ELSE disabled_reason END,"
                " updated_at = now() WHERE account_id = :a RETURNING enabled"
            ),
            {
                "a": account_id,
                "now": now,
                "max": MAX_DECLINES,
                "why": f"{MAX_DECLINES} declines in a row; last: {reason}",
            },
        )
    ).first()
    run.declined += 1
    if row is not None and not row.enabled:
        run.disabled += 1


async def settle(ctx: Context, now: datetime, run: Run) -> None:
    """Pending attempts whose purchase Stripe has since paid or failed (webhook or reconciler)."""
    async with ctx.db.begin() as conn:
        # Abandoned attempts would block the account forever: failed (not a decline). Should Stripe have made
        # the payment after all, its webhook (or the reconciler) still credits the purchase.
        abandoned = (
            (
                await conn.execute(
                    text(
                        "UPDATE auto_topup_attempts SET status = 'failed', error = 'abandoned: no PaymentIntent recorded'"
                        " WHERE status = 'pending' AND payment_intent IS NULL AND created_at < :cutoff"
                        " AND (purchase_id IS NULL OR created_at < :expired) RETURNING purchase_id"
                    ),
                    {"cutoff": now - STALE_AFTER, "expired": now - IDEMPOTENCY_WINDOW},
                )
            )
            .scalars()
            .all()
        )
        for purchase in abandoned:
            if purchase is not None:
                await conn.execute(
                    text(
                        "UPDATE purchases SET status = 'failed', failure_code = 'abandoned', updated_at = now()"
                        " WHERE id = :id AND status = 'pending'"
                    ),
                    {"id": purchase},
                )
        run.failed += len(abandoned)
        done = (
            await conn.execute(
                text(
                    "UPDATE auto_topup_attempts a SET status = CASE p.status WHEN 'succeeded' THEN 'succeeded'"
                    " ELSE 'declined' END,"
                    " error = CASE WHEN p.status = 'succeeded' THEN NULL"
                    " ELSE coalesce(p.failure_code, 'failed') || ': ' || coalesce(p.failure_message, '') END"
                    " FROM purchases p WHERE a.purchase_id = p.id AND a.status = 'pending'"
                    " AND p.status IN ('succeeded', 'failed') RETURNING a.account_id, a.status, a.error"
                )
            )
        ).all()
        for r in done:
            if r.status == "succeeded":
                run.succeeded += 1
                await conn.execute(
                    text("UPDATE auto_topups SET declines = 0, updated_at = now() WHERE account_id = :a"),
                    {"a": r.account_id},
                )
            else:
                await _declined(conn, r.account_id, r.error, now, run)


# What the account's top-ups took this month, for its monthly cap: one index range of the account's attempts
# since the month began (`ix_auto_topup_attempts_account_id_created_at`, migration 0024), not all it ever made.
SPENT_SINCE = text(
    "SELECT coalesce(sum(amount), 0) FROM auto_topup_attempts WHERE account_id = :a"
    " AND status IN ('pending', 'succeeded') AND created_at >= :m"
)
_DUE = text(
    "SELECT t.account_id FROM auto_topups t JOIN balances b ON b.account_id = t.account_id"
    " WHERE t.enabled AND b.balance < t.threshold"
    " AND (t.next_attempt_at IS NULL OR t.next_attempt_at <= :now)"
    " AND NOT EXISTS (SELECT 1 FROM auto_topup_attempts a WHERE a.account_id = t.account_id AND a.status = 'pending')"
    " ORDER BY t.account_id LIMIT :n"
)


async def _claim(conn: AsyncConnection, account_id: int, now: datetime, run: Run) -> Any:
    """Under the settings row's lock, re-check everything, price the amount and insert the one pending
    attempt (or None). An amount the pricing in force refuses disables auto top-up, saying why."""
    t = (
        await conn.execute(
            text(
                "SELECT t.*, b.balance FROM auto_topups t JOIN balances b ON b.account_id = t.account_id"
                " WHERE t.account_id = :a FOR UPDATE OF t"
            ),
            {"a": account_id},
        )
    ).first()
    if t is None or not t.enabled or t.balance >= t.threshold:
        return None
    if t.next_attempt_at is not None and t.next_attempt_at > now:
        return None
    if t.monthly_cap is not None:
        month = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        spent = await conn.scalar(SPENT_SINCE, {"a": account_id, "m": month})
        if Decimal(spent) + t.amount > t.monthly_cap:
            return None
    pricing = await pricing_in_force(conn, now)
    volume = await trailing_volume(conn, account_id, pricing.volume_window_days, now)
    try:
        q = fees.quote(pricing, fees.Method.CARD, t.amount, volume)
    except Refused as refused:
        why = f"the pricing in force refuses {format_money(t.amount)} USD ({refused.code}): {refused.message}"
        await conn.execute(
            text(
                "UPDATE auto_topups SET enabled = false, disabled_reason = :why, updated_at = now()"
                " WHERE account_id = :a"
            ),
            {"a": account_id, "why": why},
        )
        run.disabled += 1
        return None
    attempt = await conn.scalar(
        text(
            "INSERT INTO auto_topup_attempts (account_id, status, amount, created_at) VALUES (:a, 'pending', :amt, :now)"
            " ON CONFLICT (account_id) WHERE status = 'pending' DO NOTHING RETURNING id"
        ),
        {"a": account_id, "amt": t.amount, "now": now},
    )
    if attempt is None:
        return None
    await conn.execute(
        text(
            "UPDATE auto_topups SET next_attempt_at = CAST(:now AS timestamptz) + make_interval(secs => cooldown_seconds)"
            " WHERE account_id = :a"
        ),
        {"a": account_id, "now": now},
    )
    return attempt, t, q


async def _attempt(ctx: Context, sdk: stripe.StripeClient, account_id: int, now: datetime, run: Run) -> None:
    async with ctx.db.begin() as conn:
        claimed = await _claim(conn, account_id, now, run)
    if claimed is None:
        return
    attempt, t, q = claimed
    run.attempted += 1
    purchase_id = "pur_" + hashlib.sha256(f"auto_topup\n{attempt}".encode()).hexdigest()[:24]
    async with ctx.db.begin() as conn:
        account = await conn.scalar(text("SELECT public_id FROM accounts WHERE id = :a"), {"a": account_id})
        purchase = await conn.scalar(
            text(
                "INSERT INTO purchases (public_id, account_id, method, status, amount, fee, fee_before_discount,"
                " discount_tier, fee_discount, total, pricing_version_id, created_by) VALUES (:pid, :a, 'card',"
                " 'pending', :amount, :fee, :fee0, :tier, :disc, :total, :ver, 'auto_topup') RETURNING id"
            ),
            {
                "pid": purchase_id,
                "a": account_id,
                "amount": q.credits,
                "fee": q.fee,
                "fee0": q.fee_before_discount,
                "tier": q.tier.name if q.tier else None,
                "disc": q.fee_discount,
                "total": q.total,
                "ver": q.pricing.version_id,
            },
        )
        await conn.execute(
            text("UPDATE auto_topup_attempts SET purchase_id = :p WHERE id = :id"), {"p": purchase, "id": attempt}
        )
    # The purchase is committed before the PaymentIntent exists, so its webhook always finds it (metadata).
    payment = Payment(attempt, purchase, purchase_id, account_id, account, q.total_cents, q.credits, q.fee,
                      t.stripe_customer, t.payment_method)  # fmt: skip
    await _pay(ctx, sdk, payment, now, run)


@dataclass(frozen=True)
class Payment:
    """What an attempt asks Stripe for: the same every time it is asked (the idempotency key's rule)."""

    attempt: int
    purchase: int
    purchase_id: str
    account_id: int
    account: str
    total_cents: int
    credits: Decimal
    fee: Decimal
    stripe_customer: str
    payment_method: str


async def _pay(ctx: Context, sdk: stripe.StripeClient, p: Payment, now: datetime, run: Run) -> None:
    """Ask Stripe for the attempt's off-session payment and record what it answered."""
    try:
        intent = await sdk.v1.payment_intents.create_async(
            {
                "amount": p.total_cents,
                "currency": CURRENCY,
                "customer": p.stripe_customer,
                "payment_method": p.payment_method,
                "off_session": True,
                "confirm": True,
                "metadata": {
                    "purchase_id": p.purchase_id,
                    "account": p.account,
                    "credits": format_money(p.credits),
                    "fee": format_money(p.fee),
                    "auto_topup_attempt": str(p.attempt),
                },
            },
            {"idempotency_key": f"billing-auto_topup-{p.attempt}"},
        )
    except stripe.CardError as exc:
        error = exc.error
        pi = getattr(error, "payment_intent", None) if error else None
        pi_id = pi.get("id") if isinstance(pi, dict) else getattr(pi, "id", None)
        code = (error.code if error else None) or "card_declined"
        message = (error.message if error else None) or str(exc)
        async with ctx.db.begin() as conn:
            await fail_payment(conn, None, p.purchase_id, code, message)
            await conn.execute(
                text(
                    "UPDATE auto_topup_attempts SET status = 'declined', payment_intent = :pi, error = :e"
                    " WHERE id = :id AND status = 'pending'"
                ),
                {"id": p.attempt, "pi": pi_id, "e": f"{code}: {message}"},
            )
            await _declined(conn, p.account_id, f"{code}: {message}", now, run)
        return
    except REFUSED as exc:
        # Not a decline, and Stripe did nothing (a bad request, a bad key): the attempt failed; the cooldown
        # spaces retries.
        async with ctx.db.begin() as conn:
            await fail_payment(conn, None, p.purchase_id, "stripe_error", str(exc))
            await conn.execute(
                text(
                    "UPDATE auto_topup_attempts SET status = 'failed', error = :e WHERE id = :id AND status = 'pending'"
                ),
                {"id": p.attempt, "e": str(exc)},
            )
        run.failed += 1
        return
    except stripe.StripeError as exc:
        # No answer (a timeout, a lost connection, Stripe's own 5xx, a key in use): Stripe may have charged the
        # card. The attempt stays pending, so no other one starts; once STALE_AFTER old it is asked again with
        # the same idempotency key (`resume`).
        log.warning("auto top-up attempt %s: no answer from Stripe (%s); asked again later", p.attempt, exc)
        run.unanswered += 1
        return
    async with ctx.db.begin() as conn:
        await conn.execute(
            text("UPDATE purchases SET payment_intent = coalesce(payment_intent, :pi) WHERE id = :id"),
            {"id": p.purchase, "pi": intent.id},
        )
        await conn.execute(
            text("UPDATE auto_topup_attempts SET payment_intent = :pi WHERE id = :id"),
            {"id": p.attempt, "pi": intent.id},
        )


_ABANDONED_AFTER_ASKING = text(
    "SELECT a.id AS attempt, a.account_id, p.id AS purchase, p.public_id AS purchase_id, p.amount, p.fee, p.total,"
    " acc.public_id AS account, t.stripe_customer, t.payment_method"
    " FROM auto_topup_attempts a JOIN purchases p ON p.id = a.purchase_id JOIN accounts acc ON acc.id = a.account_id"
    " JOIN auto_topups t ON t.account_id = a.account_id"
    " WHERE a.status = 'pending' AND a.payment_intent IS NULL AND a.created_at < :cutoff AND a.created_at >= :expired"
    " ORDER BY a.id LIMIT :n"
)


async def resume(ctx: Context, sdk: stripe.StripeClient, now: datetime, run: Run, limit: int) -> None:
    """Attempts whose run died after asking Stripe (their purchase exists, no PaymentIntent recorded): ask
    again with the same idempotency key and record the answer — the first payment, never a second."""
    async with ctx.db.connect() as conn:
        rows = (
            await conn.execute(
                _ABANDONED_AFTER_ASKING, {"cutoff": now - STALE_AFTER, "expired": now - IDEMPOTENCY_WINDOW, "n": limit}
            )
        ).all()
    for r in rows:
        run.resumed += 1
        payment = Payment(r.attempt, r.purchase, r.purchase_id, r.account_id, r.account, to_cents(r.total), r.amount,
                          r.fee, r.stripe_customer, r.payment_method)  # fmt: skip
        await _for_one_account(r.account_id, _pay(ctx, sdk, payment, now, run), run)


async def _for_one_account(account_id: int, work: Awaitable[None], run: Run) -> None:
    """One account's failure is logged and counted, and never stops the run for the others."""
    try:
        await work
    except Exception:
        log.exception("auto top-up of account %s failed", account_id)
        run.failed += 1


async def run_auto_topups(
    ctx: Context, sdk: stripe.StripeClient, *, now: datetime | None = None, limit: int = 100
) -> Run:
    """One pass: settle pending attempts, then attempt one top-up for each account due (see the module)."""
    now = now or clock.now()
    run = Run()
    await settle(ctx, now, run)
    await resume(ctx, sdk, now, run, limit)
    async with ctx.db.connect() as conn:
        due = (await conn.execute(_DUE, {"now": now, "n": limit})).scalars().all()
    for account_id in due:
        await _for_one_account(account_id, _attempt(ctx, sdk, account_id, now, run), run)
    return run
