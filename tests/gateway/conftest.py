from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from billing.settings import Settings
from tests.conftest import Api, served


class Gateway:
    """Calls the way the gateway makes them, with a gateway-scoped token."""

    def __init__(self, client: AsyncTestClient, headers: dict[str, str]) -> None:
        self.client = client
        self.headers = headers

    async def charge(self, expect: int | None = 201, **body: Any) -> Any:
        body.setdefault("generation_id", f"gen-{uuid.uuid4().hex}")
        r = await self.client.post("/v1/charges", json=body, headers=self.headers)
        if expect is not None:
            assert r.status_code == expect, r.text
        return r

    async def hold(self, expect: int | None = 201, **body: Any) -> Any:
        body.setdefault("request_id", f"req-{uuid.uuid4().hex}")
        r = await self.client.post("/v1/holds", json=body, headers=self.headers)
        if expect is not None:
            assert r.status_code == expect, r.text
        return r

    async def capture(self, hold: str, expect: int | None = 200, **body: Any) -> Any:
        body.setdefault("generation_id", f"gen-{uuid.uuid4().hex}")
        r = await self.client.post(f"/v1/holds/{hold}/capture", json=body, headers=self.headers)
        if expect is not None:
            assert r.status_code == expect, r.text
        return r

    async def release(self, hold: str, expect: int | None = 200, **body: Any) -> Any:
        r = await self.client.post(f"/v1/holds/{hold}/release", json=body, headers=self.headers)
        if expect is not None:
            assert r.status_code == expect, r.text
        return r


@pytest.fixture
async def gw(api: Api, client: AsyncTestClient) -> Gateway:
    return Gateway(client, await api.token(["gateway"]))


@pytest.fixture(params=["batched", "single"])
async def gw_path(
    request: pytest.FixtureRequest, api: Api, client: AsyncTestClient, settings: Settings
) -> AsyncIterator[Gateway]:
    """The gateway's calls served by batches, then (the second run) each in a transaction of its own, as with
    batching off or a failed batch's retry: both paths decide with the same rules, and a test of a rule
    runs on both."""
    headers = await api.token(["gateway"])
    if request.param == "batched":
        yield Gateway(client, headers)
        return
    from billing.app import create_asgi

    async with served(create_asgi(dataclasses.replace(settings, charge_batching=False))) as single:
        yield Gateway(single, headers)


async def funded(api: Api, amount: str = "1.00", kind: str = "user") -> str:
    account = (await api.account(kind=kind))["id"]
    await api.grant(account, amount)
    return account


@pytest.fixture
def client_ctx(client: AsyncTestClient) -> Any:
    """The in-process app's service context, to call a job's service function against the same database."""
    return client.app.state.context
