"""Tables. Internal: the API speaks msgspec Structs (billing/*/schemas.py), never these.

Money columns are NUMERIC(38,12): exact, 1e-12 USD resolution, and sums of them stay exact.
"""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Computed,
    Date,
    ForeignKey,
    ForeignKeyConstraint,
    Identity,
    Index,
    Integer,
    MetaData,
    Numeric,
    PrimaryKeyConstraint,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, TIMESTAMP
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

MONEY = Numeric(38, 12, asdecimal=True)
TS = TIMESTAMP(timezone=True)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class AccountRow(Base):
    """The chart of accounts: customers (user, organization) and the platform's own accounts."""

    __tablename__ = "accounts"
    __table_args__ = (
        CheckConstraint("kind IN ('user', 'organization', 'platform')", name="kind"),
        CheckConstraint("type IN ('asset', 'liability', 'revenue', 'expense', 'equity')", name="type"),
        CheckConstraint("(kind = 'platform') = (external_id IS NULL)", name="external_id_for_customers"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    public_id: Mapped[str] = mapped_column(Text, unique=True)
    kind: Mapped[str] = mapped_column(Text)
    type: Mapped[str] = mapped_column(Text)
    external_id: Mapped[str | None] = mapped_column(Text, unique=True)
    name: Mapped[str | None] = mapped_column(Text)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSONB, server_default=text("'{}'::jsonb"))
    created_at: Mapped[datetime] = mapped_column(TS, server_default=text("now()"))
    # Enterprise accounts get the larger monthly BYOK allowance.
    enterprise: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))


class BalanceRow(Base):
    """Cached totals of one customer account, updated in the same transaction as its postings.

    Platform accounts have none on purpose: they are only appended to, so no platform row is hot.
    """

    __tablename__ = "balances"

    account_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("accounts.id"), primary_key=True)
    balance: Mapped[Decimal] = mapped_column(MONEY, server_default=text("0"))
    total_credits: Mapped[Decimal] = mapped_column(MONEY, server_default=text("0"))
    total_usage: Mapped[Decimal] = mapped_column(MONEY, server_default=text("0"))
    # What was paid for in total (`Entry.purchased_delta`, migration 0022): the free-model quota's threshold.
    purchased: Mapped[Decimal] = mapped_column(MONEY, server_default=text("0"))
    updated_at: Mapped[datetime] = mapped_column(TS, server_default=text("now()"))


class JournalEntryRow(Base):
    __tablename__ = "journal_entries"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    kind: Mapped[str] = mapped_column(Text)
    account_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("accounts.id"))
    posted_at: Mapped[datetime] = mapped_column(TS, server_default=text("clock_timestamp()"))
    description: Mapped[str] = mapped_column(Text, server_default=text("''"))
    actor: Mapped[str | None] = mapped_column(Text)
    reason: Mapped[str | None] = mapped_column(Text)
    reverses_entry_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("journal_entries.id"))
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSONB, server_default=text("'{}'::jsonb"))


class LotRow(Base):
    """A batch of credits. `remaining` caches the sum of the lot's postings (checked by verify)."""

    __tablename__ = "lots"
    __table_args__ = (
        CheckConstraint("category IN ('paid', 'promotional', 'compensation')", name="category"),
        CheckConstraint("amount > 0", name="amount_positive"),
        CheckConstraint("remaining >= 0 AND remaining <= amount", name="remaining_within_amount"),
        Index("ix_lots_account_id_expires_at", "account_id", "expires_at"),
        # What spending reads: only the lots with something left (migration 0020).
        Index("ix_lots_live_account_id_expires_at", "account_id", "expires_at", postgresql_where=text("live")),
        UniqueConstraint("id", "account_id", name="uq_lots_id_account_id"),  # postings' lot is their account's
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    account_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("accounts.id"))
    category: Mapped[str] = mapped_column(Text)
    amount: Mapped[Decimal] = mapped_column(MONEY)
    remaining: Mapped[Decimal] = mapped_column(MONEY)
    # `remaining > 0`, kept by PostgreSQL; indexed instead of `remaining` so a charge's update stays HOT.
    live: Mapped[bool] = mapped_column(Boolean, Computed("remaining > 0", persisted=True))
    expires_at: Mapped[datetime] = mapped_column(TS)
    entry_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("journal_entries.id"))
    created_at: Mapped[datetime] = mapped_column(TS, server_default=text("clock_timestamp()"))


