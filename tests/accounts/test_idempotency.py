"""Idempotency keys: a retry replays the first outcome; another body under the same key is a 409."""

import asyncio
import uuid

from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import ADMIN, Api, snapshot


async def _entries(engine: AsyncEngine, account: str) -> int:
    async with engine.connect() as conn:
        return await conn.scalar(
            text(
                "SELECT count(*) FROM journal_entries e JOIN accounts a ON a.id = e.account_id WHERE a.public_id = :p"
            ),
            {"p": account},
        )


async def test_retry_replays_the_original_result(api: Api, client: AsyncTestClient, engine: AsyncEngine) -> None:
    acct = (await api.account())["id"]
    headers = {**ADMIN, "Idempotency-Key": uuid.uuid4().hex}
    body = {"amount": "2.50", "reason": "promo", "category": "promotional"}
    first = await client.post(f"/v1/accounts/{acct}/grants", json=body, headers=headers)
    await api.grant(acct, "1.00")  # the balance moves on in between
    again = await client.post(f"/v1/accounts/{acct}/grants", json=body, headers=headers)
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()
    assert again.headers.get("idempotent-replayed") == "true" and "idempotent-replayed" not in first.headers
    assert await _entries(engine, acct) == 2
    assert (await api.balance(acct))["balance"] == "3.50"


async def test_same_key_with_another_body_is_409_and_changes_nothing(
    api: Api, client: AsyncTestClient, engine: AsyncEngine
) -> None:
    acct = (await api.account())["id"]
    headers = {**ADMIN, "Idempotency-Key": uuid.uuid4().hex}
    r = await client.post(f"/v1/accounts/{acct}/grants", json={"amount": "1.00", "reason": "a"}, headers=headers)
    assert r.status_code == 201
    before = await snapshot(engine)
    r = await client.post(f"/v1/accounts/{acct}/grants", json={"amount": "1000.00", "reason": "a"}, headers=headers)
    assert r.status_code == 409 and r.json()["error"]["code"] == "idempotency_key_reused"
    assert r.json()["error"]["type"] == "idempotency_error"
    assert await snapshot(engine) == before


async def test_refusal_is_replayed_not_retried(api: Api, client: AsyncTestClient) -> None:
    """A retry can never end differently from the first attempt, even after the balance changed."""
    acct = (await api.account())["id"]
    headers = {**ADMIN, "Idempotency-Key": uuid.uuid4().hex}
    body = {"amount": "-5.00", "reason": "claw back"}
    first = await client.post(f"/v1/accounts/{acct}/adjustments", json=body, headers=headers)
    assert first.status_code == 402
    await api.grant(acct, "10.00")
    again = await client.post(f"/v1/accounts/{acct}/adjustments", json=body, headers=headers)
    assert again.status_code == 402 and again.json() == first.json()
    assert (await api.balance(acct))["balance"] == "10.00"


async def test_keys_are_per_tenant(api: Api, client: AsyncTestClient) -> None:
    """The platform's key space is not an account's: the same key string used by both is two requests."""
    acct = (await api.account())["id"]
    shared = uuid.uuid4().hex
    r = await client.post(
        f"/v1/accounts/{acct}/grants",
        json={"amount": "1.00", "reason": "a"},
        headers={**ADMIN, "Idempotency-Key": shared},
    )
    assert r.status_code == 201
    other = (await api.account())["id"]
    r = await client.post(
        f"/v1/accounts/{other}/grants",
        json={"amount": "1.00", "reason": "a"},
        headers={**ADMIN, "Idempotency-Key": shared},
    )
    assert r.status_code == 409  # same tenant (platform staff), other request


async def test_concurrent_same_key_in_process(api: Api, client: AsyncTestClient, engine: AsyncEngine) -> None:
    acct = (await api.account())["id"]
    headers = {**ADMIN, "Idempotency-Key": uuid.uuid4().hex}
    body = {"amount": "0.01", "reason": "race"}
    responses = await asyncio.gather(
        *[client.post(f"/v1/accounts/{acct}/grants", json=body, headers=headers) for _ in range(20)]
    )
    assert {r.status_code for r in responses} == {201}
    assert len({r.json()["entry"]["id"] for r in responses}) == 1
    assert await _entries(engine, acct) == 1
