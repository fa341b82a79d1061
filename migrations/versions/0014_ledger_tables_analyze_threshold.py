"""Refresh the planner's statistics of the tables every gateway call adds rows to once they have grown by
10% *and* at least 1,000,000 rows, instead of 10% and 50 rows.

`generations`, `postings`, `journal_entries` and `holds` each take one or more rows per gateway call. With
PostgreSQL's default threshold a young table is re-analyzed on autovacuum's every visit (once a minute:
it grows by far more than 10% a minute), and each ANALYZE samples 30,000 rows and builds statistics of
every column from them: 104–149 ms each under the load below. Measured on the 2-core benchmark host at 1,960 charges/s (half the maximum,
open loop): an ANALYZE by hand of `generations`, `postings` or `journal_entries` during the load left
161–258 requests slower than 10 ms behind it, 0.4% of a 20 s window each; autovacuum ran all three in
the same visit. On a table of millions of rows, 10% is far above 1,000,000, so nothing changes there; the
statistics only serve plans of lookups by unique or indexed keys, which they do not change. VACUUM (which
also keeps the row-count estimates current) runs as before.

Revision ID: 0014_ledger_analyze_threshold
Revises: 0013_drop_unused_ledger_indexes
Create Date: 2026-11-28
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0014_ledger_analyze_threshold"
down_revision: str | None = "0013_drop_unused_ledger_indexes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

GROWING = ("generations", "postings", "journal_entries", "holds")
ANALYZE_THRESHOLD = 1_000_000


def upgrade() -> None:
    for table in GROWING:
        op.execute(f"ALTER TABLE {table} SET (autovacuum_analyze_threshold = {ANALYZE_THRESHOLD})")


def downgrade() -> None:
    for table in GROWING:
        op.execute(f"ALTER TABLE {table} RESET (autovacuum_analyze_threshold)")