class PostingRow(Base):
    """One signed amount (positive = credit) on one account. Append-only, enforced by triggers."""

    __tablename__ = "postings"
    __table_args__ = (
        CheckConstraint("amount <> 0", name="amount_nonzero"),
        Index("ix_postings_account_id_id", "account_id", "id"),
        Index("ix_postings_entry_id", "entry_id"),
        # A posting names only a lot of its own account (migration 0017).
        ForeignKeyConstraint(
            ["lot_id", "account_id"], ["lots.id", "lots.account_id"], name="fk_postings_lot_id_account_id_lots"
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    entry_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("journal_entries.id"))
    account_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("accounts.id"))
    lot_id: Mapped[int | None] = mapped_column(BigInteger)
    amount: Mapped[Decimal] = mapped_column(MONEY)
    # Running balance of a customer account right after this posting; NULL on platform accounts.
    balance_after: Mapped[Decimal | None] = mapped_column(MONEY)
    posted_at: Mapped[datetime] = mapped_column(TS, server_default=text("clock_timestamp()"))


class IdempotencyKeyRow(Base):
    """The first outcome of every money-moving request, replayed for retries with the same key."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (PrimaryKeyConstraint("scope", "key"),)

    scope: Mapped[str] = mapped_column(Text)
    key: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[str] = mapped_column(Text)
    method: Mapped[str] = mapped_column(Text)
    path: Mapped[str] = mapped_column(Text)
    status_code: Mapped[int | None] = mapped_column(Integer)
    response: Mapped[Any | None] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(TS, server_default=text("now()"))


class ApiTokenRow(Base):
    """Bearer tokens. Only a SHA-256 of the secret is stored; the secret is shown once, at minting."""

    __tablename__ = "api_tokens"
    __table_args__ = (
        CheckConstraint(
            "scopes <@ ARRAY['admin', 'support', 'gateway', 'account']::text[] AND cardinality(scopes) > 0",
            name="scopes_known",
        ),
        CheckConstraint("('account' = ANY(scopes)) = (account_id IS NOT NULL)", name="account_scope"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    public_id: Mapped[str] = mapped_column(Text, unique=True)
    token_hash: Mapped[str] = mapped_column(Text, unique=True)
    name: Mapped[str] = mapped_column(Text)
    scopes: Mapped[list[str]] = mapped_column(ARRAY(Text))
    account_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("accounts.id"))
    created_by: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(TS, server_default=text("now()"))
    expires_at: Mapped[datetime | None] = mapped_column(TS)
    revoked_at: Mapped[datetime | None] = mapped_column(TS)


class AuditLogRow(Base):
    """Who did what to whose money, and why. Append-only."""

    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_account_id_id", "account_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    at: Mapped[datetime] = mapped_column(TS, server_default=text("clock_timestamp()"))
    actor: Mapped[str] = mapped_column(Text)
    action: Mapped[str] = mapped_column(Text)
    account_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("accounts.id"))
    entry_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("journal_entries.id"))
    reason: Mapped[str | None] = mapped_column(Text)
    details: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))


__all__ = [
    "AccountRow",
    "ApiTokenRow",
    "AuditLogRow",
    "BalanceRow",
    "Base",
    "IdempotencyKeyRow",
    "JournalEntryRow",
    "LotRow",
    "PostingRow",
]


def _money_counter() -> Mapped[Decimal]:
    return mapped_column(MONEY, server_default=text("0"))


class ApiKeyRow(Base):
    """A customer's API key at the gateway: optional credit limit with a reset period, and usage counters
    per period (each counter belongs to the period that starts on its `*_start` date, UTC).
    """

    __tablename__ = "api_keys"
    __table_args__ = (
        CheckConstraint("limit_reset IN ('daily', 'weekly', 'monthly')", name="limit_reset"),
        CheckConstraint('"limit" IS NULL OR "limit" >= 0', name="limit_nonnegative"),
        Index("ix_api_keys_account_id", "account_id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    public_id: Mapped[str] = mapped_column(Text, unique=True)
    account_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("accounts.id"))
    member_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("accounts.id"))
    name: Mapped[str] = mapped_column(Text)
    limit: Mapped[Decimal | None] = mapped_column(MONEY)
    limit_reset: Mapped[str | None] = mapped_column(Text)
    include_byok_in_limit: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    disabled: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    expires_at: Mapped[datetime | None] = mapped_column(TS)
    deleted_at: Mapped[datetime | None] = mapped_column(TS)
    created_at: Mapped[datetime] = mapped_column(TS, server_default=text("now()"))
    usage_total: Mapped[Decimal] = _money_counter()
    byok_total: Mapped[Decimal] = _money_counter()
    day_start: Mapped[date | None] = mapped_column(Date)
    usage_day: Mapped[Decimal] = _money_counter()
    byok_day: Mapped[Decimal] = _money_counter()
    week_start: Mapped[date | None] = mapped_column(Date)
    usage_week: Mapped[Decimal] = _money_counter()
    byok_week: Mapped[Decimal] = _money_counter()
    month_start: Mapped[date | None] = mapped_column(Date)
    usage_month: Mapped[Decimal] = _money_counter()
    byok_month: Mapped[Decimal] = _money_counter()


class HoldRow(Base):
    """A reservation of up to `amount` for one gateway request (two-phase: open → captured | released |
    expired). `refused` rows remember a 402 so a retry of the same request id is refused the same way.
    """

    __tablename__ = "holds"
    __table_args__ = (
        CheckConstraint("status IN ('open', 'captured', 'released', 'expired', 'refused')", name="status"),
        CheckConstraint("amount > 0", name="amount_positive"),
        UniqueConstraint("account_id", "request_id", name="uq_holds_account_id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    account_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("accounts.id"))
    key_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("api_keys.id"))
    request_id: Mapped[str] = mapped_column(Text)
    amount: Mapped[Decimal] = mapped_column(MONEY)
    status: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(TS, server_default=text("now()"))
    expires_at: Mapped[datetime] = mapped_column(TS)
    resolved_at: Mapped[datetime | None] = mapped_column(TS)
    resolution: Mapped[Any | None] = mapped_column(JSONB)


class OpenHoldRow(Base):
    """A hold while it is open, kept by the database from `holds` (triggers of migration 0019): inserted with
    the hold, deleted when it resolves. What reads open holds reads this small table, which only holds what
    is open, never the history of every hold.
    """

    __tablename__ = "open_holds"
    __table_args__ = (
        # The payer's open holds not yet expired, one index range (migration 0021 says why both columns)
        Index("ix_open_holds_account_id_expires_at", "account_id", "expires_at"),
        Index("ix_open_holds_key_id_expires_at", "key_id", "expires_at", postgresql_where=text("key_id IS NOT NULL")),
        Index("ix_open_holds_expires_at", "expires_at"),
    )

    hold_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    account_id: Mapped[int] = mapped_column(BigInteger)
    key_id: Mapped[int | None] = mapped_column(BigInteger)
    amount: Mapped[Decimal] = mapped_column(MONEY)
    created_at: Mapped[datetime] = mapped_column(TS)
    expires_at: Mapped[datetime] = mapped_column(TS)


class ByokFeePolicyRow(Base):
    """Versioned BYOK fee rules: the policy in force is the newest with `effective_from` <= the request."""

    __tablename__ = "byok_fee_policies"
    __table_args__ = (CheckConstraint("kind IN ('allowance_usd', 'free_requests')", name="kind"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    kind: Mapped[str] = mapped_column(Text)
    allowance_usd: Mapped[Decimal | None] = mapped_column(MONEY)
    enterprise_allowance_usd: Mapped[Decimal | None] = mapped_column(MONEY)
    free_requests: Mapped[int | None] = mapped_column(BigInteger)
    rate: Mapped[Decimal] = mapped_column(Numeric(10, 6))
    effective_from: Mapped[datetime] = mapped_column(TS)
    created_at: Mapped[datetime] = mapped_column(TS, server_default=text("now()"))


class ByokMonthRow(Base):
    """An account's BYOK usage in one UTC calendar month: list-price usage, requests, fees charged."""

    __tablename__ = "byok_months"
    __table_args__ = (PrimaryKeyConstraint("account_id", "month"),)

    account_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("accounts.id"))
    month: Mapped[date] = mapped_column(Date)
    list_usage: Mapped[Decimal] = _money_counter()
    requests: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    fees: Mapped[Decimal] = _money_counter()


