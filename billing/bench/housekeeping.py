"""What the database server, the kernel and the hypervisor did during one latency window, beside the load.

On the 2-core benchmark host the open-loop p99 is set by a few bursts of ~100–300 ms in which every commit
waits (docs/performance.md, session 9): the kernel writing back a few hundred MB of the database's dirty
pages at once (a WAL flush queues behind it), a checkpoint's final sync, autovacuum's pass over the growing
ledger tables, WAL segments created on a young cluster. None of them is the service's work, and which of
them falls inside a 20 s window decides much of that window's p99 — for the service and for pgbench alike.
`Housekeeping` counts them over a window, so a run's JSON says what its latency windows contained.

- `checkpoints`, `checkpoint_buffers`, `checkpoint_sync_ms`: checkpoints begun in the window, buffers
  checkpoints wrote in it and time spent syncing files (PostgreSQL reports a checkpoint's sync when it ends).
- `autovacuum_runs`: autovacuum and autoanalyze passes finished on the database's tables, and
  `autovacuum_tables` which tables they were (`{"postings": {"vacuum": 1}}`): a pass over a growing ledger table
  costs a window far more than one over `balances`.
- `wal_mb`: WAL written, server-wide.
- `disk_written_mb`, `largest_write_burst_mb`: everything this machine wrote to its disks, and the most in
  one SAMPLE_S interval (Linux, `/proc/vmstat`; None when the server runs elsewhere): a kernel writeback
  burst shows as tens to hundreds of MB.
- `steal_pct`, `largest_steal_ms`: on a virtual machine, the share of all cores' time the hypervisor gave to
  other guests while this one had work to run (`/proc/stat`'s steal), and the most of it in one SAMPLE_S
  interval, in milliseconds summed over the cores (None where /proc/stat is missing). Up to 17% of a scratch
  window's time was stolen on one benchmark host (docs/performance.md, session 13): such a window measures
  the neighbours as much as the code.
- `sync_writes`, `sync_p50_ms`, `sync_p99_ms`, `sync_max_ms`: what one durable write cost on the disk the
  server's WAL is on, measured outside PostgreSQL: every SYNC_PROBE_S an 8 kB block rewritten in a file beside
  the data directory and `fdatasync`ed, as a commit rewrites and flushes its WAL page (None when the server's
  directory is not on this machine or not readable). Every acknowledged charge waits for one such flush; when
  the probe's own p99 is above the latency target, no durable commit met it in that window (docs/performance.md,
  session 21: the probe's p99.9 was 120 ms and its slowest write 428 ms in a window of spread charges at 1,000/s,
  against 1.2 and 14 ms on the same disk at rest).
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from billing.bench.loadgen import percentile_ms

SAMPLE_S = 0.1
SYNC_PROBE_S = 0.02
_BLOCK = b"\0" * 8192
_TICKS = os.sysconf("SC_CLK_TCK")
_CHECKPOINTER = {  # PostgreSQL 17 moved the checkpointer's figures out of pg_stat_bgwriter
    True: "SELECT num_timed + num_requested, buffers_written, sync_time FROM pg_stat_checkpointer",
    False: "SELECT checkpoints_timed + checkpoints_req, buffers_checkpoint, checkpoint_sync_time FROM pg_stat_bgwriter",
}
# (a table by its regclass name, qualified when outside the search path: two schemas may share a table's name)
_AUTOVACUUM = "SELECT relid::regclass::text, autovacuum_count, autoanalyze_count FROM pg_stat_user_tables"
_WAL = "SELECT pg_current_wal_insert_lsn() - '0/0'"  # bytes of WAL ever written, server-wide, as of now


def disk_written_kb() -> int | None:
    """KB written to block devices since boot (`pgpgout`), or None where /proc/vmstat is missing."""
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                if line.startswith("pgpgout "):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def steal_and_total(line: str) -> tuple[int, int]:
    """Stolen and total clock ticks, all cores, from the `cpu` line of /proc/stat (user nice system idle
    iowait irq softirq steal ...; guest time is already inside user)."""
    values = [int(v) for v in line.split()[1:9]]
    return values[7], sum(values)


def cpu_ticks() -> tuple[int, int] | None:
    """(stolen, total) clock ticks of this machine since boot, or None where /proc/stat is missing."""
    try:
        with open("/proc/stat") as f:
            return steal_and_total(f.readline())
    except (OSError, ValueError, IndexError):
        return None


def sync_probe_directory(url: str) -> Path | None:
    """A directory on the disk the server at `url` writes its WAL to, outside the server's own directories,
    that this process may write to: the parent of the data directory (the embedded server's data folder), or
    the directory holding `pg_wal` when the WAL is elsewhere. None when the server's files are not on this machine
    or not ours to see (`data_directory` is a superuser's setting to read)."""
    import psycopg

    try:
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute("SELECT current_setting('data_directory')").fetchone()
        data = Path(row[0]).resolve(strict=True) if row else None
        if data is None:
            return None
        wal = (data / "pg_wal").resolve(strict=True)
        device = wal.stat().st_dev
        for candidate in (data.parent, wal.parent):
            if candidate != data and candidate.stat().st_dev == device and os.access(candidate, os.W_OK):
                return candidate
    except (psycopg.Error, OSError):
        return None
    return None


class Housekeeping:
    """`with Housekeeping(url, disk=...) as window: ...` then `window.report()`; `url` names the database whose
    tables autovacuum is counted on (the server's own figures are server-wide); `disk`: the server runs on
    this machine, so its disk writes are this machine's, and its WAL's disk is probed with durable writes."""

    def __init__(self, url: str, *, disk: bool) -> None:
        self.url = url
        self.disk = disk
        self._before: tuple[Any, ...] = ()
        self._after: tuple[Any, ...] = ()
        self._disk: list[int] = []
        self._cpu: list[tuple[int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="housekeeping", daemon=True)
        self._syncs_ns: list[int] = []
        self._probe: threading.Thread | None = None

    def _server(self) -> tuple[Any, ...]:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            version = conn.info.server_version
            checkpoints, buffers, sync_ms = conn.execute(_CHECKPOINTER[version >= 170000]).fetchone() or (0, 0, 0)
            autovacuum = {table: (int(v), int(a)) for table, v, a in conn.execute(_AUTOVACUUM).fetchall()}
            (wal,) = conn.execute(_WAL).fetchone() or (0,)
        return int(checkpoints), int(buffers), float(sync_ms), autovacuum, int(wal)

    def _sample_disk(self) -> None:
        written = disk_written_kb()
        if written is not None:
            self._disk.append(written)

    def _sample_machine(self) -> None:
        if self.disk:
            self._sample_disk()
        ticks = cpu_ticks()
        if ticks is not None:
            self._cpu.append(ticks)

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self._sample_machine()

    @property
    def synced(self) -> int:
        """Durable writes the sync probe has made so far in this window."""
        return len(self._syncs_ns)

    def _sync_probe(self, directory: Path) -> None:
        fd, name = tempfile.mkstemp(prefix=".billing-bench-sync-", dir=directory)
        try:
            while not self._stop.wait(SYNC_PROBE_S):
                began = time.perf_counter_ns()
                os.pwrite(fd, _BLOCK, 0)
                os.fdatasync(fd)
                self._syncs_ns.append(time.perf_counter_ns() - began)
        finally:
            os.close(fd)
            os.unlink(name)

    def __enter__(self) -> Housekeeping:
        directory = sync_probe_directory(self.url) if self.disk else None
        if directory is not None:
            self._probe = threading.Thread(target=self._sync_probe, args=(directory,), name="sync-probe", daemon=True)
        self._before = self._server()
        self._sample_machine()  # the window's first and last samples are taken here and in __exit__
        self._thread.start()
        if self._probe is not None:
            self._probe.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
        if self._probe is not None:
            self._probe.join()
        self._sample_machine()
        self._after = self._server()

    def report(self) -> dict[str, Any]:
        (c0, b0, s0, a0, w0), (c1, b1, s1, a1, w1) = self._before, self._after
        steps = [b - a for a, b in zip(self._disk, self._disk[1:], strict=False)]
        stolen = [b[0] - a[0] for a, b in zip(self._cpu, self._cpu[1:], strict=False)]
        (stolen0, ticks0), (stolen1, ticks1) = (self._cpu[0], self._cpu[-1]) if self._cpu else ((0, 0), (0, 0))
        return {
            "checkpoints": c1 - c0,
            "checkpoint_buffers": b1 - b0,
            "checkpoint_sync_ms": round(s1 - s0, 1),
            **autovacuum_passes(a0, a1),
            "wal_mb": round((w1 - w0) / 2**20, 1),
            "disk_written_mb": round((self._disk[-1] - self._disk[0]) / 1024, 1) if len(self._disk) > 1 else None,
            "largest_write_burst_mb": round(max(steps) / 1024, 1) if steps else None,
            "steal_pct": round(100 * (stolen1 - stolen0) / (ticks1 - ticks0), 1) if ticks1 > ticks0 else None,
            "largest_steal_ms": round(max(stolen) * 1000 / _TICKS) if stolen else None,
            **sync_figures(self._syncs_ns if self._probe is not None else None),
        }


def autovacuum_passes(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """The autovacuum and autoanalyze passes between two readings of each table's (vacuums, analyzes): their
    number, and per table that had any, how many of each kind."""
    tables: dict[str, dict[str, int]] = {}
    for table, (vacuums, analyzes) in sorted(after.items()):
        v0, a0 = before.get(table, (0, 0))
        passes = {"vacuum": vacuums - v0, "analyze": analyzes - a0}
        if any(passes.values()):
            tables[table] = {kind: n for kind, n in passes.items() if n}
    return {"autovacuum_runs": sum(sum(p.values()) for p in tables.values()), "autovacuum_tables": tables}


def sync_figures(syncs_ns: list[int] | None) -> dict[str, Any]:
    """The sync probe's count and p50 / p99 / max in ms; None each when there was no probe."""

    def ms(q: float) -> float | None:
        value = percentile_ms(syncs_ns or [], q)
        return None if value is None else round(value, 2)

    return {
        "sync_writes": None if syncs_ns is None else len(syncs_ns),
        "sync_p50_ms": ms(50),
        "sync_p99_ms": ms(99),
        "sync_max_ms": ms(100),
    }


# Settings from anywhere but PostgreSQL's built-in defaults and the connection itself: the server's configuration
# files (ALTER SYSTEM writes one of them) and its command line.
_CONFIGURED = (
    "SELECT name, current_setting(name) FROM pg_settings"
    " WHERE source NOT IN ('default', 'client', 'session', 'override') ORDER BY name"
)


def server_settings(url: str) -> dict[str, str]:
    """What the server at `url` runs with besides its built-in defaults. A run's figures are of that
    configuration, and one an experiment left behind (an `ALTER SYSTEM` never reset) shows here."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        return {str(name): str(value) for name, value in conn.execute(_CONFIGURED)}
