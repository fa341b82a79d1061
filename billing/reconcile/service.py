"""The missing-credit reconciler (SPEC §5 "Missing credits").

Webhooks get lost. Every few minutes (and on demand: `billing reconcile`) the reconciler walks Stripe's
PaymentIntents of a recent window (72 hours by default), newest first, and hands every succeeded one the
ledger has not credited to `fulfil_payment` — the very function the webhook calls, keyed by the
PaymentIntent, so a payment is credited once however many webhooks, runs, workers and tickets reach it.

It also reports the reverse: credits in the ledger whose PaymentIntent Stripe does not show as succeeded,
and credits of another amount than Stripe received. It reports those, it never edits them (support does,
with an audited adjustment).

Payments younger than the grace period (`BILLING_RECONCILE_GRACE`, 10 minutes) are left to their webhooks;
crediting them early would be harmless (same function, same key) but would report a healthy webhook as a
repair. Each run is recorded in `reconcile_runs`: when, the window, the counts, and what it found and
repaired.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

import msgspec
import stripe
from sqlalchemy import text
from sqlalchemy.engine import Row

from billing import clock
from billing.context import Context
from billing.errors import not_found
from billing.purchases.service import Result, fulfil_payment
from billing.reconcile import schemas as s
from billing.reconcile.stripe_payments import StripePayment, payments_since, retrieve_payment
from billing.schemas import ListOf, internal_id, public_id

# What a finding is about.
CREDITED = "credited"  # succeeded at Stripe, missing from the ledger: credited by this run
NEEDS_REVIEW = "needs_review"  # succeeded at Stripe, but fulfilment refused it (no purchase, another amount, ...)
UNPAID_CREDIT = "unpaid_credit"  # credited in the ledger, not succeeded at Stripe
AMOUNT_MISMATCH = "amount_mismatch"  # credited in the ledger for another amount than Stripe received

# What the ledger credited in a run's window, through `ix_fulfilments_created_at` (migration 0023): a range of
# the window's rows, not every payment ever fulfilled, every few minutes.
CREDITS_IN_WINDOW = text(
    "SELECT payment_intent, purchase_id, entry_id, amount_cents FROM fulfilments"
    " WHERE created_at >= :start AND created_at <= :end ORDER BY created_at"
)


@dataclass(frozen=True, slots=True)
class Finding:
    kind: str
    payment_intent: str
    detail: str
    purchase: int | None = None
    entry: int | None = None


@dataclass(slots=True)
class Run:
    started_at: datetime
    window_start: datetime
    window_end: datetime  # payments created after this are younger than the grace period
    source: str
    seen: int = 0  # succeeded PaymentIntents in the window
    young: int = 0  # of those, left to their webhooks
    already_credited: int = 0
    credited: int = 0
    needs_review: int = 0
    unpaid_credits: int = 0
    amount_mismatches: int = 0
    findings: list[Finding] = field(default_factory=list)
    id: int | None = None
    finished_at: datetime | None = None

    @property
    def public_id(self) -> str:
        return public_id("recon", self.id or 0)


async def reconcile_payments(
    ctx: Context,
    sdk: stripe.StripeClient,
    *,
    window: timedelta | None = None,
    grace: timedelta | None = None,
    source: str = "scheduled",
) -> Run:
    """One reconciliation run over Stripe's payments of the last `window`; recorded, and returned."""
    now = clock.now()
    window = window if window is not None else timedelta(hours=ctx.settings.reconcile_window_hours)
    grace = grace if grace is not None else timedelta(seconds=ctx.settings.reconcile_grace)
    run = Run(started_at=now, window_start=now - window, window_end=now - grace, source=source)
    succeeded: dict[str, StripePayment] = {}

    async for payment in payments_since(sdk, ctx.settings, run.window_start):
        if payment.status != "succeeded":
            continue
        run.seen += 1
        if payment.created > run.window_end:
            run.young += 1
            continue
        succeeded[payment.id] = payment
        done = await fulfil_payment(ctx, payment.to_fulfil(f"reconciler:{source}"))
        if done.result is Result.CREDITED:
            run.credited += 1
            run.findings.append(
                Finding(CREDITED, payment.id, "succeeded at Stripe, missing from the ledger", done.purchase_id,
                        done.entry_id)
            )  # fmt: skip
        elif done.result is Result.ALREADY_CREDITED:
            run.already_credited += 1
        else:
            run.needs_review += 1
            run.findings.append(Finding(NEEDS_REVIEW, payment.id, done.reason or "needs review", done.purchase_id))

    await _check_credits(ctx, sdk, run, succeeded)
    run.finished_at = clock.now()
    await _record(ctx, run)
    return run