class GenerationRow(Base):
    """What one model request cost and why: the record the gateway reads back by `generation_id`."""

    __tablename__ = "generations"
    __table_args__ = (
        CheckConstraint("status IN ('charged', 'refused')", name="status"),
        Index("ix_generations_account_id_id", "account_id", "id"),
        # the BYOK fee reconciliation's month scans (billing/jobs/byok.py); only BYOK rows are indexed
        Index("ix_generations_byok_created_at", "created_at", postgresql_where=text("is_byok AND status = 'charged'")),
        Index(
            "ix_generations_byok_account_created_at",
            "account_id",
            "created_at",
            postgresql_where=text("is_byok AND status = 'charged'"),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    generation_id: Mapped[str] = mapped_column(Text, unique=True)
    account_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("accounts.id"))
    key_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("api_keys.id"))
    member_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("accounts.id"))
    hold_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("holds.id"))
    entry_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("journal_entries.id"))
    status: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[str] = mapped_column(Text)
    model: Mapped[str | None] = mapped_column(Text)
    provider: Mapped[str | None] = mapped_column(Text)
    total_cost: Mapped[Decimal] = mapped_column(MONEY)
    upstream_inference_cost: Mapped[Decimal | None] = mapped_column(MONEY)
    cache_discount: Mapped[Decimal | None] = mapped_column(MONEY)
    is_byok: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    byok_list_cost: Mapped[Decimal | None] = mapped_column(MONEY)
    byok_fee: Mapped[Decimal | None] = mapped_column(MONEY)
    byok_policy_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("byok_fee_policies.id"))
    usage: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    finish_reason: Mapped[str | None] = mapped_column(Text)
    cancelled: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    streamed: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    refusal: Mapped[Any | None] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(TS, server_default=text("now()"))


