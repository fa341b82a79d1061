"""Schema only through Alembic: every migration downgrades cleanly, and the models agree with it."""

from collections.abc import Iterator
from decimal import Decimal

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, create_engine, inspect, text

from billing.db.migrate import downgrade, upgrade
from billing.db.models import Base
from billing.gateway import service
from billing.settings import sqlalchemy_url
from tests import plans
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


def _customers(conn: Connection, tag: str, count: int) -> list[int]:
    """`count` user accounts, `acct_<tag><n>` with external id `<tag><n>`; their ids, in that order."""
    return list(
        conn.execute(
            text("INSERT INTO accounts (public_id, kind, type, external_id)"
                 " SELECT 'acct_' || :t || n, 'user', 'liability', :t || n FROM generate_series(1, :c) AS n"
                 " ORDER BY n RETURNING id"),
            {"t": tag, "c": count},
        ).scalars()
    )  # fmt: skip


def test_open_holds_start_with_the_holds_open_before_the_migration(scratch_url: str) -> None:
    """Migration 0019: the holds open when it runs are in `open_holds` from the start (admissions count them
    from there), resolved ones are not, and the table is vacuumed by dead rows, not by a fraction of its size;
    downgrading brings back the partial indexes the holds' readers used."""
    engine = create_engine(sqlalchemy_url(scratch_url))
    try:
        upgrade(scratch_url, "0018_ledger_vacuum_insert")
        with engine.begin() as conn:
            (account,) = _customers(conn, "m", 1)
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


def test_a_payers_open_holds_are_read_within_its_unexpired_range(scratch_url: str) -> None:
    """Migration 0021: the gateway's state reads sum the payer's (account's and key's) open holds not yet
    expired through one index range of payer and expiry, in the generic plan they run with. With an index of
    the payer alone, the expiry was a filter, and the planner at times preferred the index of the expiry alone:
    a scan of every hold resolved since the last vacuum, on every call (docs/performance.md, session 22)."""
    engine = create_engine(sqlalchemy_url(scratch_url))
    try:
        upgrade(scratch_url)
        with engine.begin() as conn:
            _customers(conn, "p", 1000)
            conn.execute(
                text("INSERT INTO api_keys (public_id, account_id, name)"
                     " SELECT 'key_p' || substr(public_id, 7), id, 'k' FROM accounts WHERE external_id LIKE 'p%'")
            )  # fmt: skip
            conn.execute(
                text("INSERT INTO holds (account_id, key_id, request_id, amount, status, fingerprint, expires_at)"
                     " SELECT k.account_id, CASE WHEN n % 2 = 0 THEN k.id END, 'r' || k.id || '_' || n, 1,"
                     "        CASE WHEN n = 3 THEN 'captured' ELSE 'open' END, 'f', now() + n * interval '1 minute'"
                     " FROM api_keys k CROSS JOIN generate_series(1, 4) AS n")
            )  # fmt: skip
            conn.execute(text("ANALYZE"))
        with engine.connect() as conn:
            conn.exec_driver_sql("SET plan_cache_mode = force_generic_plan")
            values = {"key": "key_p5", "account": "acct_p5", "now": "2026-11-29 00:00:00+00", "month": "2026-11-01",
                      "generation": "gen_p", "request_id": "req_p"}  # fmt: skip
            for name, statement in [("hold", service.HOLD_SQL), ("charge", service.CHARGE_BYOK_SQL)]:
                conn.exec_driver_sql(plans.prepare(name, statement))
                literals = {n: f"'{v}'" for n, v in values.items()}
                (plan,) = conn.exec_driver_sql(plans.explain(name, statement, literals)).scalar_one()
                scans = plans.scans(plan["Plan"], "open_holds")
                assert len(scans) == 3, (name, scans)  # the account's sum, the key's, the holds on expired lots
                for scan in scans:
                    bound = scan.get("Index Cond") or scan.get("Recheck Cond") or ""
                    assert "expires_at" in bound and ("account_id" in bound or "key_id" in bound), (name, scan)
    finally:
        engine.dispose()


def test_purchased_starts_with_what_the_lots_already_say_was_paid_for(scratch_url: str) -> None:
    """Migration 0022: each balance's `purchased` starts as the paid lots its purchases and paid grants created
    (not a won dispute's paid lot, not an adjustment's, not a promotional grant's); downgrading drops it."""
    engine = create_engine(sqlalchemy_url(scratch_url))
    try:
        upgrade(scratch_url, "0021_open_holds_by_payer_expiry")
        with engine.begin() as conn:
            accounts = _customers(conn, "b", 2)
            conn.execute(text("INSERT INTO balances (account_id) SELECT unnest(CAST(:a AS bigint[]))"), {"a": accounts})
            lots = [("purchase", "paid", "7"), ("grant", "paid", "4"), ("grant", "promotional", "100"),
                    ("adjustment", "paid", "50"), ("dispute", "paid", "5")]  # fmt: skip
            for kind, category, amount in lots:
                conn.execute(
                    text("WITH e AS (INSERT INTO journal_entries (kind, account_id, description)"
                         "           VALUES (:k, :a, 'test') RETURNING id, posted_at),"
                         " l AS (INSERT INTO lots (account_id, category, amount, remaining, expires_at, entry_id)"
                         "       SELECT :a, :c, :m, :m, now(), e.id FROM e RETURNING id)"
                         " INSERT INTO postings (entry_id, account_id, lot_id, amount, balance_after, posted_at)"
                         " SELECT e.id, :a, l.id, :m, :m, e.posted_at FROM e, l UNION ALL"
                         " SELECT e.id, (SELECT min(id) FROM accounts WHERE kind = 'platform'), NULL, -:m, NULL,"
                         "        e.posted_at FROM e"),
                    {"k": kind, "a": accounts[0], "c": category, "m": Decimal(amount)},
                )  # fmt: skip
        upgrade(scratch_url)
        with engine.connect() as conn:
            purchased = dict(conn.execute(text("SELECT account_id, purchased FROM balances")).all())
            assert purchased == {accounts[0]: Decimal("11"), accounts[1]: Decimal("0")}
        downgrade(scratch_url, "0021_open_holds_by_payer_expiry")
        with engine.connect() as conn:
            assert "purchased" not in {c["name"] for c in inspect(conn).get_columns("balances")}
    finally:
        engine.dispose()


