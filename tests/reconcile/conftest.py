"""Fixtures for the reconciler: a database and a Stripe emulator of its own (it walks every payment in
Stripe and may credit any of them, so it must not reach other tests' purchases), the app on them, and
no webhook registered with that emulator — so every payment made there is one whose webhook never
arrived."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace

import pytest
import redis
import stripe
from litestar.testing import AsyncTestClient
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from billing.context import Context
from billing.db import pipeline
from billing.db.journal import Journal
from billing.settings import Settings, sqlalchemy_url
from billing.stripe_client import make_stripe
from tests.conftest import Api, create_database, drop_database
from tests.stripe_helpers import start_localstripe


@pytest.fixture(scope="session")
def recon_stripe() -> Iterator[str]:
    with start_localstripe() as base:
        yield base


@pytest.fixture(scope="session")
def recon_settings(settings: Settings, recon_stripe: str) -> Iterator[Settings]:
    from billing.db.migrate import upgrade

    url = create_database("billing_reconcile")
    upgrade(url)
    ns = f"billing_test_{uuid.uuid4().hex[:10]}"
    yield replace(settings, database_url=url, stripe_api_base=recon_stripe, queue_namespace=ns)
    client = redis.Redis.from_url(settings.redis_url or "")
    keys = list(client.scan_iter(match=f"{ns}:*"))
    if keys:
        client.delete(*keys)
    drop_database(url)


@pytest.fixture(scope="session")
async def recon_engine(recon_settings: Settings) -> AsyncIterator[AsyncEngine]:
    eng = create_async_engine(
        sqlalchemy_url(recon_settings.database_url or ""), pool_size=10, connect_args={"options": "-c timezone=UTC"}
    )
    yield eng
    async with eng.connect() as conn:
        from billing.verify import verify_ledger

        problems = await verify_ledger(conn)
    await pipeline.dispose(eng)
    assert problems == {}, f"ledger invariants broken after the reconciler's tests: {problems}"


@pytest.fixture(scope="session")
def recon_ctx(recon_engine: AsyncEngine, recon_settings: Settings) -> Context:
    return Context(db=recon_engine, journal=Journal(), settings=recon_settings)


@pytest.fixture(scope="session")
def sdk(recon_settings: Settings) -> stripe.StripeClient:
    client = make_stripe(recon_settings)
    assert client is not None
    return client


@pytest.fixture(scope="session")
async def recon_client(recon_settings: Settings, recon_engine: AsyncEngine) -> AsyncIterator[AsyncTestClient]:
    from billing.app import create_asgi
    from tests.conftest import served

    async with served(create_asgi(recon_settings)) as c:
        yield c


@pytest.fixture
def recon_api(recon_client: AsyncTestClient) -> Api:
    return Api(recon_client)