RATE = Numeric(10, 6, asdecimal=True)


class PricingVersionRow(Base):
    """Purchase-fee rules, versioned: the version in force is the newest with `effective_from` <= now, and
    every purchase records the version that priced it."""

    __tablename__ = "pricing_versions"
    __table_args__ = (
        CheckConstraint("card_rate >= 0 AND card_rate < 1 AND crypto_rate >= 0 AND crypto_rate < 1", name="rates"),
        CheckConstraint("min_purchase > 0 AND max_purchase >= min_purchase", name="purchase_bounds"),
        CheckConstraint("card_minimum >= 0 AND crypto_minimum >= 0", name="minimums"),
        CheckConstraint("volume_window_days > 0", name="window"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    effective_from: Mapped[datetime] = mapped_column(TS)
    card_rate: Mapped[Decimal] = mapped_column(RATE)
    card_minimum: Mapped[Decimal] = mapped_column(MONEY)
    crypto_rate: Mapped[Decimal] = mapped_column(RATE)
    crypto_minimum: Mapped[Decimal] = mapped_column(MONEY)
    min_purchase: Mapped[Decimal] = mapped_column(MONEY)
    max_purchase: Mapped[Decimal] = mapped_column(MONEY)
    volume_window_days: Mapped[int] = mapped_column(Integer)
    created_by: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(TS, server_default=text("now()"))


class DiscountTierRow(Base):
    """A volume-discount tier of one pricing version: from `min_volume` of trailing purchases, this fraction
    of the purchase fee is waived."""

    __tablename__ = "discount_tiers"
    __table_args__ = (
        CheckConstraint("min_volume >= 0", name="min_volume"),
        CheckConstraint("fee_discount >= 0 AND fee_discount <= 1", name="fee_discount"),
        UniqueConstraint("pricing_version_id", "min_volume", name="uq_discount_tiers_pricing_version_id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    pricing_version_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("pricing_versions.id"))
    name: Mapped[str] = mapped_column(Text)
    min_volume: Mapped[Decimal] = mapped_column(MONEY)
    fee_discount: Mapped[Decimal] = mapped_column(RATE)


class PurchaseRow(Base):
    """A purchase of credits: priced when created (amounts, fee, discount, pricing version), paid through a
    Stripe PaymentIntent, credited once (`entry_id`, `lot_id`) when the payment succeeds."""

    __tablename__ = "purchases"
    __table_args__ = (
        CheckConstraint("method IN ('card', 'crypto')", name="method"),
        CheckConstraint("status IN ('pending', 'succeeded', 'failed', 'needs_review')", name="status"),
        CheckConstraint("amount > 0 AND fee >= 0 AND fee <= fee_before_discount", name="amounts"),
        CheckConstraint("total = amount + fee", name="total"),
        CheckConstraint("(status = 'succeeded') = (entry_id IS NOT NULL AND paid_at IS NOT NULL)", name="credited"),
        Index("ix_purchases_account_id_id", "account_id", "id"),
        Index("ix_purchases_volume", "account_id", "paid_at", postgresql_where=text("status = 'succeeded'")),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    public_id: Mapped[str] = mapped_column(Text, unique=True)
    account_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("accounts.id"))
    method: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text)
    amount: Mapped[Decimal] = mapped_column(MONEY)
    fee: Mapped[Decimal] = mapped_column(MONEY)
    fee_before_discount: Mapped[Decimal] = mapped_column(MONEY)
    discount_tier: Mapped[str | None] = mapped_column(Text)
    fee_discount: Mapped[Decimal] = mapped_column(RATE)
    total: Mapped[Decimal] = mapped_column(MONEY)
    pricing_version_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("pricing_versions.id"))
    payment_intent: Mapped[str | None] = mapped_column(Text, unique=True)
    checkout_session: Mapped[str | None] = mapped_column(Text, unique=True)
    entry_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("journal_entries.id"))
    lot_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("lots.id"))
    failure_code: Mapped[str | None] = mapped_column(Text)
    failure_message: Mapped[str | None] = mapped_column(Text)
    review_reason: Mapped[str | None] = mapped_column(Text)
    created_by: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(TS, server_default=text("now()"))
    paid_at: Mapped[datetime | None] = mapped_column(TS)
    updated_at: Mapped[datetime] = mapped_column(TS, server_default=text("now()"))


