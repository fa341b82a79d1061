"""Auto top-up: an account's settings and the attempts made for it (at most one pending per account).

Revision ID: 0010_auto_topup
Revises: 0009_byok_reconciliation
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0010_auto_topup"
down_revision: str | None = "0009_byok_reconciliation"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = postgresql.TIMESTAMP(timezone=True)
MONEY = sa.Numeric(38, 12)


def upgrade() -> None:
    op.create_table(
        "auto_topups",
        sa.Column("account_id", sa.BigInteger(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("threshold", MONEY, nullable=False),
        sa.Column("amount", MONEY, nullable=False),
        sa.Column("stripe_customer", sa.Text(), nullable=False),
        sa.Column("payment_method", sa.Text(), nullable=False),
        sa.Column("monthly_cap", MONEY, nullable=True),
        sa.Column("cooldown_seconds", sa.Integer(), nullable=False),
        sa.Column("declines", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("disabled_reason", sa.Text(), nullable=True),
        sa.Column("next_attempt_at", TS, nullable=True),
        sa.Column("updated_at", TS, server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name="fk_auto_topups_account_id_accounts"),
        sa.PrimaryKeyConstraint("account_id", name="pk_auto_topups"),
    )
    op.create_table(
        "auto_topup_attempts",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("account_id", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("amount", MONEY, nullable=False),
        sa.Column("purchase_id", sa.BigInteger(), nullable=True),
        sa.Column("payment_intent", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", TS, server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint(
            "status IN ('pending', 'succeeded', 'declined', 'failed')", name="ck_auto_topup_attempts_status"
        ),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name="fk_auto_topup_attempts_account_id_accounts"),
        sa.ForeignKeyConstraint(["purchase_id"], ["purchases.id"], name="fk_auto_topup_attempts_purchase_id_purchases"),
        sa.PrimaryKeyConstraint("id", name="pk_auto_topup_attempts"),
    )
    op.create_index(
        "uq_auto_topup_attempts_pending",
        "auto_topup_attempts",
        ["account_id"],
        unique=True,
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.create_index("ix_auto_topup_attempts_account_id", "auto_topup_attempts", ["account_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_auto_topup_attempts_account_id", table_name="auto_topup_attempts")
    op.drop_index("uq_auto_topup_attempts_pending", table_name="auto_topup_attempts")
    op.drop_table("auto_topup_attempts")
    op.drop_table("auto_topups")
