"""Schema only through Alembic: every migration downgrades cleanly, and the models agree with it."""

from collections.abc import Iterator

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from billing.db.migrate import downgrade, upgrade
from billing.db.models import Base
from billing.settings import sqlalchemy_url
from tests.conftest import create_database, drop_database


@pytest.fixture
def scratch_url() -> Iterator[str]:
    url = create_database("billing_migrations")
    yield url
    drop_database(url)


def test_upgrade_downgrade_upgrade_and_models_agree(scratch_url: str) -> None:
    engine = create_engine(sqlalchemy_url(scratch_url))
    try:
        upgrade(scratch_url)
        downgrade(scratch_url, "base")
        with engine.connect() as conn:
            assert set(inspect(conn).get_table_names()) <= {"alembic_version"}
            functions = conn.execute(text("SELECT proname FROM pg_proc WHERE proname LIKE 'ledger_%'")).all()
            assert functions == []
        upgrade(scratch_url)
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
            assert compare_metadata(context, Base.metadata) == []
            platform = conn.exec_driver_sql("SELECT count(*) FROM accounts WHERE kind = 'platform'").scalar()
            assert platform == 13
    finally:
        engine.dispose()


def test_growing_ledger_tables_are_analyzed_and_vacuumed_every_million_rows_at_least(scratch_url: str) -> None:
    """Migrations 0014 and 0018: autovacuum's ANALYZE, and its VACUUM for inserted rows, of a young ledger
    table no longer run on each visit."""
    engine = create_engine(sqlalchemy_url(scratch_url))
    growing = ["generations", "holds", "journal_entries", "postings"]
    query = text(
        "SELECT relname, reloptions FROM pg_class WHERE relname = ANY(:names) AND relkind = 'r' ORDER BY relname"
    )
    try:
        upgrade(scratch_url)
        with engine.connect() as conn:
            rows = conn.execute(query, {"names": growing}).all()
        options = ["autovacuum_analyze_threshold=1000000", "autovacuum_vacuum_insert_threshold=1000000"]
        assert rows == [(name, options) for name in growing]
        downgrade(scratch_url, "0017_postings_lot_of_own_account")  # migration 0018: vacuums too
        with engine.connect() as conn:
            assert conn.execute(query, {"names": growing}).all() == [(name, options[:1]) for name in growing]
        downgrade(scratch_url, "0013_drop_unused_ledger_indexes")
        with engine.connect() as conn:
            assert conn.execute(query, {"names": growing}).all() == [(name, None) for name in growing]
    finally:
        engine.dispose()


def test_refunds_name_their_stripe_refund_or_the_event_that_booked_them(scratch_url: str) -> None:
    """Migration 0016: an API refund always names its Stripe refund (unique), a webhook's its event's time."""
    engine = create_engine(sqlalchemy_url(scratch_url))
    query = text(  # the naming convention prefixes the names the migrations give
        "SELECT conname FROM pg_constraint WHERE conrelid = 'refunds'::regclass AND conname = ANY(:names) ORDER BY 1"
    )
    names = ["ck_refunds_ck_refunds_api_names_stripe_refund", "ck_refunds_ck_refunds_reported"]
    try:
        upgrade(scratch_url)
        with engine.connect() as conn:
            assert [r[0] for r in conn.execute(query, {"names": names})] == names
            assert "reported_at" in {c["name"] for c in inspect(conn).get_columns("refunds")}
        downgrade(scratch_url, "0015_auto_topup_customer")
        with engine.connect() as conn:
            assert conn.execute(query, {"names": names}).all() == []
            assert "reported_at" not in {c["name"] for c in inspect(conn).get_columns("refunds")}
    finally:
        engine.dispose()


def test_open_holds_start_with_the_holds_open_before_the_migration(scratch_url: str) -> None:
    """Migration 0019: the holds open when it runs are in `open_holds` from the start (admissions count them
    from there), resolved ones are not, and the table is vacuumed by dead rows, not by a fraction of its size;
    downgrading brings back the partial indexes the holds' readers used."""
    engine = create_engine(sqlalchemy_url(scratch_url))
    try:
        upgrade(scratch_url, "0018_ledger_vacuum_insert")
        with engine.begin() as conn:
            account = conn.execute(
                text("INSERT INTO accounts (public_id, kind, type, external_id)"
                     " VALUES ('acct_m', 'user', 'liability', 'm') RETURNING id")
            ).scalar_one()  # fmt: skip
            conn.execute(
                text("INSERT INTO holds (account_id, request_id, amount, status, fingerprint, expires_at)"
                     " SELECT :a, 'r' || n, n, CASE WHEN n % 2 = 0 THEN 'open' ELSE 'captured' END, 'f',"
                     "        now() + interval '1 minute' FROM generate_series(1, 6) AS n"),
                {"a": account},
            )  # fmt: skip
        upgrade(scratch_url)
        with engine.connect() as conn:
            opened = conn.execute(text("SELECT amount FROM open_holds ORDER BY amount")).scalars().all()
            assert opened == [2, 4, 6]
            options = conn.execute(text("SELECT reloptions FROM pg_class WHERE relname = 'open_holds'")).scalar_one()
            assert "autovacuum_vacuum_scale_factor=0" in options
            assert "autovacuum_vacuum_threshold=1000" in options
        downgrade(scratch_url, "0018_ledger_vacuum_insert")
        with engine.connect() as conn:
            indexes = {i["name"] for i in inspect(conn).get_indexes("holds")}
            assert {"ix_holds_open_account", "ix_holds_open_key"} <= indexes
            assert "open_holds" not in inspect(conn).get_table_names()
    finally:
        engine.dispose()