class FulfilmentRow(Base):
    """One row per credited payment, written in the same statement as its journal entry: the primary key on
    the PaymentIntent is what makes 'credited exactly once' a database fact, whoever calls."""

    __tablename__ = "fulfilments"
    __table_args__ = (Index("ix_fulfilments_created_at", "created_at"),)  # the reconciler's window (migration 0023)

    payment_intent: Mapped[str] = mapped_column(Text, primary_key=True)
    purchase_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("purchases.id"), unique=True)
    entry_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("journal_entries.id"), unique=True)
    amount_cents: Mapped[int] = mapped_column(BigInteger)
    source: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(TS, server_default=text("clock_timestamp()"))


class StripeEventRow(Base):
    """Every verified Stripe event, once (its id is the key): what it was and what handling it did."""

    __tablename__ = "stripe_events"
    __table_args__ = (
        CheckConstraint("status IN ('processed', 'ignored', 'needs_review')", name="status"),
        Index("ix_stripe_events_needs_review", "received_at", postgresql_where=text("status = 'needs_review'")),
    )

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    type: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text)
    outcome: Mapped[str] = mapped_column(Text)
    purchase_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("purchases.id"))
    payload: Mapped[Any] = mapped_column(JSONB)
    received_at: Mapped[datetime] = mapped_column(TS, server_default=text("clock_timestamp()"))


