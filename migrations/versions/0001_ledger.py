"""The double-entry ledger: chart of accounts, journal entries, postings, lots, balances, idempotency
keys, API tokens and the audit log, with the database itself enforcing the ledger's rules.

Revision ID: 0001_ledger
Revises:
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001_ledger"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MONEY = sa.Numeric(38, 12)
TS = postgresql.TIMESTAMP(timezone=True)

# The platform's chart of accounts as of this revision (code, type).
PLATFORM_ACCOUNTS = [
    ("stripe_clearing", "asset"),
    ("crypto_clearing", "asset"),
    ("manual_payments", "asset"),
    ("purchase_fee_revenue", "revenue"),
    ("usage_revenue", "revenue"),
    ("byok_fee_revenue", "revenue"),
    ("promotional_credits", "expense"),
    ("compensation_credits", "expense"),
    ("manual_adjustments", "expense"),
    ("breakage", "revenue"),
    ("refunds", "asset"),
    ("disputes", "asset"),
    ("rounding", "expense"),
]

TRIGGERS = """
-- Every journal entry: at least two postings, summing to exactly zero, checked at commit so an entry's
-- postings can be inserted one by one inside its transaction.
-- (Checked from both sides: a posting added to any entry, and an entry committed with no postings.)
CREATE FUNCTION ledger_check_entry_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    entry bigint;
    total numeric;
    n integer;
BEGIN
    IF TG_TABLE_NAME = 'postings' THEN
        entry := NEW.entry_id;
    ELSE
        entry := NEW.id;
    END IF;
    SELECT coalesce(sum(amount), 0), count(*) INTO total, n FROM postings WHERE entry_id = entry;
    IF n < 2 OR total <> 0 THEN
        RAISE EXCEPTION 'journal entry % is unbalanced: % postings summing to %', entry, n, total
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;

CREATE CONSTRAINT TRIGGER postings_balanced
    AFTER INSERT ON postings DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION ledger_check_entry_balanced();
CREATE CONSTRAINT TRIGGER journal_entries_balanced
    AFTER INSERT ON journal_entries DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION ledger_check_entry_balanced();

-- Posted rows are never changed or removed; corrections are new, reversing entries.
CREATE FUNCTION ledger_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% of % is not allowed: the ledger is append-only', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END $$;

