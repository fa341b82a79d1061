"""Postings are checked for balance once per INSERT statement, set-based, instead of once per posting row
at commit. Every entry a statement adds postings to must have at least two postings summing to zero when
the statement ends; an entry committed with no postings at all is still refused at commit (its own
deferred trigger, unchanged).

Why: the per-row deferred trigger re-summed the same entry once for each of its postings at COMMIT (a
charge has two or three), a PL/pgSQL call and an index scan each time; on the gateway's group commit that
was most of the COMMIT's own time. Now one query per statement checks every entry the statement touched.

What changes for whoever writes SQL by hand: an entry's postings go in with one INSERT (every writer in
the service already does: one statement per entry or per batch), and a posting added to an old entry is
refused at once unless the same statement keeps it balanced.

Revision ID: 0012_postings_balanced
Revises: 0011_byok_generation_indexes
Create Date: 2026-11-27
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0012_postings_balanced"
down_revision: str | None = "0011_byok_generation_indexes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UPGRADE = """
CREATE FUNCTION ledger_check_postings_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    bad record;
BEGIN
    -- (`= ANY(ARRAY(...))`: probed through ix_postings_entry_id whatever the planner guesses of the
    -- transition table's size)
    SELECT p.entry_id, count(*) AS n, sum(p.amount) AS total INTO bad
    FROM postings p
    WHERE p.entry_id = ANY(ARRAY(SELECT DISTINCT entry_id FROM new_postings))
    GROUP BY p.entry_id
    HAVING count(*) < 2 OR sum(p.amount) <> 0
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'journal entry % is unbalanced: % postings summing to %', bad.entry_id, bad.n, bad.total
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;

DROP TRIGGER postings_balanced ON postings;
CREATE TRIGGER postings_balanced
    AFTER INSERT ON postings REFERENCING NEW TABLE AS new_postings
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_check_postings_balanced();
"""

DOWNGRADE = """
DROP TRIGGER postings_balanced ON postings;
DROP FUNCTION ledger_check_postings_balanced();
CREATE CONSTRAINT TRIGGER postings_balanced
    AFTER INSERT ON postings DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION ledger_check_entry_balanced();
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