class RefundRow(Base):
    """Money given back for a purchase, one journal entry each: `amount` of credits taken back and
    `fee_amount` of fee revenue reversed (only ever by a refund Stripe reports, never by the API). A refund
    that fails at Stripe stays, marked, beside the entry that reversed it."""

    __tablename__ = "refunds"
    __table_args__ = (
        CheckConstraint("source IN ('api', 'stripe')", name="source"),
        CheckConstraint("amount >= 0 AND fee_amount >= 0 AND amount_cents > 0", name="amounts"),
        CheckConstraint("amount_cents = (amount + fee_amount) * 100", name="cents"),
        CheckConstraint("status IN ('succeeded', 'failed', 'canceled')", name="status"),
        CheckConstraint("(status = 'succeeded') = (reversal_entry_id IS NULL AND failed_at IS NULL)", name="reversed"),
        CheckConstraint("(source = 'stripe') = (reported_at IS NOT NULL)", name="reported"),
        CheckConstraint("source <> 'api' OR stripe_refund IS NOT NULL", name="api_names_stripe_refund"),
        Index("ix_refunds_purchase_id", "purchase_id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    public_id: Mapped[str] = mapped_column(Text, unique=True)
    purchase_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("purchases.id"))
    account_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("accounts.id"))
    amount: Mapped[Decimal] = mapped_column(MONEY)
    fee_amount: Mapped[Decimal] = mapped_column(MONEY, server_default=text("0"))
    amount_cents: Mapped[int] = mapped_column(BigInteger)
    source: Mapped[str] = mapped_column(Text)
    stripe_refund: Mapped[str | None] = mapped_column(Text, unique=True)
    entry_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("journal_entries.id"), unique=True)
    reason: Mapped[str | None] = mapped_column(Text)
    created_by: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(TS, server_default=text("clock_timestamp()"))
    # A refund Stripe could not complete (`failed`) or called off (`canceled`): its credits were put back by
    # `reversal_entry_id`, a reversal of `entry_id`, once.
    status: Mapped[str] = mapped_column(Text, server_default=text("'succeeded'"))
    failure_reason: Mapped[str | None] = mapped_column(Text)
    failed_at: Mapped[datetime | None] = mapped_column(TS)
    reversal_entry_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("journal_entries.id"), unique=True)
    # A Stripe refund is booked once (`stripe_refund` is unique; the API always sets it). A booking from
    # `charge.refunded` carries the event's `created`: only one made after a refund can hold that refund.
    reported_at: Mapped[datetime | None] = mapped_column(TS)


