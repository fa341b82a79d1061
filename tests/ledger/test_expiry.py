"""The expiry entry (SPEC §5 Expiry): pure, no database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from billing.ledger import entries
from billing.ledger.lots import consume
from billing.ledger.model import Customer, EntryKind, Hold, LotBalance, Platform, Posting

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


def test_what_open_holds_made_before_the_expiry_reserve_is_left_and_the_rest_expires() -> None:
    lots = [LotBalance(1, Decimal("10"), PAST), LotBalance(2, Decimal("3"), PAST), LotBalance(3, Decimal("9"), FUTURE)]
    holds = [
        Hold(Decimal("4"), PAST - timedelta(minutes=1)),  # lot 1 (ties: the older lot)
        Hold(Decimal("8"), PAST - timedelta(minutes=2)),  # older: takes lot 1 first, 8 of it
        Hold(Decimal("5"), PAST + timedelta(minutes=1)),  # made after the expiry: reserves only the live lot
    ]
    entry = entries.expiry(ME, lots, NOW, holds)
    assert entry is not None
    # lot 1: 8 + 2 reserved, nothing expires; lot 2: 2 of the second hold reserved, 1 expires
    assert entry.postings == (Posting(ME, Decimal("-1"), 2), Posting(Platform.BREAKAGE, Decimal("1")))


def test_a_lot_its_holds_reserve_whole_posts_nothing() -> None:
    lots = [LotBalance(1, Decimal("5"), PAST)]
    assert entries.expiry(ME, lots, NOW, [Hold(Decimal("6"), PAST - timedelta(minutes=1))]) is None


def test_a_capture_pays_its_hold_from_the_lots_live_when_the_hold_was_made_and_the_rest_from_live_lots() -> None:
    lots = [LotBalance(1, Decimal("10"), PAST), LotBalance(2, Decimal("2"), FUTURE)]
    hold = Hold(Decimal("5"), PAST - timedelta(minutes=1))
    assert consume(lots, Decimal("8"), NOW, hold) == ([(1, Decimal("5")), (2, Decimal("2"))], Decimal("1"))
    assert consume(lots, Decimal("3"), NOW, hold) == ([(1, Decimal("3"))], Decimal("0"))
    assert consume(lots, Decimal("3"), NOW) == ([(2, Decimal("2"))], Decimal("1"))  # no hold: live lots only
    late = Hold(Decimal("5"), PAST + timedelta(minutes=1))  # made after lot 1 expired: it reserves nothing of it
    assert consume(lots, Decimal("3"), NOW, late) == ([(2, Decimal("2"))], Decimal("1"))
