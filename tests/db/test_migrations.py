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
