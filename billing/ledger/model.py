"""The accounting model: a handful of small immutable records. No I/O here.

Glossary
--------
account         A row of the chart of accounts. Every customer (user or organization) has exactly one
                *credits* account, a liability of the platform: the prepaid dollars we owe them in usage.
                Platform accounts (Stripe clearing, fee revenue, breakage, ...) are named by a code.
posting         One signed amount on one account. Positive = credit, negative = debit. A customer's
                balance is the sum of the postings on its credits account.
entry           A journal entry: at least two postings that sum to exactly zero, posted atomically,
                never updated or deleted. Corrections are new entries that point at what they reverse.
lot             A batch of credits with a category and an expiry (a purchase, a grant). Postings on a
                customer account name the lot they add to or consume from, so what is left of every
                lot is itself a sum of postings. Postings with no lot are debt (a negative balance).
hold            Credits reserved for one request until it is captured, released or times out. A capture
                pays from the lots that were live when its hold was created, and expiry leaves what open
                holds reserve (SPEC §5 Holds, Expiry).
credits / usage `total_credits` counts credits added (minus refunds and clawbacks), `total_usage` counts
                credits spent on usage and fees; both are kept beside the balance.
purchased       What the customer has paid for, in total (`purchased`, kept beside the balance too): the
                credits of each paid lot a payment created. It only grows (SPEC §5 Free models).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import StrEnum

from billing.ledger.money import ZERO, quantize


class AccountType(StrEnum):
    ASSET = "asset"
    LIABILITY = "liability"
    REVENUE = "revenue"
    EXPENSE = "expense"
    EQUITY = "equity"


class Platform(StrEnum):
    """The platform's own accounts. None of them is a cached balance row: they are only appended to."""

    STRIPE_CLEARING = "stripe_clearing"
    CRYPTO_CLEARING = "crypto_clearing"
    MANUAL_PAYMENTS = "manual_payments"
    PURCHASE_FEE_REVENUE = "purchase_fee_revenue"
    USAGE_REVENUE = "usage_revenue"
    BYOK_FEE_REVENUE = "byok_fee_revenue"
    PROMOTIONAL_CREDITS = "promotional_credits"
    COMPENSATION_CREDITS = "compensation_credits"
    MANUAL_ADJUSTMENTS = "manual_adjustments"
    BREAKAGE = "breakage"
    REFUNDS = "refunds"
    DISPUTES = "disputes"
    ROUNDING = "rounding"


PLATFORM_ACCOUNT_TYPES: dict[Platform, AccountType] = {
    Platform.STRIPE_CLEARING: AccountType.ASSET,
    Platform.CRYPTO_CLEARING: AccountType.ASSET,
    Platform.MANUAL_PAYMENTS: AccountType.ASSET,
    Platform.PURCHASE_FEE_REVENUE: AccountType.REVENUE,
    Platform.USAGE_REVENUE: AccountType.REVENUE,
    Platform.BYOK_FEE_REVENUE: AccountType.REVENUE,
    Platform.PROMOTIONAL_CREDITS: AccountType.EXPENSE,
    Platform.COMPENSATION_CREDITS: AccountType.EXPENSE,
    Platform.MANUAL_ADJUSTMENTS: AccountType.EXPENSE,
    Platform.BREAKAGE: AccountType.REVENUE,
    Platform.REFUNDS: AccountType.ASSET,
    Platform.DISPUTES: AccountType.ASSET,
    Platform.ROUNDING: AccountType.EXPENSE,
}


class EntryKind(StrEnum):
    GRANT = "grant"
    ADJUSTMENT = "adjustment"
    PURCHASE = "purchase"
    USAGE = "usage"
    BYOK_FEE = "byok_fee"
    REFUND = "refund"
    DISPUTE = "dispute"
    EXPIRY = "expiry"
    REVERSAL = "reversal"


class LotCategory(StrEnum):
    PAID = "paid"
    PROMOTIONAL = "promotional"
    COMPENSATION = "compensation"


@dataclass(frozen=True, slots=True)
class Customer:
    """A customer's credits account, by its internal id."""

    id: int


Account = Customer | Platform


class _NewLot:
    """Marker for 'the lot this entry creates' (its id exists only once persisted)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEW_LOT"


NEW_LOT = _NewLot()
LotRef = int | _NewLot | None


@dataclass(frozen=True, slots=True)
class Posting:
    account: Account
    amount: Decimal  # positive = credit, negative = debit
    lot: LotRef = None

    def __post_init__(self) -> None:
        if self.amount == 0:
            raise ValueError("a posting moves a non-zero amount")
        quantize(self.amount)  # raises if not exact at 1e-12
        if self.lot is not None and not isinstance(self.account, Customer):
            raise ValueError("only customer postings belong to a lot")


_PAYMENTS = (EntryKind.PURCHASE, EntryKind.GRANT)


@dataclass(frozen=True, slots=True)
class NewLot:
    category: LotCategory
    amount: Decimal
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class Entry:
    """A balanced journal entry, plus what it does to the customer's cached totals."""

    kind: EntryKind
    customer: Customer | None
    postings: tuple[Posting, ...]
    credits_delta: Decimal = ZERO
    usage_delta: Decimal = ZERO
    new_lot: NewLot | None = None
    description: str = ""
    reason: str | None = None
    actor: str | None = None
    reverses: int | None = None

    def __post_init__(self) -> None:
        if len(self.postings) < 2:
            raise ValueError("a journal entry has at least two postings")
        if sum((p.amount for p in self.postings), ZERO) != 0:
            raise ValueError("a journal entry's postings must sum to exactly zero")
        customers = {p.account for p in self.postings if isinstance(p.account, Customer)}
        if customers - ({self.customer} if self.customer else set()):
            raise ValueError("an entry touches at most one customer, the one it names")
        uses_new_lot = any(p.lot is NEW_LOT for p in self.postings)
        if uses_new_lot != (self.new_lot is not None):
            raise ValueError("postings name NEW_LOT exactly when the entry creates a lot")

    @property
    def balance_delta(self) -> Decimal:
        """What the entry does to the customer's balance."""
        return sum((p.amount for p in self.postings if isinstance(p.account, Customer)), ZERO)

    @property
    def purchased_delta(self) -> Decimal:
        """What the entry adds to what the customer has purchased in total: the credits of a `paid` lot that a
        payment created — a purchase, or a staff `paid` grant (credits paid outside Stripe). Not the `paid` lot
        of a won dispute, which gives back credits their purchase already counted, nor a positive
        adjustment's (a correction, not a payment). Refunds and disputes take nothing off: SPEC §5 asks what
        the account has purchased "in total", not what it kept."""
        lot = self.new_lot
        if lot is not None and lot.category is LotCategory.PAID and self.kind in _PAYMENTS:
            return lot.amount
        return ZERO


@dataclass(frozen=True, slots=True)
class LotBalance:
    """What is left of one lot, as the store reads it."""

    id: int
    remaining: Decimal
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class Hold:
    """An open hold as the lot rules see it: the credits it reserves, and since when (SPEC §5 Holds)."""

    amount: Decimal
    created_at: datetime