class DisputeRow(Base):
    """A chargeback of a purchase, once per Stripe dispute: the clawback entry posted when it opened, and
    the entry that gave the credits back if it was won."""

    __tablename__ = "disputes"
    __table_args__ = (
        CheckConstraint("status IN ('open', 'won', 'lost')", name="status"),
        CheckConstraint("amount >= 0 AND fee_amount >= 0 AND amount + fee_amount > 0", name="amounts"),
        CheckConstraint("(status = 'won') = (reinstated_entry_id IS NOT NULL)", name="reinstated"),
        Index("ix_disputes_purchase_id", "purchase_id"),
        # every account read asks whether it has a dispute not won (`flagged`; migration 0024)
        Index("ix_disputes_account_id_not_won", "account_id", postgresql_where=text("status <> 'won'")),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    stripe_dispute: Mapped[str] = mapped_column(Text, unique=True)
    purchase_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("purchases.id"))
    account_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("accounts.id"))
    amount: Mapped[Decimal] = mapped_column(MONEY)
    fee_amount: Mapped[Decimal] = mapped_column(MONEY)
    status: Mapped[str] = mapped_column(Text)
    reason: Mapped[str | None] = mapped_column(Text)
    entry_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("journal_entries.id"), unique=True)
    reinstated_entry_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("journal_entries.id"), unique=True)
    created_at: Mapped[datetime] = mapped_column(TS, server_default=text("clock_timestamp()"))
    closed_at: Mapped[datetime | None] = mapped_column(TS)


class OrganizationMemberRow(Base):
    """A user account's membership of an organization account. `admin` members may buy (and refund) credits
    for the organization with their own account token; `member`s only spend through keys naming them. That
    the organization is an `organization` and the member a `user` is checked in code (billing/organizations)."""

    __tablename__ = "organization_members"
    __table_args__ = (
        PrimaryKeyConstraint("organization_id", "member_id"),
        CheckConstraint("role IN ('admin', 'member')", name="role"),
        Index("ix_organization_members_member_id", "member_id"),
    )

    organization_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("accounts.id"))
    member_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("accounts.id"))
    role: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(TS, server_default=text("now()"))


class ReconcileRunRow(Base):
    """One run of the missing-credit reconciler: its window, what it counted, found and repaired."""

    __tablename__ = "reconcile_runs"
    __table_args__ = (
        CheckConstraint(
            "seen >= 0 AND young >= 0 AND already_credited >= 0 AND credited >= 0 AND needs_review >= 0"
            " AND unpaid_credits >= 0 AND amount_mismatches >= 0",
            name="counts",
        ),
        Index("ix_reconcile_runs_started_at", "started_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    started_at: Mapped[datetime] = mapped_column(TS)
    finished_at: Mapped[datetime] = mapped_column(TS)
    window_start: Mapped[datetime] = mapped_column(TS)
    window_end: Mapped[datetime] = mapped_column(TS)
    source: Mapped[str] = mapped_column(Text)
    seen: Mapped[int] = mapped_column(Integer)
    young: Mapped[int] = mapped_column(Integer)
    already_credited: Mapped[int] = mapped_column(Integer)
    credited: Mapped[int] = mapped_column(Integer)
    needs_review: Mapped[int] = mapped_column(Integer)
    unpaid_credits: Mapped[int] = mapped_column(Integer)
    amount_mismatches: Mapped[int] = mapped_column(Integer)
    findings: Mapped[Any] = mapped_column(JSONB)


class SupportTicketRow(Base):
    """A "my credits haven't shown up" ticket: the payment asked about (a PaymentIntent, a Checkout Session,
    or a time window), what Stripe and the ledger showed, how it was resolved, by whom and when."""

    __tablename__ = "support_tickets"
    __table_args__ = (
        CheckConstraint(
            "status IN ('credited', 'already_credited', 'not_paid', 'wrong_account', 'needs_review')", name="status"
        ),
        CheckConstraint(
            "(payment_intent IS NOT NULL)::int + (checkout_session IS NOT NULL)::int"
            " + (window_start IS NOT NULL)::int = 1",
            name="one_reference",
        ),
        CheckConstraint("(window_start IS NULL) = (window_end IS NULL) AND window_start < window_end", name="window"),
        Index("ix_support_tickets_status", "status", "id"),
        Index("ix_support_tickets_account_id", "account_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    account_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("accounts.id"))
    payment_intent: Mapped[str | None] = mapped_column(Text)
    checkout_session: Mapped[str | None] = mapped_column(Text)
    window_start: Mapped[datetime | None] = mapped_column(TS)
    window_end: Mapped[datetime | None] = mapped_column(TS)
    note: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text)
    resolution: Mapped[str] = mapped_column(Text)
    findings: Mapped[Any] = mapped_column(JSONB)
    purchase_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("purchases.id"))
    entry_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("journal_entries.id"))
    created_by: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(TS, server_default=text("clock_timestamp()"))
    resolved_at: Mapped[datetime] = mapped_column(TS)


class ByokCorrectionRow(Base):
    """A correcting entry the BYOK reconciliation posted for one account-month: `amount` is signed (more
    fee owed > 0, fee given back < 0), `expected` and `charged` the month's fees it found before it."""

    __tablename__ = "byok_corrections"
    __table_args__ = (
        CheckConstraint("amount <> 0", name="amount"),
        Index("ix_byok_corrections_account_id_month", "account_id", "month"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    account_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("accounts.id"))
    month: Mapped[date] = mapped_column(Date)
    amount: Mapped[Decimal] = mapped_column(MONEY)
    entry_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("journal_entries.id"), unique=True)
    expected: Mapped[Decimal] = mapped_column(MONEY)
    charged: Mapped[Decimal] = mapped_column(MONEY)
    created_at: Mapped[datetime] = mapped_column(TS, server_default=text("now()"))


class ByokMonthClosingRow(Base):
    """An account's BYOK month, closed once after it ended: never reconciled again. `entry_id` is the
    correction the closing run posted, if any."""

    __tablename__ = "byok_month_closings"
    __table_args__ = (PrimaryKeyConstraint("account_id", "month"),)

    account_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("accounts.id"))
    month: Mapped[date] = mapped_column(Date)
    closed_at: Mapped[datetime] = mapped_column(TS)
    entry_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("journal_entries.id"))


