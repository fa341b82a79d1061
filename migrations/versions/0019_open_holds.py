"""Open holds in a small table of their own, `open_holds`, kept by the database from `holds`: a row for each
hold while it is open, deleted when it resolves (captured, released, expired). What reads open holds (an
admission's `held`, a key's `key_held`, an account's `available`, the expiry job's search for due holds) reads
it instead of the partial indexes on `holds`, which are dropped.

Why: a resolved hold's entry stayed in those partial indexes until `holds` was vacuumed, and `holds` grows by
every gateway request, so autovacuum visits it after a fifth of its rows changed: millions of resolutions on
a large table. The admission's sum over one account's open holds walked every entry its resolved holds had
left (0.2 ms for a hot account with 200,000 of them, and growing), and the expiry job's bitmap scan read all
of them every minute. `open_holds` holds only what is open, so it stays small, and it is vacuumed once 1,000
of its rows are dead (no fraction of its size), at most a minute of resolutions. Without predicate columns in
its indexes, the update that resolves a hold may also be a HOT update now.

Kept by two statement-level triggers with transition tables (one set-based statement per INSERT or UPDATE
of `holds`, as migration 0012 checks postings), so every writer, the service's own statements and support's
SQL alike, keeps the two in step; `billing verify` reports any difference (`open_holds_mismatch`). A hold is
never deleted; a DELETE of one deletes its open row too (a foreign key would cost a row lock of the new hold
on every insert).

The backfill and the triggers are created under a lock that lets no hold be written in between.

Revision ID: 0019_open_holds
Revises: 0018_ledger_vacuum_insert
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0019_open_holds"
down_revision: str | None = "0018_ledger_vacuum_insert"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MONEY = sa.Numeric(38, 12, asdecimal=True)
TS = sa.TIMESTAMP(timezone=True)

TRIGGERS = """
CREATE FUNCTION holds_open_after_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO open_holds (hold_id, account_id, key_id, amount, created_at, expires_at)
    SELECT id, account_id, key_id, amount, created_at, expires_at FROM new_holds WHERE status = 'open';
    RETURN NULL;
END $$;

-- An update leaves the open row of each hold still open equal to it, and none for a hold no longer open.
-- (`= ANY(ARRAY(...))`: probed through the primary key whatever the planner guesses of the transition table.)
CREATE FUNCTION holds_open_after_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM open_holds WHERE hold_id = ANY(ARRAY(SELECT id FROM new_holds WHERE status <> 'open'));
    INSERT INTO open_holds (hold_id, account_id, key_id, amount, created_at, expires_at)
    SELECT id, account_id, key_id, amount, created_at, expires_at FROM new_holds WHERE status = 'open'
    ON CONFLICT (hold_id) DO UPDATE SET account_id = excluded.account_id, key_id = excluded.key_id,
        amount = excluded.amount, created_at = excluded.created_at, expires_at = excluded.expires_at;
    RETURN NULL;
END $$;

CREATE FUNCTION holds_open_after_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM open_holds WHERE hold_id = ANY(ARRAY(SELECT id FROM old_holds));
    RETURN NULL;
END $$;

CREATE TRIGGER holds_open_insert AFTER INSERT ON holds REFERENCING NEW TABLE AS new_holds
    FOR EACH STATEMENT EXECUTE FUNCTION holds_open_after_insert();
CREATE TRIGGER holds_open_update AFTER UPDATE ON holds REFERENCING NEW TABLE AS new_holds
    FOR EACH STATEMENT EXECUTE FUNCTION holds_open_after_update();
CREATE TRIGGER holds_open_delete AFTER DELETE ON holds REFERENCING OLD TABLE AS old_holds
    FOR EACH STATEMENT EXECUTE FUNCTION holds_open_after_delete();
"""

DROP_TRIGGERS = """
DROP TRIGGER holds_open_delete ON holds;
DROP TRIGGER holds_open_update ON holds;
DROP TRIGGER holds_open_insert ON holds;
DROP FUNCTION holds_open_after_delete();
DROP FUNCTION holds_open_after_update();
DROP FUNCTION holds_open_after_insert();
"""

# Vacuumed once this many of its rows are dead, whatever its size: the entries of resolved holds stay in its
# indexes until then.
DEAD_ROWS = 1000


def upgrade() -> None:
    op.create_table(
        "open_holds",
        sa.Column("hold_id", sa.BigInteger(), nullable=False),
        sa.Column("account_id", sa.BigInteger(), nullable=False),
        sa.Column("key_id", sa.BigInteger(), nullable=True),
        sa.Column("amount", MONEY, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("hold_id", name=op.f("pk_open_holds")),
    )
    op.create_index("ix_open_holds_account_id", "open_holds", ["account_id"])
    op.create_index("ix_open_holds_key_id", "open_holds", ["key_id"], postgresql_where=sa.text("key_id IS NOT NULL"))
    op.create_index("ix_open_holds_expires_at", "open_holds", ["expires_at"])
    op.execute(
        "ALTER TABLE open_holds SET (autovacuum_vacuum_scale_factor = 0,"
        f" autovacuum_vacuum_threshold = {DEAD_ROWS}, autovacuum_analyze_scale_factor = 0,"
        f" autovacuum_analyze_threshold = {DEAD_ROWS})"
    )
    op.execute("LOCK TABLE holds IN SHARE ROW EXCLUSIVE MODE")
    op.execute(
        "INSERT INTO open_holds (hold_id, account_id, key_id, amount, created_at, expires_at)"
        " SELECT id, account_id, key_id, amount, created_at, expires_at FROM holds WHERE status = 'open'"
    )
    op.execute(TRIGGERS)
    op.drop_index("ix_holds_open_key", table_name="holds", postgresql_where=sa.text("status = 'open'"))
    op.drop_index("ix_holds_open_account", table_name="holds", postgresql_where=sa.text("status = 'open'"))


def downgrade() -> None:
    op.create_index("ix_holds_open_account", "holds", ["account_id"], postgresql_where=sa.text("status = 'open'"))
    op.create_index("ix_holds_open_key", "holds", ["key_id"], postgresql_where=sa.text("status = 'open'"))
    op.execute(DROP_TRIGGERS)
    op.drop_table("open_holds")
