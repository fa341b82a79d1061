"""Fixtures for the background jobs: a database of their own (the jobs act on every account, so they must
not reach the accounts other tests are still looking at), the app on it for making accounts, grants and
holds, and real `billing worker` processes on the real Redis broker under a namespace unique to this
session. Waiting is always polling with a deadline, never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from types import ModuleType
from typing import Any

import pytest
import redis
from dramatiq import Message
from dramatiq.brokers.redis import RedisBroker
from litestar.testing import AsyncTestClient
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from billing import clock
from billing.context import Context
from billing.db import pipeline
from billing.db.journal import Journal
from billing.settings import Settings, sqlalchemy_url
from tests.conftest import ROOT, Api, create_database, drop_database

DEADLINE_SECONDS = 60.0


_namespaces: list[str] = []


def namespace() -> str:
    """A Redis namespace of its own (queues, dead letters, schedule slots); removed at the session's end."""
    name = f"billing_test_{uuid.uuid4().hex[:10]}"
    _namespaces.append(name)
    return name


@pytest.fixture(scope="session", autouse=True)
def forget_namespaces(settings: Settings) -> Iterator[None]:
    yield
    client = redis.Redis.from_url(settings.redis_url or "")
    for name in _namespaces:
        keys = list(client.scan_iter(match=f"{name}:*"))
        if keys:
            client.delete(*keys)


@pytest.fixture(scope="session")
def jobs_database_url() -> Iterator[str]:
    from billing.db.migrate import upgrade

    url = create_database("billing_jobs")
    upgrade(url)
    yield url
    drop_database(url)


@pytest.fixture(scope="session")
def jobs_settings(settings: Settings, jobs_database_url: str) -> Settings:
    return replace(settings, database_url=jobs_database_url, queue_namespace=namespace(), hold_expiry_grace=0)


@pytest.fixture(scope="session")
async def jobs_engine(jobs_database_url: str) -> AsyncIterator[AsyncEngine]:
    eng = create_async_engine(
        sqlalchemy_url(jobs_database_url), pool_size=5, connect_args={"options": "-c timezone=UTC"}
    )
    yield eng
    async with eng.connect() as conn:
        from billing.verify import verify_ledger

        problems = await verify_ledger(conn)
    await pipeline.dispose(eng)
    assert problems == {}, f"ledger invariants broken after the jobs' tests: {problems}"


@pytest.fixture(scope="session")
def ctx(jobs_engine: AsyncEngine, jobs_settings: Settings) -> Context:
    return Context(db=jobs_engine, journal=Journal(), settings=jobs_settings)


@pytest.fixture(scope="session")
async def jobs_client(jobs_settings: Settings, jobs_engine: AsyncEngine) -> AsyncIterator[AsyncTestClient]:
    from billing.app import create_asgi
    from tests.conftest import served

    async with served(create_asgi(jobs_settings)) as c:
        yield c


@pytest.fixture
def jobs_api(jobs_client: AsyncTestClient) -> Api:
    return Api(jobs_client)


@pytest.fixture(scope="session")
def actors(jobs_settings: Settings) -> ModuleType:
    """The actors, declared in this process on the session's broker (so `.send()` reaches its workers)."""
    from workers.broker import setup_broker

    broker = setup_broker(jobs_settings)
    assert broker.namespace == jobs_settings.queue_namespace, "the broker was set up before this session"
    from workers import actors

    return actors


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BILLING_", "DATABASE_URL", "REDIS_URL"))}
    env.update(
        DATABASE_URL=settings.database_url or "",
        REDIS_URL=settings.redis_url or "",
        BILLING_QUEUE_NAMESPACE=settings.queue_namespace,
        BILLING_HOLD_EXPIRY_GRACE=str(settings.hold_expiry_grace),
        BILLING_LOG_LEVEL="INFO",
    )
    env.update(extra)
    return env


def billing(*args: str, env: dict[str, str], **kwargs: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "billing.cli", *args], cwd=ROOT, env=env, start_new_session=True, **kwargs
    )


def heartbeats(settings: Settings) -> set[bytes]:
    client = redis.Redis.from_url(settings.redis_url or "")
    return set(client.zrange(f"{settings.queue_namespace}:__heartbeats__", 0, -1))


@contextmanager
def running_worker(settings: Settings, *args: str, **env: str) -> Iterator[subprocess.Popen[bytes]]:
    """`billing worker` as a subprocess, ready (its broker has checked in with Redis) before the body runs."""
    before = heartbeats(settings)
    process = billing("worker", *args, env=worker_env(settings, **env))
    try:
        deadline = time.monotonic() + DEADLINE_SECONDS
        while not heartbeats(settings) - before:
            assert process.poll() is None, f"worker exited with {process.returncode}"
            assert time.monotonic() < deadline, "worker not ready"
            time.sleep(0.05)
        yield process
    finally:
        stop(process)


def stop(process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def worker(jobs_settings: Settings, jobs_engine: AsyncEngine) -> Iterator[subprocess.Popen[bytes]]:
    """One `billing worker` (4 threads) for the session's namespace."""
    with running_worker(jobs_settings, "--threads", "4") as process:
        yield process


def raw_broker(settings: Settings, **options: Any) -> RedisBroker:
    """A broker on another namespace, for tests that run their own workers there."""
    return RedisBroker(url=settings.redis_url, namespace=settings.queue_namespace, **options)


def send(broker: RedisBroker, actor: str, **options: Any) -> Message[Any]:
    return broker.enqueue(Message(queue_name="default", actor_name=actor, args=(), kwargs={}, options=options))


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = DEADLINE_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@contextmanager
def clock_moved(to: datetime) -> Iterator[None]:
    """The in-process app's clock at `to` (to make lots and holds that are already expired in real time)."""
    clock.set_offset(to - datetime.now(UTC))
    try:
        yield
    finally:
        clock.set_offset(timedelta(0))


def iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


async def expired_lot(api: Api, amount: str = "10.00", used: str | None = None) -> tuple[str, int]:
    """An account whose only lot expired a day ago (real time), `used` of it spent before then; returns
    the account and the lot's internal id."""
    from tests.conftest import ADMIN, key

    real = datetime.now(UTC)
    with clock_moved(real - timedelta(days=10)):
        account = (await api.account())["id"]
        grant = await api.grant(account, amount, expires_at=iso(real - timedelta(days=1)))
        if used:
            r = await api.client.post(
                f"/v1/accounts/{account}/adjustments",
                json={"amount": f"-{used}", "reason": "spent"},
                headers={**ADMIN, **key()},
            )
            assert r.status_code == 201, r.text
    return account, int(grant["lot"]["id"].removeprefix("lot_"))
