"""Test fixtures: a real PostgreSQL database per test session, the app in-process, and the ledger's
invariants checked once every test has run.

`DATABASE_URL` names the server (CI: the machine's PostgreSQL); with none set, the tests start the
embedded one, like `billing dev` does. Each session gets a fresh database, migrated through Alembic,
and drops it at the end. Tests never clean up between themselves: the ledger is append-only, so each
test makes its own accounts.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import psycopg
import pytest
import uvicorn
from litestar.testing import AsyncTestClient
from litestar.testing.transport import TestClientTransport
from psycopg import sql
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from billing.db import pipeline
from billing.settings import Settings, libpq_url, sqlalchemy_url

ADMIN_TOKEN = "test-admin-" + secrets.token_hex(8)
ROOT = Path(__file__).resolve().parents[1]


def server_url() -> str:
    url = os.environ.get("DATABASE_URL")
    if url:
        return libpq_url(url)
    from billing.embedded import start_postgres

    return start_postgres(ROOT / ".data" / "test")


def with_database(url: str, name: str) -> str:
    """The same server URL pointing at another database (works for host and unix-socket URLs)."""
    info = psycopg.conninfo.conninfo_to_dict(url)
    info["dbname"] = name
    return "postgresql://?" + urlencode({k: v for k, v in info.items() if v is not None})


def create_database(prefix: str = "billing_test") -> str:
    base = server_url()
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return with_database(base, name)


def drop_database(url: str) -> None:
    name = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
    with psycopg.connect(with_database(url, "postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    from billing.db.migrate import upgrade

    url = create_database()
    upgrade(url)
    yield url
    drop_database(url)


@pytest.fixture(scope="session")
def localstripe() -> Iterator[str]:
    """The Stripe emulator on 127.0.0.1 (a free port), its objects in memory only; yields its API base."""
    from tests.stripe_helpers import start_localstripe

    with start_localstripe() as base:
        yield base


@pytest.fixture(scope="session")
def settings(database_url: str, localstripe: str) -> Settings:
    from billing.stripe_client import LOCAL_API_KEY
    from tests.stripe_helpers import WEBHOOK_SECRET

    return Settings(
        database_url=database_url,
        redis_url=os.environ.get("REDIS_URL") or _embedded_redis(),
        admin_token=ADMIN_TOKEN,
        token_cache_seconds=0,
        stripe_api_key=LOCAL_API_KEY,
        stripe_api_base=localstripe,
        stripe_webhook_secret=WEBHOOK_SECRET,
    )


def _embedded_redis() -> str:
    from billing.embedded import start_redis

    return start_redis(ROOT / ".data" / "test")


@pytest.fixture(scope="session")
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    eng = create_async_engine(sqlalchemy_url(database_url), pool_size=5, connect_args={"options": "-c timezone=UTC"})
    yield eng
    async with eng.connect() as conn:
        from billing.verify import verify_ledger

        problems = await verify_ledger(conn)
    await pipeline.dispose(eng)
    assert problems == {}, f"ledger invariants broken after the test run: {problems}"


@pytest.fixture(scope="session")
async def client(settings: Settings, engine: AsyncEngine) -> AsyncIterator[AsyncTestClient]:
    from billing.app import create_asgi

    async with served(create_asgi(settings)) as c:
        yield c


class SideBySide(TestClientTransport):  # type: ignore[type-arg]
    """Litestar's test transport runs the app in its portal's event loop and blocks the caller's loop until
    the answer: requests a test gathers would run one after another, and a test of concurrent requests could
    not fail. Here each request waits in a thread of its own, so gathered requests run side by side in the
    app's loop, as on a server."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await asyncio.to_thread(self.handle_request, request)


def served(asgi: Any) -> AsyncTestClient:
    """A test client of what the server runs (`create_asgi`: the gateway's fast path in front of the app).
    Made on the Litestar app (the client wraps any other ASGI app and would hide its `state`), then pointed
    at the whole; its requests run side by side (`SideBySide`)."""
    client = AsyncTestClient(app=asgi.app)
    client.app = asgi
    client._transport = SideBySide(client=client)
    return client


