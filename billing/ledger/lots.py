"""Which lots a debit consumes, and how new credits settle debt. Pure functions."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from decimal import Decimal

from billing.ledger.model import Hold, LotBalance
from billing.ledger.money import ZERO


def consume(
    lots: Iterable[LotBalance], amount: Decimal, now: datetime, hold: Hold | None = None
) -> tuple[list[tuple[int, Decimal]], Decimal]:
    """Allocate `amount` over live lots, soonest-expiring first (SPEC §4); ties go to the older lot.

    Returns the (lot id, amount taken) pairs and the shortfall no live lot could cover. Expired lots are
    never consumed: their remainder belongs to breakage. A capture (`hold` given) pays up to the hold's
    amount from the lots that were live when the hold was created, even if they have expired since: a
    hold reserves credits and a finished generation is paid from them (SPEC §5 Holds); only unused
    credits expire. What it costs beyond its hold comes from lots live at `now`.
    """
    if amount < 0:
        raise ValueError("consume takes a positive amount")
    if hold is None:
        return _take(lots, amount, now)
    lots = tuple(lots)
    reserved = min(amount, hold.amount)
    first, short = _take(lots, reserved, hold.created_at)
    used = dict(first)
    rest = [LotBalance(lot.id, lot.remaining - used.get(lot.id, ZERO), lot.expires_at) for lot in lots]
    second, beyond = _take(rest, amount - reserved, now)
    for lot_id, part in second:
        used[lot_id] = used.get(lot_id, ZERO) + part
    return list(used.items()), short + beyond


def reserved_by(lots: Iterable[LotBalance], holds: Iterable[Hold]) -> dict[int, Decimal]:
    """What of each lot the open `holds` reserve: what their captures would take if each cost its whole
    hold, oldest hold first (`consume` with the hold). Expiry leaves this much of an expired lot until
    the holds resolve, so capture and expiry settle alike in either order (SPEC §5 Holds, Expiry).
    """
    left = {lot.id: lot for lot in lots}
    reserved: dict[int, Decimal] = {}
    for hold in sorted(holds, key=lambda hold: hold.created_at):
        taken, _ = consume(left.values(), hold.amount, hold.created_at, hold)
        for lot_id, part in taken:
            lot = left[lot_id]
            left[lot_id] = LotBalance(lot.id, lot.remaining - part, lot.expires_at)
            reserved[lot_id] = reserved.get(lot_id, ZERO) + part
    return reserved


def _take(lots: Iterable[LotBalance], amount: Decimal, now: datetime) -> tuple[list[tuple[int, Decimal]], Decimal]:
    left = amount
    taken: list[tuple[int, Decimal]] = []
    for lot in sorted(lots, key=lambda lot: (lot.expires_at, lot.id)):
        if left == 0:
            break
        if lot.remaining <= 0 or lot.expires_at <= now:
            continue
        part = min(lot.remaining, left)
        taken.append((lot.id, part))
        left -= part
    return taken, left if left > 0 else ZERO


def debt_settled_by(debt: Decimal, credit: Decimal) -> Decimal:
    """How much of a new credit pays off existing debt (debt is the sum of lot-less postings, ≤ 0)."""
    if debt > 0:
        raise ValueError("debt is never positive")
    return min(-debt, credit)
