"""Buying credits through Stripe: versioned pricing (purchase fees, volume-discount tiers), purchases,
fulfilments (one per PaymentIntent, so a payment is credited once) and received Stripe events.

Revision ID: 0003_purchases
Revises: 0002_hot_path
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003_purchases"
down_revision: str | None = "0002_hot_path"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MONEY = sa.Numeric(38, 12)
RATE = sa.Numeric(10, 6)
TS = postgresql.TIMESTAMP(timezone=True)


def upgrade() -> None:
    op.create_table(
        "pricing_versions",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("effective_from", TS, nullable=False),
        sa.Column("card_rate", RATE, nullable=False),
        sa.Column("card_minimum", MONEY, nullable=False),
        sa.Column("crypto_rate", RATE, nullable=False),
        sa.Column("crypto_minimum", MONEY, nullable=False),
        sa.Column("min_purchase", MONEY, nullable=False),
        sa.Column("max_purchase", MONEY, nullable=False),
        sa.Column("volume_window_days", sa.Integer(), nullable=False),
        sa.Column("created_by", sa.Text(), nullable=False),
        sa.Column("created_at", TS, server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint(
            "card_rate >= 0 AND card_rate < 1 AND crypto_rate >= 0 AND crypto_rate < 1",
            name="ck_pricing_versions_rates",
        ),
        sa.CheckConstraint(
            "min_purchase > 0 AND max_purchase >= min_purchase", name="ck_pricing_versions_purchase_bounds"
        ),
        sa.CheckConstraint("card_minimum >= 0 AND crypto_minimum >= 0", name="ck_pricing_versions_minimums"),
        sa.CheckConstraint("volume_window_days > 0", name="ck_pricing_versions_window"),
        sa.PrimaryKeyConstraint("id", name="pk_pricing_versions"),
    )
    op.create_table(
        "discount_tiers",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("pricing_version_id", sa.BigInteger(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("min_volume", MONEY, nullable=False),
        sa.Column("fee_discount", RATE, nullable=False),
        sa.CheckConstraint("min_volume >= 0", name="ck_discount_tiers_min_volume"),
        sa.CheckConstraint("fee_discount >= 0 AND fee_discount <= 1", name="ck_discount_tiers_fee_discount"),
        sa.ForeignKeyConstraint(
            ["pricing_version_id"],
            ["pricing_versions.id"],
            name="fk_discount_tiers_pricing_version_id_pricing_versions",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_discount_tiers"),
        sa.UniqueConstraint("pricing_version_id", "min_volume", name="uq_discount_tiers_pricing_version_id"),
    )
    # The defaults of SPEC §5: card 5.5% with a $0.80 minimum, crypto 5%, $5-$25,000, a 30-day window and
    # one tier with no discount (admins add discount tiers as a new version).
    op.execute(
        "INSERT INTO pricing_versions (effective_from, card_rate, card_minimum, crypto_rate, crypto_minimum,"
        " min_purchase, max_purchase, volume_window_days, created_by)"
        " VALUES ('2000-01-01T00:00:00Z', 0.055, 0.80, 0.05, 0, 5, 25000, 30, 'migration 0003_purchases')"
    )
    op.execute(
        "INSERT INTO discount_tiers (pricing_version_id, name, min_volume, fee_discount)"
        " SELECT id, 'standard', 0, 0 FROM pricing_versions"
    )
    op.create_table(
        "purchases",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("public_id", sa.Text(), nullable=False),
        sa.Column("account_id", sa.BigInteger(), nullable=False),
        sa.Column("method", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("amount", MONEY, nullable=False),
        sa.Column("fee", MONEY, nullable=False),
        sa.Column("fee_before_discount", MONEY, nullable=False),
        sa.Column("discount_tier", sa.Text(), nullable=True),
        sa.Column("fee_discount", RATE, nullable=False),
        sa.Column("total", MONEY, nullable=False),
        sa.Column("pricing_version_id", sa.BigInteger(), nullable=False),
        sa.Column("payment_intent", sa.Text(), nullable=True),
        sa.Column("checkout_session", sa.Text(), nullable=True),
        sa.Column("entry_id", sa.BigInteger(), nullable=True),
        sa.Column("lot_id", sa.BigInteger(), nullable=True),
        sa.Column("failure_code", sa.Text(), nullable=True),
        sa.Column("failure_message", sa.Text(), nullable=True),
        sa.Column("review_reason", sa.Text(), nullable=True),
        sa.Column("created_by", sa.Text(), nullable=False),
        sa.Column("created_at", TS, server_default=sa.text("now()"), nullable=False),
        sa.Column("paid_at", TS, nullable=True),
        sa.Column("updated_at", TS, server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("method IN ('card', 'crypto')", name="ck_purchases_method"),
        sa.CheckConstraint("status IN ('pending', 'succeeded', 'failed', 'needs_review')", name="ck_purchases_status"),
        sa.CheckConstraint("amount > 0 AND fee >= 0 AND fee <= fee_before_discount", name="ck_purchases_amounts"),
        sa.CheckConstraint("total = amount + fee", name="ck_purchases_total"),
        sa.CheckConstraint(
            "(status = 'succeeded') = (entry_id IS NOT NULL AND paid_at IS NOT NULL)", name="ck_purchases_credited"
        ),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name="fk_purchases_account_id_accounts"),
        sa.ForeignKeyConstraint(
            ["pricing_version_id"], ["pricing_versions.id"], name="fk_purchases_pricing_version_id_pricing_versions"
        ),
        sa.ForeignKeyConstraint(["entry_id"], ["journal_entries.id"], name="fk_purchases_entry_id_journal_entries"),
        sa.ForeignKeyConstraint(["lot_id"], ["lots.id"], name="fk_purchases_lot_id_lots"),
        sa.PrimaryKeyConstraint("id", name="pk_purchases"),
        sa.UniqueConstraint("public_id", name="uq_purchases_public_id"),
        sa.UniqueConstraint("payment_intent", name="uq_purchases_payment_intent"),
        sa.UniqueConstraint("checkout_session", name="uq_purchases_checkout_session"),
    )
    op.create_index("ix_purchases_account_id_id", "purchases", ["account_id", "id"])
    op.create_index(
        "ix_purchases_volume", "purchases", ["account_id", "paid_at"], postgresql_where=sa.text("status = 'succeeded'")
    )
    op.create_table(
        "fulfilments",
        sa.Column("payment_intent", sa.Text(), nullable=False),
        sa.Column("purchase_id", sa.BigInteger(), nullable=False),
        sa.Column("entry_id", sa.BigInteger(), nullable=False),
        sa.Column("amount_cents", sa.BigInteger(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("created_at", TS, server_default=sa.text("clock_timestamp()"), nullable=False),
        sa.ForeignKeyConstraint(["purchase_id"], ["purchases.id"], name="fk_fulfilments_purchase_id_purchases"),
        sa.ForeignKeyConstraint(["entry_id"], ["journal_entries.id"], name="fk_fulfilments_entry_id_journal_entries"),
        sa.PrimaryKeyConstraint("payment_intent", name="pk_fulfilments"),
        sa.UniqueConstraint("purchase_id", name="uq_fulfilments_purchase_id"),
        sa.UniqueConstraint("entry_id", name="uq_fulfilments_entry_id"),
    )
    op.create_table(
        "stripe_events",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("outcome", sa.Text(), nullable=False),
        sa.Column("purchase_id", sa.BigInteger(), nullable=True),
        sa.Column("payload", postgresql.JSONB(), nullable=False),
        sa.Column("received_at", TS, server_default=sa.text("clock_timestamp()"), nullable=False),
        sa.CheckConstraint("status IN ('processed', 'ignored', 'needs_review')", name="ck_stripe_events_status"),
        sa.ForeignKeyConstraint(["purchase_id"], ["purchases.id"], name="fk_stripe_events_purchase_id_purchases"),
        sa.PrimaryKeyConstraint("id", name="pk_stripe_events"),
    )
    op.create_index(
        "ix_stripe_events_needs_review",
        "stripe_events",
        ["received_at"],
        postgresql_where=sa.text("status = 'needs_review'"),
    )


def downgrade() -> None:
    op.drop_index(
        "ix_stripe_events_needs_review", table_name="stripe_events", postgresql_where=sa.text("status = 'needs_review'")
    )
    op.drop_table("stripe_events")
    op.drop_table("fulfilments")
    op.drop_index("ix_purchases_volume", table_name="purchases", postgresql_where=sa.text("status = 'succeeded'"))
    op.drop_index("ix_purchases_account_id_id", table_name="purchases")
    op.drop_table("purchases")
    op.drop_table("discount_tiers")
    op.drop_table("pricing_versions")
