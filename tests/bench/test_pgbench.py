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