CREATE TRIGGER postings_append_only BEFORE UPDATE OR DELETE ON postings
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER postings_no_truncate BEFORE TRUNCATE ON postings
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER journal_entries_append_only BEFORE UPDATE OR DELETE ON journal_entries
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER journal_entries_no_truncate BEFORE TRUNCATE ON journal_entries
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change();
"""

DROP_TRIGGERS = """
DROP TRIGGER IF EXISTS audit_log_no_truncate ON audit_log;
DROP TRIGGER IF EXISTS audit_log_append_only ON audit_log;
DROP TRIGGER IF EXISTS journal_entries_no_truncate ON journal_entries;
DROP TRIGGER IF EXISTS journal_entries_append_only ON journal_entries;
DROP TRIGGER IF EXISTS postings_no_truncate ON postings;
DROP TRIGGER IF EXISTS postings_append_only ON postings;
DROP TRIGGER IF EXISTS postings_balanced ON postings;
DROP TRIGGER IF EXISTS journal_entries_balanced ON journal_entries;
DROP FUNCTION IF EXISTS ledger_refuse_change();
DROP FUNCTION IF EXISTS ledger_check_entry_balanced();
"""


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("public_id", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("external_id", sa.Text(), nullable=True),
        sa.Column("name", sa.Text(), nullable=True),
        sa.Column("metadata", postgresql.JSONB(), server_default=sa.text("'{}'::jsonb"), nullable=False),
        sa.Column("created_at", TS, server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("kind IN ('user', 'organization', 'platform')", name="ck_accounts_kind"),
        sa.CheckConstraint("type IN ('asset', 'liability', 'revenue', 'expense', 'equity')", name="ck_accounts_type"),
        sa.CheckConstraint("(kind = 'platform') = (external_id IS NULL)", name="ck_accounts_external_id_for_customers"),
        sa.PrimaryKeyConstraint("id", name="pk_accounts"),
        sa.UniqueConstraint("public_id", name="uq_accounts_public_id"),
        sa.UniqueConstraint("external_id", name="uq_accounts_external_id"),
    )
    op.create_table(
        "balances",
        sa.Column("account_id", sa.BigInteger(), nullable=False),
        sa.Column("balance", MONEY, server_default=sa.text("0"), nullable=False),
        sa.Column("total_credits", MONEY, server_default=sa.text("0"), nullable=False),
        sa.Column("total_usage", MONEY, server_default=sa.text("0"), nullable=False),
        sa.Column("updated_at", TS, server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name="fk_balances_account_id_accounts"),
        sa.PrimaryKeyConstraint("account_id", name="pk_balances"),
    )
    op.create_table(
        "journal_entries",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("account_id", sa.BigInteger(), nullable=True),
        sa.Column("posted_at", TS, server_default=sa.text("clock_timestamp()"), nullable=False),
        sa.Column("description", sa.Text(), server_default=sa.text("''"), nullable=False),
        sa.Column("actor", sa.Text(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("reverses_entry_id", sa.BigInteger(), nullable=True),
        sa.Column("metadata", postgresql.JSONB(), server_default=sa.text("'{}'::jsonb"), nullable=False),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name="fk_journal_entries_account_id_accounts"),
        sa.ForeignKeyConstraint(
            ["reverses_entry_id"],
            ["journal_entries.id"],
            name="fk_journal_entries_reverses_entry_id_journal_entries",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_journal_entries"),
    )
    op.create_index("ix_journal_entries_account_id_id", "journal_entries", ["account_id", "id"])
    op.create_table(
        "lots",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("account_id", sa.BigInteger(), nullable=False),
        sa.Column("category", sa.Text(), nullable=False),
        sa.Column("amount", MONEY, nullable=False),
        sa.Column("remaining", MONEY, nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.Column("entry_id", sa.BigInteger(), nullable=False),
        sa.Column("created_at", TS, server_default=sa.text("clock_timestamp()"), nullable=False),
        sa.CheckConstraint("category IN ('paid', 'promotional', 'compensation')", name="ck_lots_category"),
        sa.CheckConstraint("amount > 0", name="ck_lots_amount_positive"),
        sa.CheckConstraint("remaining >= 0 AND remaining <= amount", name="ck_lots_remaining_within_amount"),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name="fk_lots_account_id_accounts"),
        sa.ForeignKeyConstraint(["entry_id"], ["journal_entries.id"], name="fk_lots_entry_id_journal_entries"),
        sa.PrimaryKeyConstraint("id", name="pk_lots"),
    )
    op.create_index("ix_lots_account_id_expires_at", "lots", ["account_id", "expires_at"])
    op.create_table(
        "postings",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("entry_id", sa.BigInteger(), nullable=False),
        sa.Column("account_id", sa.BigInteger(), nullable=False),
        sa.Column("lot_id", sa.BigInteger(), nullable=True),
        sa.Column("amount", MONEY, nullable=False),
        sa.Column("balance_after", MONEY, nullable=True),
        sa.Column("posted_at", TS, server_default=sa.text("clock_timestamp()"), nullable=False),
        sa.CheckConstraint("amount <> 0", name="ck_postings_amount_nonzero"),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name="fk_postings_account_id_accounts"),
        sa.ForeignKeyConstraint(["entry_id"], ["journal_entries.id"], name="fk_postings_entry_id_journal_entries"),
        sa.ForeignKeyConstraint(["lot_id"], ["lots.id"], name="fk_postings_lot_id_lots"),
        sa.PrimaryKeyConstraint("id", name="pk_postings"),
    )
    op.create_index("ix_postings_account_id_id", "postings", ["account_id", "id"])
    op.create_index("ix_postings_entry_id", "postings", ["entry_id"])
    op.create_index("ix_postings_lot_id", "postings", ["lot_id"], postgresql_where=sa.text("lot_id IS NOT NULL"))
    op.create_table(
        "idempotency_keys",
        sa.Column("scope", sa.Text(), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("fingerprint", sa.Text(), nullable=False),
        sa.Column("method", sa.Text(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("response", postgresql.JSONB(), nullable=True),
        sa.Column("created_at", TS, server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("scope", "key", name="pk_idempotency_keys"),
    )
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("public_id", sa.Text(), nullable=False),
        sa.Column("token_hash", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("scopes", postgresql.ARRAY(sa.Text()), nullable=False),
        sa.Column("account_id", sa.BigInteger(), nullable=True),
        sa.Column("created_by", sa.Text(), nullable=False),
        sa.Column("created_at", TS, server_default=sa.text("now()"), nullable=False),
        sa.Column("expires_at", TS, nullable=True),
        sa.Column("revoked_at", TS, nullable=True),
        sa.CheckConstraint(
            "scopes <@ ARRAY['admin', 'support', 'gateway', 'account']::text[] AND cardinality(scopes) > 0",
            name="ck_api_tokens_scopes_known",
        ),
        sa.CheckConstraint("('account' = ANY(scopes)) = (account_id IS NOT NULL)", name="ck_api_tokens_account_scope"),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name="fk_api_tokens_account_id_accounts"),
        sa.PrimaryKeyConstraint("id", name="pk_api_tokens"),
        sa.UniqueConstraint("public_id", name="uq_api_tokens_public_id"),
        sa.UniqueConstraint("token_hash", name="uq_api_tokens_token_hash"),
    )
    op.create_table(
        "audit_log",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("at", TS, server_default=sa.text("clock_timestamp()"), nullable=False),
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column("action", sa.Text(), nullable=False),
        sa.Column("account_id", sa.BigInteger(), nullable=True),
        sa.Column("entry_id", sa.BigInteger(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("details", postgresql.JSONB(), server_default=sa.text("'{}'::jsonb"), nullable=False),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name="fk_audit_log_account_id_accounts"),
        sa.ForeignKeyConstraint(["entry_id"], ["journal_entries.id"], name="fk_audit_log_entry_id_journal_entries"),
        sa.PrimaryKeyConstraint("id", name="pk_audit_log"),
    )
    op.create_index("ix_audit_log_account_id_id", "audit_log", ["account_id", "id"])

    accounts = sa.table(
        "accounts",
        sa.column("public_id", sa.Text),
        sa.column("kind", sa.Text),
        sa.column("type", sa.Text),
        sa.column("name", sa.Text),
    )
    op.bulk_insert(
        accounts,
        [
            {"public_id": code, "kind": "platform", "type": type_, "name": code.replace("_", " ")}
            for code, type_ in PLATFORM_ACCOUNTS
        ],
    )
    op.execute(TRIGGERS)


def downgrade() -> None:
    op.execute(DROP_TRIGGERS)
    op.drop_index("ix_audit_log_account_id_id", table_name="audit_log")
    op.drop_table("audit_log")
    op.drop_table("api_tokens")
    op.drop_table("idempotency_keys")
    op.drop_index("ix_postings_lot_id", table_name="postings", postgresql_where=sa.text("lot_id IS NOT NULL"))
    op.drop_index("ix_postings_entry_id", table_name="postings")
    op.drop_index("ix_postings_account_id_id", table_name="postings")
    op.drop_table("postings")
    op.drop_index("ix_lots_account_id_expires_at", table_name="lots")
    op.drop_table("lots")
    op.drop_index("ix_journal_entries_account_id_id", table_name="journal_entries")
    op.drop_table("journal_entries")
    op.drop_table("balances")
    op.drop_table("accounts")