@contextmanager
def uvicorn_thread(asgi: Any) -> Iterator[tuple[int, uvicorn.Server]]:
    """`asgi` served by uvicorn in a thread, on a free port of 127.0.0.1, with the gateway's HTTP protocol as
    in production: requests to it run side by side. Its port and server, once it has started."""
    from billing.gateway.protocol import GatewayProtocol

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(
        asgi, host="127.0.0.1", port=port, http=GatewayProtocol, log_level="warning", server_header=False
    )
    serving = uvicorn.Server(config)
    thread = threading.Thread(target=serving.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not serving.started:  # readiness with a deadline, not a timing assumption
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield port, serving
    finally:
        serving.should_exit = True
        thread.join(30)


ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
# A time PostgreSQL stores but Python cannot read back: 10000-01-01T04:59:59Z. Every request refuses it (400).
BEYOND_YEAR_9999_UTC = "9999-12-31T23:59:59-05:00"


def key() -> dict[str, str]:
    return {"Idempotency-Key": uuid.uuid4().hex}


@dataclass
class Api:
    """Small helpers so tests read like the calls a gateway or support agent makes."""

    client: AsyncTestClient

    async def account(self, kind: str = "user", headers: dict[str, str] = ADMIN) -> dict[str, Any]:
        r = await self.client.post(
            "/v1/accounts", json={"external_id": f"user_{uuid.uuid4().hex}", "kind": kind}, headers=headers
        )
        assert r.status_code == 201, r.text
        return r.json()

    async def grant(self, account: str, amount: str, **extra: Any) -> dict[str, Any]:
        r = await self.client.post(
            f"/v1/accounts/{account}/grants",
            json={"amount": amount, "reason": "test", **extra},
            headers={**ADMIN, **key()},
        )
        assert r.status_code == 201, r.text
        return r.json()

    async def balance(self, account: str) -> dict[str, Any]:
        r = await self.client.get(f"/v1/accounts/{account}/balance", headers=ADMIN)
        assert r.status_code == 200, r.text
        return r.json()

    async def token(self, scopes: list[str], account: str | None = None) -> dict[str, str]:
        body: dict[str, Any] = {"name": "t", "scopes": scopes}
        if account:
            body["account"] = account
        r = await self.client.post("/v1/tokens", json=body, headers=ADMIN)
        assert r.status_code == 201, r.text
        return {"Authorization": f"Bearer {r.json()['secret']}"}


@pytest.fixture
def api(client: AsyncTestClient) -> Api:
    return Api(client)


TABLES = (
    "accounts",
    "balances",
    "journal_entries",
    "postings",
    "lots",
    "idempotency_keys",
    "audit_log",
    "api_tokens",
)


async def open_idle(engine: AsyncEngine, n: int) -> list[int]:
    """Leave `n` of the hot path's connections to `engine`'s database idle; their server process ids."""
    release = asyncio.Event()
    pids: list[int] = []

    async def hold_one() -> None:
        async with pipeline.transaction(engine) as tx:
            (row,) = (await tx.run(("SELECT pg_backend_pid() AS pid", {})))[0]
            pids.append(row.pid)
            if len(pids) == n:
                release.set()
            await release.wait()  # all n open at once, so none is reused for another

    await asyncio.gather(*(hold_one() for _ in range(n)))
    return pids


async def terminate_backends(engine: AsyncEngine, pids: list[int]) -> None:
    """What a database restart does to these server processes: terminated, and gone before this returns."""
    async with engine.connect() as conn:
        await conn.execute(text("SELECT pg_terminate_backend(pid) FROM unnest(CAST(:p AS int[])) AS pid"), {"p": pids})
        for _ in range(1000):
            # (each check in a transaction of its own: within one, pg_stat_activity answers from a snapshot)
            await conn.commit()
            if not await conn.scalar(text("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(:p)"), {"p": pids}):
                return
            await asyncio.sleep(0.01)
    raise AssertionError(f"server processes {pids} still there 10 s after being terminated")


async def snapshot(engine: AsyncEngine) -> dict[str, Any]:
    """Everything a request could have changed: row counts, and every money column's total."""
    async with engine.connect() as conn:
        counts = {t: await conn.scalar(text(f"SELECT count(*) FROM {t}")) for t in TABLES}
        money = (
            await conn.execute(
                text("SELECT sum(balance), sum(total_credits), sum(total_usage), max(updated_at) FROM balances")
            )
        ).one()
        lots = await conn.scalar(text("SELECT sum(remaining) FROM lots"))
    return {"counts": counts, "money": tuple(money), "lots": lots}


@pytest.fixture
def clock_at() -> Iterator[Any]:
    """Move the service's clock to a given UTC instant (in-process app only); restored afterwards."""
    from datetime import UTC, datetime

    from billing import clock

    def move(when: datetime) -> None:
        clock.set_offset(when - datetime.now(UTC))

    yield move
    from datetime import timedelta

    clock.set_offset(timedelta(0))