class AutoTopupRow(Base):
    """An account's auto top-up: when its balance is below `threshold`, buy `amount` off-session with the
    saved card. `declines` counts consecutive declines; at 3 it is disabled with `disabled_reason`, as it is
    when the pricing in force refuses `amount`. A Stripe customer belongs to one account: no two auto
    top-ups name the same `stripe_customer` (SPEC §7: a token never moves another account's money)."""

    __tablename__ = "auto_topups"
    __table_args__ = (Index("uq_auto_topups_stripe_customer", "stripe_customer", unique=True),)

    account_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("accounts.id"), primary_key=True)
    enabled: Mapped[bool] = mapped_column(Boolean)
    threshold: Mapped[Decimal] = mapped_column(MONEY)
    amount: Mapped[Decimal] = mapped_column(MONEY)
    stripe_customer: Mapped[str] = mapped_column(Text)
    payment_method: Mapped[str] = mapped_column(Text)
    monthly_cap: Mapped[Decimal | None] = mapped_column(MONEY)
    cooldown_seconds: Mapped[int] = mapped_column(Integer)
    declines: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    disabled_reason: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[datetime | None] = mapped_column(TS)
    updated_at: Mapped[datetime] = mapped_column(TS, server_default=text("now()"))


class AutoTopupAttemptRow(Base):
    """One auto top-up payment tried; the partial unique index keeps at most one `pending` per account."""

    __tablename__ = "auto_topup_attempts"
    __table_args__ = (
        CheckConstraint("status IN ('pending', 'succeeded', 'declined', 'failed')", name="status"),
        Index("uq_auto_topup_attempts_pending", "account_id", unique=True, postgresql_where=text("status = 'pending'")),
        Index("ix_auto_topup_attempts_account_id", "account_id", "id"),
        # what the account's top-ups took since the month began, for its monthly cap (migration 0024)
        Index("ix_auto_topup_attempts_account_id_created_at", "account_id", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    account_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("accounts.id"))
    status: Mapped[str] = mapped_column(Text)
    amount: Mapped[Decimal] = mapped_column(MONEY)
    purchase_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("purchases.id"))
    payment_intent: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(TS, server_default=text("now()"))
