"""The gateway's hot path: API keys with limits and usage counters, holds, generation records, BYOK
fee policies and monthly BYOK usage.

Revision ID: 0002_hot_path
Revises: 0001_ledger
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002_hot_path"
down_revision: str | None = "0001_ledger"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MONEY = sa.Numeric(38, 12)
TS = postgresql.TIMESTAMP(timezone=True)
ZERO = sa.text("0")


def upgrade() -> None:
    op.add_column("accounts", sa.Column("enterprise", sa.Boolean(), server_default=sa.text("false"), nullable=False))
    op.create_table(
        "api_keys",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("public_id", sa.Text(), nullable=False),
        sa.Column("account_id", sa.BigInteger(), nullable=False),
        sa.Column("member_id", sa.BigInteger(), nullable=True),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("limit", MONEY, nullable=True),
        sa.Column("limit_reset", sa.Text(), nullable=True),
        sa.Column("include_byok_in_limit", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("disabled", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("expires_at", TS, nullable=True),
        sa.Column("deleted_at", TS, nullable=True),
        sa.Column("created_at", TS, server_default=sa.text("now()"), nullable=False),
        sa.Column("usage_total", MONEY, server_default=ZERO, nullable=False),
        sa.Column("byok_total", MONEY, server_default=ZERO, nullable=False),
        sa.Column("day_start", sa.Date(), nullable=True),
        sa.Column("usage_day", MONEY, server_default=ZERO, nullable=False),
        sa.Column("byok_day", MONEY, server_default=ZERO, nullable=False),
        sa.Column("week_start", sa.Date(), nullable=True),
        sa.Column("usage_week", MONEY, server_default=ZERO, nullable=False),
        sa.Column("byok_week", MONEY, server_default=ZERO, nullable=False),
        sa.Column("month_start", sa.Date(), nullable=True),
        sa.Column("usage_month", MONEY, server_default=ZERO, nullable=False),
        sa.Column("byok_month", MONEY, server_default=ZERO, nullable=False),
        sa.CheckConstraint("limit_reset IN ('daily', 'weekly', 'monthly')", name="ck_api_keys_limit_reset"),
        sa.CheckConstraint('"limit" IS NULL OR "limit" >= 0', name="ck_api_keys_limit_nonnegative"),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name="fk_api_keys_account_id_accounts"),
        sa.ForeignKeyConstraint(["member_id"], ["accounts.id"], name="fk_api_keys_member_id_accounts"),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
        sa.UniqueConstraint("public_id", name="uq_api_keys_public_id"),
    )
    op.create_index("ix_api_keys_account_id", "api_keys", ["account_id"])
    op.create_table(
        "holds",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("account_id", sa.BigInteger(), nullable=False),
        sa.Column("key_id", sa.BigInteger(), nullable=True),
        sa.Column("request_id", sa.Text(), nullable=False),
        sa.Column("amount", MONEY, nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("fingerprint", sa.Text(), nullable=False),
        sa.Column("created_at", TS, server_default=sa.text("now()"), nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.Column("resolved_at", TS, nullable=True),
        sa.Column("resolution", postgresql.JSONB(), nullable=True),
        sa.CheckConstraint("status IN ('open', 'captured', 'released', 'expired', 'refused')", name="ck_holds_status"),
        sa.CheckConstraint("amount > 0", name="ck_holds_amount_positive"),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name="fk_holds_account_id_accounts"),
        sa.ForeignKeyConstraint(["key_id"], ["api_keys.id"], name="fk_holds_key_id_api_keys"),
        sa.PrimaryKeyConstraint("id", name="pk_holds"),
        sa.UniqueConstraint("account_id", "request_id", name="uq_holds_account_id"),
    )
    op.create_index("ix_holds_open_account", "holds", ["account_id"], postgresql_where=sa.text("status = 'open'"))
    op.create_index("ix_holds_open_key", "holds", ["key_id"], postgresql_where=sa.text("status = 'open'"))
    op.create_table(
        "byok_fee_policies",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("allowance_usd", MONEY, nullable=True),
        sa.Column("enterprise_allowance_usd", MONEY, nullable=True),
        sa.Column("free_requests", sa.BigInteger(), nullable=True),
        sa.Column("rate", sa.Numeric(10, 6), nullable=False),
        sa.Column("effective_from", TS, nullable=False),
        sa.Column("created_at", TS, server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("kind IN ('allowance_usd', 'free_requests')", name="ck_byok_fee_policies_kind"),
        sa.PrimaryKeyConstraint("id", name="pk_byok_fee_policies"),
    )
    op.execute(
        "INSERT INTO byok_fee_policies (kind, allowance_usd, enterprise_allowance_usd, rate, effective_from)"
        " VALUES ('allowance_usd', 25000, 200000, 0.05, '2000-01-01T00:00:00Z')"
    )
    op.create_table(
        "byok_months",
        sa.Column("account_id", sa.BigInteger(), nullable=False),
        sa.Column("month", sa.Date(), nullable=False),
        sa.Column("list_usage", MONEY, server_default=ZERO, nullable=False),
        sa.Column("requests", sa.BigInteger(), server_default=ZERO, nullable=False),
        sa.Column("fees", MONEY, server_default=ZERO, nullable=False),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name="fk_byok_months_account_id_accounts"),
        sa.PrimaryKeyConstraint("account_id", "month", name="pk_byok_months"),
    )
    op.create_table(
        "generations",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("generation_id", sa.Text(), nullable=False),
        sa.Column("account_id", sa.BigInteger(), nullable=False),
        sa.Column("key_id", sa.BigInteger(), nullable=True),
        sa.Column("member_id", sa.BigInteger(), nullable=True),
        sa.Column("hold_id", sa.BigInteger(), nullable=True),
        sa.Column("entry_id", sa.BigInteger(), nullable=True),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("fingerprint", sa.Text(), nullable=False),
        sa.Column("model", sa.Text(), nullable=True),
        sa.Column("provider", sa.Text(), nullable=True),
        sa.Column("total_cost", MONEY, nullable=False),
        sa.Column("upstream_inference_cost", MONEY, nullable=True),
        sa.Column("cache_discount", MONEY, nullable=True),
        sa.Column("is_byok", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("byok_list_cost", MONEY, nullable=True),
        sa.Column("byok_fee", MONEY, nullable=True),
        sa.Column("byok_policy_id", sa.BigInteger(), nullable=True),
        sa.Column("usage", postgresql.JSONB(), server_default=sa.text("'{}'::jsonb"), nullable=False),
        sa.Column("finish_reason", sa.Text(), nullable=True),
        sa.Column("cancelled", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("streamed", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("refusal", postgresql.JSONB(), nullable=True),
        sa.Column("created_at", TS, server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("status IN ('charged', 'refused')", name="ck_generations_status"),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name="fk_generations_account_id_accounts"),
        sa.ForeignKeyConstraint(["key_id"], ["api_keys.id"], name="fk_generations_key_id_api_keys"),
        sa.ForeignKeyConstraint(["member_id"], ["accounts.id"], name="fk_generations_member_id_accounts"),
        sa.ForeignKeyConstraint(["hold_id"], ["holds.id"], name="fk_generations_hold_id_holds"),
        sa.ForeignKeyConstraint(["entry_id"], ["journal_entries.id"], name="fk_generations_entry_id_journal_entries"),
        sa.ForeignKeyConstraint(
            ["byok_policy_id"], ["byok_fee_policies.id"], name="fk_generations_byok_policy_id_byok_fee_policies"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_generations"),
        sa.UniqueConstraint("generation_id", name="uq_generations_generation_id"),
    )
    op.create_index("ix_generations_account_id_id", "generations", ["account_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_generations_account_id_id", table_name="generations")
    op.drop_table("generations")
    op.drop_table("byok_months")
    op.drop_table("byok_fee_policies")
    op.drop_index("ix_holds_open_key", table_name="holds", postgresql_where=sa.text("status = 'open'"))
    op.drop_index("ix_holds_open_account", table_name="holds", postgresql_where=sa.text("status = 'open'"))
    op.drop_table("holds")
    op.drop_index("ix_api_keys_account_id", table_name="api_keys")
    op.drop_table("api_keys")
    op.drop_column("accounts", "enterprise")
