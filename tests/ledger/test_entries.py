"""The ledger core without a database: balanced entries, lot consumption, debt settlement."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.ledger import entries
from billing.ledger.lots import consume
from billing.ledger.model import (
    NEW_LOT,
    Customer,
    Entry,
    EntryKind,
    LotBalance,
    LotCategory,
    Platform,
    Posting,
)
from billing.ledger.outcomes import Refused

NOW = datetime(2026, 11, 27, tzinfo=UTC)
LATER = NOW + timedelta(days=365)
C = Customer(7)
D = Decimal


def test_entry_must_balance() -> None:
    with pytest.raises(ValueError, match="sum to exactly zero"):
        Entry(EntryKind.GRANT, C, (Posting(C, D("1")), Posting(Platform.PROMOTIONAL_CREDITS, D("-0.99"))))
    with pytest.raises(ValueError, match="at least two"):
        Entry(EntryKind.GRANT, C, (Posting(C, D("1")),))


def test_entry_touches_only_its_customer() -> None:
    with pytest.raises(ValueError, match="at most one customer"):
        Entry(EntryKind.GRANT, C, (Posting(C, D("1")), Posting(Customer(8), D("-1"))))


def test_grant_creates_a_lot_funded_by_its_category() -> None:
    e = entries.grant(
        C,
        D("10"),
        category=LotCategory.PROMOTIONAL,
        expires_at=LATER,
        debt=D(0),
        now=NOW,
        reason="r",
        actor="a",
    )
    assert e.postings == (Posting(C, D("10"), NEW_LOT), Posting(Platform.PROMOTIONAL_CREDITS, D("-10")))
    assert e.balance_delta == D("10") and e.credits_delta == D("10") and e.new_lot is not None


def test_grant_settles_debt_first() -> None:
    e = entries.grant(
        C, D("10"), category=LotCategory.PAID, expires_at=LATER, debt=D("-3"), now=NOW, reason="r", actor="a"
    )
    lot_total = sum(p.amount for p in e.postings if p.lot is NEW_LOT)
    debt_paid = sum(p.amount for p in e.postings if isinstance(p.account, Customer) and p.lot is None)
    assert lot_total == D("7") and debt_paid == D("3") and e.balance_delta == D("10")


def test_grant_refusals() -> None:
    with pytest.raises(Refused) as info:
        entries.grant(C, D("0"), category=LotCategory.PAID, expires_at=LATER, debt=D(0), now=NOW, reason="r", actor="a")
    assert info.value.code == "amount_must_be_positive"
    with pytest.raises(Refused) as info:
        entries.grant(C, D("1"), category=LotCategory.PAID, expires_at=NOW, debt=D(0), now=NOW, reason="r", actor="a")
    assert info.value.code == "expiry_in_past"


def test_won_dispute_gives_back_what_its_opening_took() -> None:
    both = entries.dispute_won(C, credits=D("15"), fee=D("0.83"), expires_at=LATER, debt=D(0), reverses=1,
                               description="d")  # fmt: skip
    assert both.postings == (
        Posting(C, D("15"), NEW_LOT),
        Posting(Platform.PURCHASE_FEE_REVENUE, D("0.83")),
        Posting(Platform.DISPUTES, D("-15.83")),
    )
    fee_only = entries.dispute_won(C, credits=D(0), fee=D("0.83"), expires_at=LATER, debt=D("-3"), reverses=1,
                                   description="d")  # fmt: skip
    assert fee_only.postings == (
        Posting(Platform.PURCHASE_FEE_REVENUE, D("0.83")),
        Posting(Platform.DISPUTES, D("-0.83")),
    )
    assert fee_only.new_lot is None and fee_only.balance_delta == 0 and fee_only.credits_delta == 0
    with pytest.raises(ValueError, match="positive amount"):
        entries.dispute_won(C, credits=D(0), fee=D(0), expires_at=LATER, debt=D(0), reverses=1, description="d")


def test_consume_takes_soonest_expiring_live_lots_first() -> None:
    lots = [
        LotBalance(1, D("5"), NOW + timedelta(days=30)),
        LotBalance(2, D("5"), NOW + timedelta(days=10)),
        LotBalance(3, D("5"), NOW - timedelta(days=1)),  # expired: never consumed
    ]
    taken, short = consume(lots, D("7"), NOW)
    assert taken == [(2, D("5")), (1, D("2"))] and short == 0
    taken, short = consume(lots, D("12"), NOW)
    assert taken == [(2, D("5")), (1, D("5"))] and short == D("2")


def test_negative_adjustment_refused_beyond_live_lots() -> None:
    lots = [LotBalance(1, D("2"), LATER)]
    with pytest.raises(Refused) as info:
        entries.adjustment(
            C,
            D("-3"),
            category=LotCategory.COMPENSATION,
            expires_at=LATER,
            lots=lots,
            debt=D(0),
            now=NOW,
            reason="r",
            actor="a",
        )
    assert info.value.code == "insufficient_credits" and info.value.details["available"] == "2.00"


amounts = st.decimals(min_value=D("0.000000000001"), max_value=D("25000"), places=12)


@given(lots=st.lists(amounts, min_size=1, max_size=6), take=amounts)
def test_consume_is_exact_and_never_overdraws(lots: list[Decimal], take: Decimal) -> None:
    balances = [LotBalance(i, a, LATER + timedelta(days=i % 3)) for i, a in enumerate(lots)]
    taken, short = consume(balances, take, NOW)
    assert sum(p for _, p in taken) + short == take
    remaining = {lot.id: lot.remaining for lot in balances}
    assert all(0 < part <= remaining[i] for i, part in taken)
    assert short == 0 or sum(p for _, p in taken) == sum(lots)


@given(amount=amounts, debt=st.decimals(min_value=D("-100"), max_value=D("0"), places=12))
def test_every_grant_is_balanced(amount: Decimal, debt: Decimal) -> None:
    e = entries.grant(
        C,
        amount,
        category=LotCategory.COMPENSATION,
        expires_at=LATER,
        debt=debt,
        now=NOW,
        reason="r",
        actor="a",
    )
    assert sum(p.amount for p in e.postings) == 0
    assert sum(p.amount for p in e.postings if p.lot is NEW_LOT) == amount - min(-debt, amount)
