"""BYOK fee reconciliation (SPEC §5 BYOK): the fees of a month recomputed from the recorded requests.

The hot path charges each BYOK generation's fee from the month's running counters (`byok_months`); a lost
counter, a race or a policy change mid-month could leave them wrong. This job, per account with charged BYOK
generations in the UTC month, under the account's balance lock (so no charge runs beside it):

- recomputes each generation's fee in the order the hot path charged them (generation id: rows are
  inserted under the account's balance lock, so ids follow the lock order even when concurrent requests'
  `created_at` do not), on its list cost (none for one that zero completion insurance covered, which counts
  as no request either), with the policy it recorded when charged (`byok_policy_id`: rules are versioned so
  past entries keep the rule that made them, SPEC §5, and a policy added later with a backdated
  `effective_from` re-prices nothing), or, for a generation that recorded none, the policy in force at its
  `created_at` (`usage.expected_byok_fees`), and the month's list usage and request count;
- compares the expected total with what was charged: the generations' `byok_fee` plus the corrections
  already posted for that account-month (`byok_corrections`);
- posts ONE `byok_fee` entry for a difference, referenced by a `byok_corrections` row (signed amount,
  expected, charged, entry) and named in the entry's description. More owed: taken from the customer like
  usage (live lots soonest-expiring first, then debt) to `byok_fee_revenue`. Over-charged: given back out of
  `byok_fee_revenue` as a new `compensation` lot (a credit must belong to a lot; existing debt is paid from
  it first), expiring after the default lot lifetime; `total_usage` goes down by it;
- sets `byok_months` to the recomputed values.

A second run finds no difference and posts nothing. `close=True` (only for a month that has ended)
reconciles and records the account-month in `byok_month_closings` once; a closed month is skipped by
every later run.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from billing.context import Context
from billing.db.journal import AccountMissing, CustomerState
from billing.ledger import entries
from billing.ledger.model import Customer, Entry, EntryKind, LotCategory, NewLot, Platform, Posting
from billing.ledger.money import ZERO, format_money
from billing.ledger.usage import ByokPolicy, expected_byok_fees, policy_charged, usage_entry
from billing.schemas import public_id

log = logging.getLogger(__name__)

_ACCOUNTS = text(
    """SELECT DISTINCT g.account_id FROM generations g
WHERE g.is_byok AND g.status = 'charged' AND g.created_at >= :start AND g.created_at < :end
  AND (CAST(:ids AS bigint[]) IS NULL OR g.account_id = ANY(CAST(:ids AS bigint[])))
  AND NOT EXISTS (SELECT 1 FROM byok_month_closings c WHERE c.account_id = g.account_id AND c.month = :month)
ORDER BY g.account_id"""
)
_CLOSED = text("SELECT 1 FROM byok_month_closings WHERE account_id = :account AND month = :month")
_GENERATIONS = text(
    """SELECT created_at, byok_policy_id, byok_list_cost, coalesce(byok_fee, 0), usage @> '{"insured": true}'
FROM generations
WHERE account_id = :account AND is_byok AND status = 'charged' AND created_at >= :start AND created_at < :end
ORDER BY id"""
)
_POLICIES = text(
    "SELECT effective_from, id, kind, rate, allowance_usd, enterprise_allowance_usd, free_requests"
    " FROM byok_fee_policies"
)
_ACCOUNT = text("SELECT public_id, enterprise FROM accounts WHERE id = :account")
_CORRECTED = text(
    "SELECT coalesce(sum(amount), 0) FROM byok_corrections WHERE account_id = :account AND month = :month"
)
_CORRECTION = text(
    """INSERT INTO byok_corrections (account_id, month, amount, entry_id, expected, charged)
VALUES (:account, :month, :amount, :entry, :expected, :charged)"""
)
_MONTH = text(
    """INSERT INTO byok_months (account_id, month, list_usage, requests, fees)
VALUES (:account, :month, :list_usage, :requests, :fees)
ON CONFLICT (account_id, month) DO UPDATE SET list_usage = EXCLUDED.list_usage, requests = EXCLUDED.requests,
    fees = EXCLUDED.fees"""
)
_CLOSE = text(
    """INSERT INTO byok_month_closings (account_id, month, closed_at, entry_id)
