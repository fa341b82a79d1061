"""Purchase fees and volume discounts at their boundaries, without a database (SPEC §5)."""

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from billing.ledger import entries
from billing.ledger.model import NEW_LOT, Customer, EntryKind, LotCategory, Platform, Posting
from billing.ledger.outcomes import Refused
from billing.purchases.fees import Method, Pricing, Tier, from_cents, quote, to_cents

D = Decimal
DEFAULT = Pricing(
    version_id=1,
    effective_from=datetime(2000, 1, 1, tzinfo=UTC),
    card_rate=D("0.055"),
    card_minimum=D("0.80"),
    crypto_rate=D("0.05"),
    crypto_minimum=D("0"),
    min_purchase=D("5"),
    max_purchase=D("25000"),
    volume_window_days=30,
    tiers=(Tier("standard", D("0"), D("0")),),
)
TIERED = Pricing(
    **{
        **{f: getattr(DEFAULT, f) for f in DEFAULT.__slots__},  # type: ignore[attr-defined]
        "tiers": (
            Tier("standard", D("0"), D("0")),
            Tier("silver", D("1000"), D("0.10")),
            Tier("gold", D("10000"), D("0.25")),
        ),
    }
)


@pytest.mark.parametrize(
    ("amount", "fee", "total"),
    [
        ("5.00", "0.80", "5.80"),  # smallest purchase: the $0.80 minimum
        ("14.54", "0.80", "15.34"),  # 0.7997 -> minimum
        ("14.55", "0.80", "15.35"),  # 0.80025: 5.5% crosses the minimum here, rounds down to 0.80
        ("14.63", "0.80", "15.43"),  # 0.80465 -> 0.80
        ("14.64", "0.81", "15.45"),  # 0.8052 -> 0.81
        ("15.00", "0.83", "15.83"),  # 0.825 exactly: half-up (half-even would give 0.82)
        ("100.00", "5.50", "105.50"),
        ("25000.00", "1375.00", "26375.00"),  # largest purchase
    ],
)
def test_card_fee_boundaries(amount: str, fee: str, total: str) -> None:
    q = quote(DEFAULT, Method.CARD, D(amount), D("0"))
    assert (q.credits, q.fee, q.total) == (D(amount), D(fee), D(total))
    assert q.saving == 0
    assert q.total_cents == to_cents(D(total))


@pytest.mark.parametrize(
    ("amount", "fee"),
    [("5.00", "0.25"), ("5.10", "0.26"), ("5.30", "0.27"), ("25000", "1250.00")],  # 0.255 -> 0.26 half-up
)
def test_crypto_fee_is_five_percent_without_minimum(amount: str, fee: str) -> None:
    q = quote(DEFAULT, Method.CRYPTO, D(amount), D("0"))
    assert q.fee == D(fee)
    assert q.total == D(amount) + D(fee)


@pytest.mark.parametrize(
    ("amount", "code"),
    [
        ("4.99", "purchase_below_minimum"),
        ("25000.01", "purchase_above_maximum"),
        ("10.005", "amount_not_whole_cents"),
        ("0", "amount_must_be_positive"),
        ("-5", "amount_must_be_positive"),
    ],
)
def test_purchase_bounds(amount: str, code: str) -> None:
    with pytest.raises(Refused) as refused:
        quote(DEFAULT, Method.CARD, D(amount), D("0"))
    assert refused.value.code == code


@pytest.mark.parametrize(
    ("volume", "tier", "next_tier"),
    [
        ("0", "standard", "silver"),
        ("999.99", "standard", "silver"),
        ("1000", "silver", "gold"),  # a tier starts exactly at its minimum volume
        ("9999.99", "silver", "gold"),
        ("10000", "gold", None),
    ],
)
def test_tier_edges(volume: str, tier: str, next_tier: str | None) -> None:
    q = quote(TIERED, Method.CARD, D("100"), D(volume))
    assert q.tier is not None and q.tier.name == tier
    assert (q.next_tier.name if q.next_tier else None) == next_tier


def test_discount_applies_to_the_fee_and_rounds_once() -> None:
    q = quote(TIERED, Method.CARD, D("100"), D("1000"))
    assert (q.fee_before_discount, q.fee, q.saving, q.total) == (D("5.50"), D("4.95"), D("0.55"), D("104.95"))
    # the minimum fee is discounted too: 0.80 * 0.75 = 0.60
    q = quote(TIERED, Method.CARD, D("5"), D("10000"))
    assert (q.fee_before_discount, q.fee, q.saving) == (D("0.80"), D("0.60"), D("0.20"))
    # 5.5% of 15.00 is 0.825; 10% off is 0.7425 -> 0.74 (one rounding, of the exact discounted fee)
    q = quote(TIERED, Method.CARD, D("15"), D("1000"))
    assert (q.fee_before_discount, q.fee, q.saving) == (D("0.83"), D("0.74"), D("0.09"))
    q = quote(TIERED, Method.CRYPTO, D("15"), D("1000"))
    assert (q.fee_before_discount, q.fee) == (D("0.75"), D("0.68"))  # 0.675 -> 0.68 half-up


def test_cents_conversion_is_exact() -> None:
    assert to_cents(D("26375.00")) == 2637500
    assert from_cents(1583) == D("15.83")
    with pytest.raises(ArithmeticError):
        to_cents(D("0.005"))


def test_purchase_entry_is_balanced_and_uses_the_method_clearing_account() -> None:
    c = Customer(3)
    at = datetime(2027, 1, 1, tzinfo=UTC)
    entry = entries.purchase(
        c, credits=D("15"), fee=D("0.83"), method="card", expires_at=at, debt=D("0"), purchase_id="pur_x",
        payment_intent="pi_x",
    )  # fmt: skip
    assert entry.kind is EntryKind.PURCHASE
    assert entry.postings == (
        Posting(c, D("15"), NEW_LOT),
        Posting(Platform.PURCHASE_FEE_REVENUE, D("0.83")),
        Posting(Platform.STRIPE_CLEARING, D("-15.83")),
    )
    assert entry.new_lot is not None and entry.new_lot.category is LotCategory.PAID
    assert entry.credits_delta == D("15") and entry.new_lot.expires_at == at
    crypto = entries.purchase(
        c, credits=D("5"), fee=D("0.25"), method="crypto", expires_at=at, debt=D("-2"), purchase_id="pur_y",
        payment_intent="pi_y",
    )  # fmt: skip
    assert Posting(Platform.CRYPTO_CLEARING, D("-5.25")) in crypto.postings
    # existing debt is paid from the new lot, inside the customer's account
    assert Posting(c, D("-2"), NEW_LOT) in crypto.postings and Posting(c, D("2"), None) in crypto.postings
    assert crypto.balance_delta == D("5")
