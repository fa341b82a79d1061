"""What a latency window contained besides the load: the server's checkpoints and WAL, the disk's writes."""

import os
import time
from pathlib import Path

import psycopg

from billing.bench.housekeeping import Housekeeping, autovacuum_passes, server_settings


def test_a_window_counts_the_checkpoint_wal_and_disk_writes_made_inside_it(database_url: str, tmp_path: Path) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE housekeeping_probe (id bigint, filler text)")
        try:
            with Housekeeping(database_url, disk=True) as window:
                conn.execute(
                    "INSERT INTO housekeeping_probe SELECT n, repeat('x', 200) FROM generate_series(1, 20000) AS n"
                )
                conn.execute("CHECKPOINT")
                with (tmp_path / "burst").open("wb") as f:  # 16 MB written and synced at once
                    f.write(b"\0" * (16 << 20))
                    f.flush()
                    os.fsync(f.fileno())
        finally:
            conn.execute("DROP TABLE housekeeping_probe")

    report = window.report()
    assert report["checkpoints"] >= 1, report
    assert report["checkpoint_buffers"] >= 1, report  # the probe's pages, dirty until the checkpoint
    assert report["wal_mb"] >= 4.0, report  # 20,000 rows of ~230 bytes
    assert report["disk_written_mb"] is not None and report["disk_written_mb"] >= 16.0, report
    assert report["largest_write_burst_mb"] is not None and report["largest_write_burst_mb"] >= 4.0, report
    tables = report["autovacuum_tables"]
    assert report["autovacuum_runs"] == sum(n for passes in tables.values() for n in passes.values()), report


def test_autovacuum_passes_name_the_tables_they_were_on() -> None:
    before = {"postings": (3, 1), "balances": (7, 7), "lots": (0, 0)}
    after = {"postings": (4, 1), "balances": (7, 9), "lots": (0, 0), "holds": (1, 1)}

    assert autovacuum_passes(before, after) == {
        "autovacuum_runs": 5,
        "autovacuum_tables": {
            "balances": {"analyze": 2},
            "holds": {"vacuum": 1, "analyze": 1},
            "postings": {"vacuum": 1},
        },
    }


def io_written_bytes() -> int:
    """What this process has sent to storage (`write_bytes` of /proc/self/io, counted as pages are dirtied)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("write_bytes:"))


def test_a_window_probes_the_disk_of_the_servers_wal_with_durable_writes(database_url: str) -> None:
    """Each probe write is flushed to the disk before the next: its page is clean again and the next write
    dirties it anew, so this process sends a page to storage per write (unflushed, the same dirty page would be
    counted once)."""
    from billing.bench.housekeeping import SYNC_PROBE_S, sync_probe_directory

    directory = sync_probe_directory(database_url)
    assert directory is not None  # the tests' server runs here and its superuser can read data_directory
    with psycopg.connect(database_url, autocommit=True) as conn:
        (data,) = conn.execute("SELECT current_setting('data_directory')").fetchone() or ("",)
    assert Path(data).resolve().parent == directory  # beside the data directory, never inside it
    before = sorted(directory.glob(".billing-bench-sync-*"))
    written = io_written_bytes()
    with Housekeeping(database_url, disk=True) as window:
        deadline = time.monotonic() + 60
        while window.synced < 10 and time.monotonic() < deadline:
            time.sleep(SYNC_PROBE_S)  # the probe writes once every SYNC_PROBE_S, flushes taking what they take
    written = io_written_bytes() - written

    report = window.report()
    assert report["sync_writes"] is not None and report["sync_writes"] >= 10, report
    assert written >= 4096 * report["sync_writes"], (written, report)
    assert 0.0 < report["sync_p50_ms"] <= report["sync_p99_ms"] <= report["sync_max_ms"], report
    assert sorted(directory.glob(".billing-bench-sync-*")) == before  # its file is gone


def test_a_server_elsewhere_reports_no_disk_figures_of_this_machine(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn, Housekeeping(database_url, disk=False) as window:
        conn.execute("CHECKPOINT")

    report = window.report()
    assert report["disk_written_mb"] is None and report["largest_write_burst_mb"] is None, report
    assert report["sync_writes"] is None and report["sync_p99_ms"] is None, report
    assert report["checkpoints"] >= 1, report  # the server's own figures are still counted


def test_a_server_on_this_machine_is_found_so_its_windows_report_disk_figures(database_url: str) -> None:
    """`local_postgres` decides whether pgbench's windows report this machine's disk writes and whose CPU the
    meter reads: the tests' server runs here, so it names its postmaster (the parent of every backend)."""
    from billing.bench.run import local_postgres

    for _ in range(20):  # the backend it asks is gone as soon as its connection closes: ask while it lives
        postmaster = local_postgres(database_url)
        assert postmaster is not None
        with open(f"/proc/{postmaster}/comm") as f:
            assert f.read().strip() == "postgres"
        with psycopg.connect(database_url) as conn:
            row = conn.execute("SELECT pg_backend_pid()").fetchone()
            assert row is not None
            with open(f"/proc/{row[0]}/stat", "rb") as f:
                assert int(f.read().rsplit(b")", 1)[1].split()[1]) == postmaster


def test_stolen_time_is_read_from_the_steal_column_of_proc_stat() -> None:
    """user nice system idle iowait irq softirq steal guest guest_nice: steal is the eighth figure, and the
    total is the first eight (guest time is already counted in user)."""
    from billing.bench.housekeeping import steal_and_total

    assert steal_and_total("cpu  85709 0 16505 293100 1838 0 1975 49 7 0") == (
        49,
        85709 + 16505 + 293100 + 1838 + 1975 + 49,
    )


def test_a_window_reports_the_share_of_its_time_the_hypervisor_stole(database_url: str) -> None:
    from billing.bench.housekeeping import cpu_ticks

    before = cpu_ticks()
    with psycopg.connect(database_url, autocommit=True) as conn, Housekeeping(database_url, disk=False) as window:
        conn.execute("SELECT count(*) FROM generate_series(1, 200000)")  # some work inside the window
    after = cpu_ticks()

    report = window.report()
    assert before is not None and after is not None  # Linux: /proc/stat is there
    stolen = after[0] - before[0]
    assert report["steal_pct"] is not None and 0.0 <= report["steal_pct"] <= 100.0, report
    assert report["largest_steal_ms"] is not None and 0 <= report["largest_steal_ms"] <= stolen * 1000 / os.sysconf(
        "SC_CLK_TCK"
    ), report


def test_a_run_reports_the_servers_settings_besides_its_built_in_defaults(database_url: str) -> None:
    """What a run's figures were measured with: the configuration file's and ALTER SYSTEM's settings (so one an
    experiment left behind shows), not the built-in defaults nor what the connection itself set."""
    import psycopg

    reported = server_settings(database_url)
    with psycopg.connect(database_url, autocommit=True) as conn:
        rows = conn.execute("SELECT name, source, current_setting(name) FROM pg_settings").fetchall()
    configured = {name: value for name, source, value in rows if source == "configuration file"}
    assert configured and configured.items() <= reported.items()  # every server is configured by some file
    defaults = {name for name, source, _ in rows if source == "default"}
    assert not defaults & reported.keys()
    assert "application_name" not in reported  # the connection's own, not the server's
