"""The expiry entry (SPEC §5 Expiry): pure, no database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from billing.ledger import entries
from billing.ledger.model import Customer, EntryKind, LotBalance, Platform, Posting

NOW = datetime(2027, 12, 1, tzinfo=UTC)
PAST = NOW - timedelta(days=1)
FUTURE = NOW + timedelta(days=1)
ME = Customer(7)


def test_what_is_left_of_each_expired_lot_moves_to_breakage_in_one_entry() -> None:
    lots = [
        LotBalance(3, Decimal("5.000000000001"), PAST),
        LotBalance(1, Decimal("2.5"), PAST - timedelta(days=3)),
        LotBalance(2, Decimal("9"), FUTURE),
    ]
    entry = entries.expiry(ME, lots, NOW)
    assert entry is not None
    assert entry.kind is EntryKind.EXPIRY and entry.customer == ME
    assert entry.postings == (
        Posting(ME, Decimal("-2.5"), 1),
        Posting(ME, Decimal("-5.000000000001"), 3),
        Posting(Platform.BREAKAGE, Decimal("7.500000000001")),
    )
    assert entry.balance_delta == Decimal("-7.500000000001")
    assert entry.credits_delta == 0 and entry.usage_delta == 0  # total_credits unchanged: not a refund


def test_a_lot_expiring_exactly_now_expires() -> None:
    entry = entries.expiry(ME, [LotBalance(1, Decimal("1"), NOW)], NOW)
    assert entry is not None and entry.balance_delta == Decimal("-1")


def test_nothing_expired_or_nothing_left_is_no_entry() -> None:
    assert entries.expiry(ME, [], NOW) is None
    assert entries.expiry(ME, [LotBalance(1, Decimal("3"), FUTURE)], NOW) is None
    assert entries.expiry(ME, [LotBalance(1, Decimal("0"), PAST)], NOW) is None  # already expired once
