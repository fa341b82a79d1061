"""Tickets talk to a Stripe emulator of their own: a window ticket walks every payment there, and the
payments these tests make must not crowd other tests' views of the shared emulator. The app under test
is the session's, on the same database, pointed at that emulator (`client`, and so `api`, here)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import replace

import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy.ext.asyncio import AsyncEngine

from billing.settings import Settings
from tests.stripe_helpers import start_localstripe


@pytest.fixture(scope="session")
def support_stripe() -> Iterator[str]:
    with start_localstripe() as base:
        yield base


@pytest.fixture(scope="session")
def support_settings(settings: Settings, support_stripe: str) -> Settings:
    return replace(settings, stripe_api_base=support_stripe)


@pytest.fixture(scope="session")
async def client(support_settings: Settings, engine: AsyncEngine) -> AsyncIterator[AsyncTestClient]:
    from billing.app import create_asgi
    from tests.conftest import served

    async with served(create_asgi(support_settings)) as c:
        yield c
