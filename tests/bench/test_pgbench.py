"""pgbench's open-loop reference: throttled to a rate, latency counted from each transaction's schedule."""

from pathlib import Path

from billing.bench.run import Timing, find_pgbench, libpq_env, pgbench_open_loop


def test_open_loop_latency_is_read_from_pgbench_s_log_in_milliseconds(database_url: str, tmp_path: Path) -> None:
    pgbench = find_pgbench()
    assert pgbench is not None, "pgbench is on PATH or bundled with pgserver"
    script = tmp_path / "sleep.sql"
    script.write_text("SELECT pg_sleep(0.02);\n")  # every transaction takes at least 20 ms

    out = pgbench_open_loop(
        [pgbench, "-n", "-f", str(script)],
        libpq_env(database_url),
        40.0,
        Timing(duration=2.0, warmup=0.0, pgbench=2.0),
        tmp_path / "log",
    )

    assert "error" not in out, out
    assert out["offered_rate"] == 40.0
    assert 50 <= out["transactions"] <= 110  # ~40/s for 2 s (pgbench's schedule is Poisson)
    assert 20.0 <= out["p50_ms"] <= out["p99_ms"] <= out["max_ms"] < 1000.0
    assert not list(tmp_path.glob("log.*")), "the per-transaction logs are removed"


def test_open_loop_latency_leaves_out_what_was_scheduled_in_the_warm_up(database_url: str, tmp_path: Path) -> None:
    """As the load generator does for the service: the first `warmup` seconds (pgbench's 64 connections
    starting) are run but not counted. Here every transaction begun in the run's first 0.6 s takes 200 ms, every
    later one 1 ms; with a 1 s warm-up none of the slow ones is counted."""
    import psycopg

    pgbench = find_pgbench()
    assert pgbench is not None
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE pgbench_warm_up_probe AS SELECT clock_timestamp() + interval '0.6 s' AS until")
    script = tmp_path / "slow_start.sql"
    script.write_text(
        "SELECT pg_sleep(CASE WHEN clock_timestamp() < (SELECT until FROM pgbench_warm_up_probe)"
        " THEN 0.2 ELSE 0.001 END);\n"
    )
    try:
        out = pgbench_open_loop(
            [pgbench, "-n", "-f", str(script)],
            libpq_env(database_url),
            40.0,
            Timing(duration=1.0, warmup=1.0, pgbench=1.0),
            tmp_path / "log",
        )
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("DROP TABLE pgbench_warm_up_probe")

    assert "error" not in out, out
    assert 15 <= out["transactions"] <= 75  # ~40/s for the 1 s after the warm-up, of a 2 s run
    assert out["max_ms"] < 150.0, out  # 200 ms and more with the warm-up counted