VALUES (:account, :month, :now, :entry) ON CONFLICT (account_id, month) DO NOTHING"""
)


@dataclass(frozen=True, slots=True)
class ByokCorrection:
    account: str
    amount: Decimal  # signed: > 0 more fee taken, < 0 fee given back
    expected: Decimal
    charged: Decimal
    entry: str


@dataclass
class ByokRun:
    month: date
    close: bool
    accounts: int = 0
    corrections: list[ByokCorrection] = field(default_factory=list)
    closed: int = 0

    @property
    def total(self) -> Decimal:
        return sum((c.amount for c in self.corrections), ZERO)


def month_bounds(month: date) -> tuple[datetime, datetime]:
    """The UTC calendar month containing `month`, as [start, end)."""
    first = month.replace(day=1)
    following = (first + timedelta(days=32)).replace(day=1)
    return datetime.combine(first, time(), UTC), datetime.combine(following, time(), UTC)


def correction_entry(
    customer: Customer, amount: Decimal, *, state: CustomerState, now: datetime, lot_days: int, description: str
) -> Entry:
    """The one entry for a signed difference: more fee owed is taken like usage; fee over-charged comes back
    from `byok_fee_revenue` as a new `compensation` lot (debt paid from it first)."""
    if amount > 0:
        return usage_entry(
            customer, amount, lots=state.lots, now=now, kind=EntryKind.BYOK_FEE, revenue=Platform.BYOK_FEE_REVENUE,
            description=description,
        )  # fmt: skip
    back = -amount
    return Entry(
        kind=EntryKind.BYOK_FEE,
        customer=customer,
        postings=(*entries.new_lot_postings(customer, back, state.debt), Posting(Platform.BYOK_FEE_REVENUE, -back)),
        usage_delta=-back,
        new_lot=NewLot(LotCategory.COMPENSATION, back, now + timedelta(days=lot_days)),
        description=description,
    )


async def _policies(conn: AsyncConnection) -> list[tuple[datetime, ByokPolicy]]:
    """Every version of the policy (a handful of rows): a generation names its own by id, whatever its
    `effective_from`."""
    rows = await conn.execute(_POLICIES)
    return [
        (r[0], ByokPolicy(id=r[1], kind=r[2], rate=r[3], allowance_usd=r[4], enterprise_allowance_usd=r[5],
                          free_requests=r[6]))
        for r in rows
    ]  # fmt: skip


async def reconcile_byok(
    ctx: Context, month: date, *, close: bool = False, now: datetime, account_ids: Sequence[int] | None = None
) -> ByokRun:
    """Reconcile every account's BYOK fees of the UTC month containing `month` (or only `account_ids`'s);
    with `close`, then close each account-month once (the month must have ended)."""
    start, end = month_bounds(month)
    first = start.date()
    if close and now < end:
        raise ValueError(f"the month {first:%Y-%m} has not ended: it cannot be closed yet")
    run = ByokRun(first, close)
    async with ctx.db.connect() as conn:
        params = {"start": start, "end": end, "month": first, "ids": list(account_ids) if account_ids else None}
        accounts = [a for (a,) in await conn.execute(_ACCOUNTS, params)]
        policies = await _policies(conn)
    for account_id in accounts:
        async with ctx.db.begin() as conn:
            await _reconcile_account(ctx, conn, run, account_id, policies, start, end, now)
    return run


async def _reconcile_account(
    ctx: Context,
    conn: AsyncConnection,
    run: ByokRun,
    account_id: int,
    policies: list[tuple[datetime, ByokPolicy]],
    start: datetime,
    end: datetime,
    now: datetime,
) -> None:
    month = start.date()
    customer = Customer(account_id)
    try:
        state = await ctx.journal.lock_customer(conn, customer)
    except AccountMissing:
        return
    key = {"account": account_id, "month": month}
    if await conn.scalar(_CLOSED, key):  # closed by a run that got here first
        return
    run.accounts += 1
    account, enterprise = (await conn.execute(_ACCOUNT, {"account": account_id})).one()
    generations = (await conn.execute(_GENERATIONS, {"account": account_id, "start": start, "end": end})).all()
    fees = expected_byok_fees(
        [(cost, policy_charged(policies, policy_id, at), insured) for at, policy_id, cost, _, insured in generations],
        enterprise=enterprise,
    )
    expected = sum(fees, ZERO)
    charged = sum((fee for _, _, _, fee, _ in generations), ZERO) + Decimal(await conn.scalar(_CORRECTED, key))
    counted = [cost for _, _, cost, _, insured in generations if not insured]
    difference = expected - charged
    entry_id: int | None = None
    if difference:
        description = (
            f"BYOK fee correction for {month:%Y-%m}: {'+' if difference > 0 else ''}{format_money(difference)} USD"
            f" (expected {format_money(expected)}, charged {format_money(charged)})"
        )
        entry = correction_entry(
            customer, difference, state=state, now=now, lot_days=ctx.settings.default_lot_expiry_days,
            description=description,
        )  # fmt: skip
        posted = await ctx.journal.post(conn, entry, balance_before=state.balance)
        entry_id = posted.entry_id
        await conn.execute(
            _CORRECTION, {**key, "amount": difference, "entry": entry_id, "expected": expected, "charged": charged}
        )
        correction = ByokCorrection(account, difference, expected, charged, public_id("je", entry_id))
        run.corrections.append(correction)
        log.warning("BYOK fees of %s for %s corrected by %s USD (%s)", account, f"{month:%Y-%m}",
                    format_money(difference), correction.entry)  # fmt: skip
    await conn.execute(
        _MONTH,
        {**key, "list_usage": sum(counted, ZERO), "requests": len(counted), "fees": expected},
    )  # fmt: skip
    if run.close:
        closed = await conn.execute(_CLOSE, {**key, "now": now, "entry": entry_id})
        run.closed += closed.rowcount or 0


def summary(run: ByokRun) -> str:
    verb = "reconciled and closed" if run.close else "reconciled"
    return (
        f"BYOK fees of {run.month:%Y-%m} {verb} on {run.accounts} account(s): {len(run.corrections)} correction(s),"
        f" net {format_money(run.total)} USD" + (f"; {run.closed} month(s) closed" if run.close else "")
    )
