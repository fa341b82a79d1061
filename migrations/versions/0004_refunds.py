"""Refunds of purchases: by the API (unused credits, within 24 hours, never the fee, never crypto) and as
Stripe reports them (dashboard refunds), each one journal entry.

Revision ID: 0004_refunds
Revises: 0003_purchases
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004_refunds"
down_revision: str | None = "0003_purchases"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MONEY = sa.Numeric(38, 12)
TS = postgresql.TIMESTAMP(timezone=True)


def upgrade() -> None:
    op.create_table(
        "refunds",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("public_id", sa.Text(), nullable=False),
        sa.Column("purchase_id", sa.BigInteger(), nullable=False),
        sa.Column("account_id", sa.BigInteger(), nullable=False),
        sa.Column("amount", MONEY, nullable=False),
        sa.Column("fee_amount", MONEY, server_default=sa.text("0"), nullable=False),
        sa.Column("amount_cents", sa.BigInteger(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("stripe_refund", sa.Text(), nullable=True),
        sa.Column("entry_id", sa.BigInteger(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_by", sa.Text(), nullable=False),
        sa.Column("created_at", TS, server_default=sa.text("clock_timestamp()"), nullable=False),
        sa.CheckConstraint("source IN ('api', 'stripe')", name="ck_refunds_source"),
        sa.CheckConstraint("amount >= 0 AND fee_amount >= 0 AND amount_cents > 0", name="ck_refunds_amounts"),
        sa.CheckConstraint("amount_cents = (amount + fee_amount) * 100", name="ck_refunds_cents"),
        sa.ForeignKeyConstraint(["purchase_id"], ["purchases.id"], name="fk_refunds_purchase_id_purchases"),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name="fk_refunds_account_id_accounts"),
        sa.ForeignKeyConstraint(["entry_id"], ["journal_entries.id"], name="fk_refunds_entry_id_journal_entries"),
        sa.PrimaryKeyConstraint("id", name="pk_refunds"),
        sa.UniqueConstraint("public_id", name="uq_refunds_public_id"),
        sa.UniqueConstraint("stripe_refund", name="uq_refunds_stripe_refund"),
        sa.UniqueConstraint("entry_id", name="uq_refunds_entry_id"),
    )
    op.create_index("ix_refunds_purchase_id", "refunds", ["purchase_id"])


def downgrade() -> None:
    op.drop_index("ix_refunds_purchase_id", table_name="refunds")
    op.drop_table("refunds")