def test_the_reconcilers_window_of_credits_is_an_index_range(scratch_url: str) -> None:
    """Migration 0023: the credits of a reconciler run's window are read through an index of their time, in the
    generic plan the service runs with, not by scanning every fulfilment ever made (counted in rows read)."""
    from billing.reconcile.service import CREDITS_IN_WINDOW

    engine = create_engine(sqlalchemy_url(scratch_url))
    try:
        upgrade(scratch_url)
        with engine.begin() as conn:
            conn.exec_driver_sql("SET LOCAL session_replication_role = replica")  # rows without their parents
            conn.execute(
                text("INSERT INTO fulfilments (payment_intent, purchase_id, entry_id, amount_cents, source, created_at)"
                     " SELECT 'pi_' || n, n, n, 1000, 'webhook',"
                     "        TIMESTAMPTZ '2026-11-29 12:00Z' - n * interval '30 minutes'"
                     " FROM generate_series(1, 20000) AS n")
            )  # fmt: skip
            conn.exec_driver_sql("ANALYZE fulfilments")
        with engine.connect() as conn:
            conn.exec_driver_sql("SET plan_cache_mode = force_generic_plan")
            conn.exec_driver_sql(plans.prepare("window_credits", str(CREDITS_IN_WINDOW)))
            values = {"start": "'2026-11-26 12:00Z'", "end": "'2026-11-29 12:00Z'"}
            explain = plans.explain("window_credits", str(CREDITS_IN_WINDOW), values, analyze=True)
            (plan,) = conn.exec_driver_sql(explain).scalar_one()
        scans = plans.scans(plan["Plan"], "fulfilments")
        assert len(scans) == 1 and scans[0]["Actual Rows"] == 144  # three days of one every 30 minutes
        assert scans[0]["Node Type"] != "Seq Scan" and scans[0].get("Rows Removed by Filter", 0) == 0
    finally:
        engine.dispose()


def test_an_accounts_disputes_and_its_months_top_ups_are_index_ranges(scratch_url: str) -> None:
    """Migration 0024: every account read asks whether the account has a dispute it did not win, and the auto
    top-up job what the account's top-ups took this month. In the generic plans the service runs them with, each
    reads the account's own rows (counted in rows read), not every dispute or every attempt ever made."""
    from billing.accounts.service import FIND_ACCOUNT
    from billing.purchases.auto_topup import SPENT_SINCE

    engine = create_engine(sqlalchemy_url(scratch_url))
    try:
        upgrade(scratch_url)
        with engine.begin() as conn:
            _customers(conn, "d", 2000)
            conn.execute(text("INSERT INTO balances (account_id) SELECT id FROM accounts WHERE kind <> 'platform'"))
            conn.exec_driver_sql("SET LOCAL session_replication_role = replica")  # rows without their parents
            conn.execute(
                text("INSERT INTO disputes (stripe_dispute, purchase_id, account_id, amount, fee_amount, status,"
                     "                      entry_id, reinstated_entry_id)"
                     " SELECT 'dp_' || a.id || '_' || n, a.id * 10 + n, a.id, 1, 0.15,"
                     "        CASE WHEN n = 1 THEN 'lost' ELSE 'won' END, a.id * 10 + n,"
                     "        CASE WHEN n = 1 THEN NULL ELSE a.id * 10 + n + 5 END"
                     " FROM accounts a CROSS JOIN generate_series(1, 3) AS n WHERE a.external_id LIKE 'd%'")
            )  # fmt: skip
            conn.execute(
                text("INSERT INTO auto_topup_attempts (account_id, status, amount, created_at)"
                     " SELECT a.id, 'succeeded', 10, TIMESTAMPTZ '2026-11-29 12:00Z' - n * interval '1 day'"
                     " FROM accounts a CROSS JOIN generate_series(1, 400) AS n WHERE a.external_id IN ('d1', 'd2')")
            )  # fmt: skip
            conn.exec_driver_sql("ANALYZE")
            d1 = conn.execute(text("SELECT id FROM accounts WHERE external_id = 'd1'")).scalar_one()
        with engine.connect() as conn:
            conn.exec_driver_sql("SET plan_cache_mode = force_generic_plan")
            read = {}
            for name, statement, values, relation in [
                ("account", str(FIND_ACCOUNT), {"p": "'acct_d1'", "now": "now()"}, "disputes"),
                ("spent", str(SPENT_SINCE), {"a": str(d1), "m": "'2026-11-01 00:00Z'"}, "auto_topup_attempts"),
            ]:
                conn.exec_driver_sql(plans.prepare(name, statement))
                (plan,) = conn.exec_driver_sql(plans.explain(name, statement, values, analyze=True)).scalar_one()
                read[name] = plans.rows_read(plan["Plan"], relation)
        assert read == {"account": 1, "spent": 28}  # its one dispute not won; its top-ups of November 1–28
    finally:
        engine.dispose()