async def _check_credits(ctx: Context, sdk: stripe.StripeClient, run: Run, succeeded: dict[str, StripePayment]) -> None:
    """The reverse: every credit the ledger made for a payment in the window must be a payment Stripe shows
    as succeeded, for the amount credited. A PaymentIntent the walk did not see is asked for by id (it
    may have been created before the window and credited inside it)."""
    async with ctx.db.connect() as conn:
        credits = (await conn.execute(CREDITS_IN_WINDOW, {"start": run.window_start, "end": run.window_end})).all()
    for credit in credits:
        payment = succeeded.get(credit.payment_intent) or await retrieve_payment(sdk, credit.payment_intent)
        if payment is None or payment.status != "succeeded":
            run.unpaid_credits += 1
            shown = "has no such PaymentIntent" if payment is None else f"shows it {payment.status}"
            run.findings.append(
                Finding(UNPAID_CREDIT, credit.payment_intent, f"credited, but Stripe {shown}", credit.purchase_id,
                        credit.entry_id)
            )  # fmt: skip
        elif payment.amount_cents != credit.amount_cents:
            run.amount_mismatches += 1
            run.findings.append(
                Finding(
                    AMOUNT_MISMATCH,
                    credit.payment_intent,
                    f"credited for {credit.amount_cents} cents, Stripe received {payment.amount_cents}",
                    credit.purchase_id,
                    credit.entry_id,
                )
            )


async def _record(ctx: Context, run: Run) -> None:
    async with ctx.db.begin() as conn:
        ids = [f.purchase for f in run.findings if f.purchase is not None]
        rows = await conn.execute(text("SELECT id, public_id FROM purchases WHERE id = ANY(:ids)"), {"ids": ids})
        purchases = {row.id: row.public_id for row in rows}
        findings = [{**asdict(f), "purchase_public": purchases.get(f.purchase or 0)} for f in run.findings]
        run.id = await conn.scalar(
            text(
                "INSERT INTO reconcile_runs (started_at, finished_at, window_start, window_end, source, seen, young,"
                " already_credited, credited, needs_review, unpaid_credits, amount_mismatches, findings)"
                " VALUES (:started_at, :finished_at, :window_start, :window_end, :source, :seen, :young,"
                " :already_credited, :credited, :needs_review, :unpaid_credits, :amount_mismatches,"
                " CAST(:findings AS jsonb)) RETURNING id"
            ),
            {
                "started_at": run.started_at,
                "finished_at": run.finished_at,
                "window_start": run.window_start,
                "window_end": run.window_end,
                "source": run.source,
                "seen": run.seen,
                "young": run.young,
                "already_credited": run.already_credited,
                "credited": run.credited,
                "needs_review": run.needs_review,
                "unpaid_credits": run.unpaid_credits,
                "amount_mismatches": run.amount_mismatches,
                "findings": msgspec.json.encode(findings).decode(),
            },
        )


def summary(run: Run) -> str:
    return (
        f"{run.public_id}: {run.seen} succeeded payment(s) since {run.window_start.isoformat()}"
        f" ({run.young} younger than the grace period, left to their webhooks); {run.credited} credited now,"
        f" {run.already_credited} already credited, {run.needs_review} need review; {run.unpaid_credits} credit(s)"
        f" Stripe does not show as paid, {run.amount_mismatches} amount mismatch(es)"
    )


# --- reading runs back ------------------------------------------------------------------------------

MAX_PAGE = 100


def run_view(r: Row[Any]) -> s.ReconciliationRun:
    return s.ReconciliationRun(
        id=public_id("recon", r.id),
        source=r.source,
        started_at=r.started_at,
        finished_at=r.finished_at,
        window_start=r.window_start,
        window_end=r.window_end,
        seen=r.seen,
        young=r.young,
        already_credited=r.already_credited,
        credited=r.credited,
        needs_review=r.needs_review,
        unpaid_credits=r.unpaid_credits,
        amount_mismatches=r.amount_mismatches,
        findings=[
            s.RunFinding(
                kind=f["kind"],
                payment_intent=f["payment_intent"],
                detail=f["detail"],
                purchase=f.get("purchase_public"),
                entry=public_id("je", f["entry"]) if f.get("entry") else None,
            )
            for f in r.findings
        ],
    )


async def list_runs(ctx: Context, *, limit: int, starting_after: str | None) -> ListOf[s.ReconciliationRun]:
    cursor = internal_id("recon", starting_after, "reconciliation_run") if starting_after else None
    async with ctx.db.connect() as conn:
        rows = (
            await conn.execute(
                text(
                    "SELECT * FROM reconcile_runs WHERE (CAST(:cursor AS bigint) IS NULL OR id < :cursor)"
                    " ORDER BY id DESC LIMIT :n"
                ),
                {"cursor": cursor, "n": limit + 1},
            )
        ).all()
    return ListOf(data=[run_view(r) for r in rows[:limit]], has_more=len(rows) > limit)


async def get_run(ctx: Context, run: str) -> s.ReconciliationRun:
    ident = internal_id("recon", run, "reconciliation_run")
    async with ctx.db.connect() as conn:
        row = (await conn.execute(text("SELECT * FROM reconcile_runs WHERE id = :id"), {"id": ident})).first()
    if row is None:
        raise not_found("reconciliation_run", run)
    return run_view(row)
