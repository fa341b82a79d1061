"""Vacuum the tables every gateway call adds rows to once they have grown by 20% *and* at least 1,000,000
inserted rows, instead of 20% and 1,000 rows — as migration 0014 did for their ANALYZE.

`generations`, `postings`, `journal_entries` and `holds` are (nearly) insert-only. PostgreSQL vacuums such a
table after `autovacuum_vacuum_insert_threshold` + 20% of its rows have been inserted, to mark its new pages
all-visible. A young table grows by far more than 20% a minute, so autovacuum's every visit vacuumed all
three ledger tables together: measured on the 2-core benchmark host at 2,995 charges/s (half the maximum,
open loop, after 60 s at saturation), `postings` 1.2–1.3 s, `journal_entries` 1.1–1.2 s and `generations`
1.9–2.0 s of throttled work in one 10 s window, the slow requests of that window spread across the span
they ran. On a table of millions of rows 20% is far above 1,000,000, so nothing changes there; the
visibility map serves index-only scans, which the hot path does not use, and freezing against transaction
id wraparound is driven by `autovacuum_freeze_max_age`, which this leaves alone. Vacuums for dead rows
(`holds` are updated when resolved) run as before.

Revision ID: 0018_ledger_vacuum_insert
Revises: 0017_postings_lot_of_own_account
Create Date: 2026-11-28
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0018_ledger_vacuum_insert"
down_revision: str | None = "0017_postings_lot_of_own_account"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

GROWING = ("generations", "postings", "journal_entries", "holds")
INSERT_THRESHOLD = 1_000_000


def upgrade() -> None:
    for table in GROWING:
        op.execute(f"ALTER TABLE {table} SET (autovacuum_vacuum_insert_threshold = {INSERT_THRESHOLD})")


def downgrade() -> None:
    for table in GROWING:
        op.execute(f"ALTER TABLE {table} RESET (autovacuum_vacuum_insert_threshold)")
