"""Purchase fees and volume discounts as pure functions over one pricing version (SPEC §5). No I/O.

Rounding rule: Stripe charges integer cents, so
- the purchase `amount` is the credits bought, exactly: it must be whole cents (no rounding, ever);
- the fee is computed exactly — max(amount × rate, minimum), then × (1 − tier discount) — and rounded
  once, half-up, to the cent; the undiscounted fee is rounded the same way and the saving is the
  difference of the two rounded fees;
- the customer is charged `total = amount + fee`, whole cents, so nothing is left to book as rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from enum import StrEnum

from billing.ledger import outcomes
from billing.ledger.money import ZERO, format_money
from billing.ledger.outcomes import Refused

CENT = Decimal("0.01")


class Method(StrEnum):
    CARD = "card"
    CRYPTO = "crypto"


@dataclass(frozen=True, slots=True)
class Tier:
    """From `min_volume` of trailing purchases, `fee_discount` (a fraction) of the purchase fee is waived."""

    name: str
    min_volume: Decimal
    fee_discount: Decimal


@dataclass(frozen=True, slots=True)
class Pricing:
    """One version of the purchase rules."""

    version_id: int
    effective_from: datetime
    card_rate: Decimal
    card_minimum: Decimal
    crypto_rate: Decimal
    crypto_minimum: Decimal
    min_purchase: Decimal
    max_purchase: Decimal
    volume_window_days: int
    tiers: tuple[Tier, ...]

    def rate(self, method: Method) -> Decimal:
        return self.card_rate if method is Method.CARD else self.crypto_rate

    def minimum(self, method: Method) -> Decimal:
        return self.card_minimum if method is Method.CARD else self.crypto_minimum

    def tier_for(self, volume: Decimal) -> tuple[Tier | None, Tier | None]:
        """The tier reached by `volume` (the highest whose minimum it meets) and the next one up."""
        current: Tier | None = None
        following: Tier | None = None
        for tier in sorted(self.tiers, key=lambda t: t.min_volume):
            if tier.min_volume <= volume:
                current = tier
            elif following is None:
                following = tier
        return current, following


@dataclass(frozen=True, slots=True)
class Quote:
    method: Method
    credits: Decimal
    fee_before_discount: Decimal
    fee: Decimal
    tier: Tier | None
    next_tier: Tier | None
    volume: Decimal
    pricing: Pricing

    @property
    def saving(self) -> Decimal:
        return self.fee_before_discount - self.fee

    @property
    def total(self) -> Decimal:
        """What the customer is charged: credits plus the fee, whole cents."""
        return self.credits + self.fee

    @property
    def total_cents(self) -> int:
        return to_cents(self.total)

    @property
    def fee_discount(self) -> Decimal:
        return self.tier.fee_discount if self.tier else ZERO


def round_half_up_cents(value: Decimal) -> Decimal:
    return value.quantize(CENT, rounding=ROUND_HALF_UP)


def is_whole_cents(value: Decimal) -> bool:
    return value == value.quantize(CENT)


def to_cents(value: Decimal) -> int:
    """Dollars to Stripe's integer cents, exactly; raises rather than rounding."""
    cents = value * 100
    if cents != cents.to_integral_value():
        raise ArithmeticError(f"{value} is not a whole number of cents")
    return int(cents)


def from_cents(cents: int) -> Decimal:
    return Decimal(cents).scaleb(-2)


def quote(pricing: Pricing, method: Method, amount: Decimal, volume: Decimal) -> Quote:
    """Price a purchase of `amount` credits for an account with `volume` of trailing purchases.

    Refusals, in this order: not positive, not whole cents, below the minimum, above the maximum.
    """
    if amount <= 0:
        raise Refused(outcomes.AMOUNT_MUST_BE_POSITIVE, "A purchase must be a positive amount.")
    if not is_whole_cents(amount):
        raise Refused(
            outcomes.AMOUNT_NOT_WHOLE_CENTS, "A purchase is charged in whole cents: `amount` has at most 2 decimals."
        )
    if amount < pricing.min_purchase:
        raise Refused(
            outcomes.PURCHASE_BELOW_MINIMUM,
            f"The smallest purchase is {format_money(pricing.min_purchase)} USD.",
            minimum=format_money(pricing.min_purchase),
        )
    if amount > pricing.max_purchase:
        raise Refused(
            outcomes.PURCHASE_ABOVE_MAXIMUM,
            f"The largest purchase is {format_money(pricing.max_purchase)} USD.",
            maximum=format_money(pricing.max_purchase),
        )
    tier, next_tier = pricing.tier_for(volume)
    exact = max(amount * pricing.rate(method), pricing.minimum(method))
    discount = tier.fee_discount if tier else ZERO
    return Quote(
        method=method,
        credits=amount,
        fee_before_discount=round_half_up_cents(exact),
        fee=round_half_up_cents(exact * (1 - discount)),
        tier=tier,
        next_tier=next_tier,
        volume=volume,
        pricing=pricing,
    )
