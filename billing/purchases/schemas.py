"""The purchases API contract: quotes, purchases, pricing versions."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

from billing.schemas import MoneyStr, Reason, StaffReason

MethodField = Annotated[
    Literal["card", "crypto"],
    msgspec.Meta(description="`card` (Stripe, 5.5% fee, $0.80 minimum) or `crypto` (Stripe, 5%, never refundable)."),
]
RateStr = Annotated[str, msgspec.Meta(description='A fraction as a decimal string, e.g. "0.055" for 5.5%.')]


class CreateQuote(msgspec.Struct, forbid_unknown_fields=True):
    amount: MoneyStr
    method: MethodField = "card"


class CreatePurchase(msgspec.Struct, forbid_unknown_fields=True):
    amount: MoneyStr
    method: MethodField = "card"


class TierOut(msgspec.Struct):
    name: str
    min_volume: str
    fee_discount: str


class NextTier(msgspec.Struct):
    name: str
    min_volume: str
    fee_discount: str
    volume_needed: str


class Discount(msgspec.Struct):
    """The account's volume-discount tier (from its trailing purchases) and what it saves on this fee."""

    tier: TierOut | None
    saving: str
    trailing_volume: str
    window_days: int
    next_tier: NextTier | None


class Quote(msgspec.Struct):
    account: str
    method: str
    amount: str
    credits: str
    fee: str
    fee_before_discount: str
    discount: Discount
    total: str
    total_cents: int
    currency: str
    pricing_version: str
    object: str = "quote"


class LotLeft(msgspec.Struct):
    id: str
    amount: str
    remaining: str
    expires_at: datetime
    expired: bool


class RefundOut(msgspec.Struct):
    """Money given back for a purchase: `amount` of credits taken back, `fee_amount` of fee returned (only
    when Stripe reports a refund that included it), `source` `api` or `stripe` (e.g. its dashboard). A refund
    that failed at Stripe stays listed, `failed` or `canceled`, and no longer counts in `refunded`."""

    id: str
    purchase: str
    amount: str
    fee_amount: str
    total: str
    source: str
    stripe_refund: str | None
    entry: str
    reason: str | None
    created_at: datetime
    status: str = "succeeded"  # `failed` or `canceled` when Stripe could not complete it: credits put back
    failure_reason: str | None = None
    reversal_entry: str | None = None  # the entry that put the credits back
    object: str = "refund"


class CreateRefund(msgspec.Struct, forbid_unknown_fields=True):
    amount: Annotated[
        str | None, msgspec.Meta(description="Credits to refund (whole cents); default: all that is left.")
    ] = None
    reason: StaffReason | None = None


class Purchase(msgspec.Struct):
    id: str
    account: str
    method: str
    status: str
    amount: str
    credits: str
    fee: str
    fee_before_discount: str
    discount_tier: str | None
    fee_discount: str
    discount_saving: str
    total: str
    currency: str
    pricing_version: str
    payment_intent: str | None
    checkout_session: str | None
    lot: LotLeft | None
    entry: str | None
    failure_code: str | None
    failure_message: str | None
    refunded: str
    refunds: list[RefundOut]
    created_at: datetime
    paid_at: datetime | None
    object: str = "purchase"


class RefundCreated(msgspec.Struct):
    refund: RefundOut
    purchase: Purchase
    object: str = "refund_created"


class CreatedPurchase(msgspec.Struct):
    """A new purchase and what a frontend needs to confirm its payment with Stripe.js."""

    purchase: Purchase
    client_secret: str
    object: str = "purchase_created"


class CreateTier(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
    min_volume: MoneyStr
    fee_discount: RateStr


class CreatePricingVersion(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    effective_from: datetime
    card_rate: RateStr = "0.055"
    card_minimum: MoneyStr = "0.80"
    crypto_rate: RateStr = "0.05"
    crypto_minimum: MoneyStr = "0"
    min_purchase: MoneyStr = "5"
    max_purchase: MoneyStr = "25000"
    volume_window_days: Annotated[int, msgspec.Meta(ge=1, le=3660)] = 30
    tiers: Annotated[list[CreateTier], msgspec.Meta(max_length=50)] = []
    reason: Reason  # kept in the audit log with the version


class PricingVersion(msgspec.Struct):
    id: str
    effective_from: datetime
    card_rate: str
    card_minimum: str
    crypto_rate: str
    crypto_minimum: str
    min_purchase: str
    max_purchase: str
    volume_window_days: int
    tiers: list[TierOut]
    created_by: str
    created_at: datetime
    object: str = "pricing_version"
