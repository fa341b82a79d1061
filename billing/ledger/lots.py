"""Which lots a debit consumes, and how new credits settle debt. Pure functions."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from decimal import Decimal

from billing.ledger.model import LotBalance
from billing.ledger.money import ZERO


def consume(lots: Iterable[LotBalance], amount: Decimal, now: datetime) -> tuple[list[tuple[int, Decimal]], Decimal]:
    """Allocate `amount` over live lots, soonest-expiring first (SPEC §4); ties go to the older lot.

    Returns the (lot id, amount taken) pairs and the shortfall no live lot could cover. Expired lots are
    never consumed: their remainder belongs to breakage.
    """
    if amount < 0:
        raise ValueError("consume takes a positive amount")
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
