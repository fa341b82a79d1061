"""The token cache: a token in steady use is looked up again in the background before its entry expires
(no request waits for the database), concurrent misses share one lookup, no entry outlives its expiry,
and `forget` also discards lookups already in flight. Real PostgreSQL; only the cache's clock is ours."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from litestar.testing import AsyncTestClient
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from billing.auth.tokens import TokenResolver
from tests.conftest import ADMIN


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@contextmanager
def lookups(engine: AsyncEngine) -> Iterator[list[str]]:
    """Every token lookup the engine sends to the database while the block runs."""
    seen: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "FROM api_tokens WHERE token_hash" in statement:
            seen.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", count)


async def mint(client: AsyncTestClient) -> tuple[str, str]:
    r = await client.post("/v1/tokens", json={"name": "cache", "scopes": ["gateway"]}, headers=ADMIN)
    assert r.status_code == 201, r.text
    return r.json()["id"], r.json()["secret"]


async def in_flight(resolver: TokenResolver) -> None:
    await asyncio.gather(*resolver._lookups.values())


async def test_concurrent_misses_share_one_lookup(client: AsyncTestClient, engine: AsyncEngine) -> None:
    _, secret = await mint(client)
    resolver = TokenResolver(engine, None, 5, monotonic=Clock())
    with lookups(engine) as seen:
        found = await asyncio.gather(*(resolver.resolve(secret) for _ in range(20)))
    assert len(seen) == 1
    assert {p.scopes for p in found if p is not None} == {frozenset({"gateway"})} and None not in found


async def test_a_token_in_use_is_refreshed_ahead_and_a_revocation_still_lands_within_the_ttl(
    client: AsyncTestClient, engine: AsyncEngine
) -> None:
    token_id, secret = await mint(client)
    clock = Clock()
    resolver = TokenResolver(engine, None, 5, monotonic=clock)
    with lookups(engine) as seen:
        assert await resolver.resolve(secret) is not None  # t = 0: looked up, valid until 5
        clock.now += 3.5
        assert await resolver.resolve(secret) is not None  # more than a second left: from the cache
        assert len(seen) == 1 and not resolver._lookups

        clock.now += 0.7  # t = 4.2: in the last second, answered from the entry, looked up behind it
        assert await resolver.resolve(secret) is not None
        assert len(resolver._lookups) == 1
        assert await resolver.resolve(secret) is not None  # one lookup at a time
        await in_flight(resolver)
        assert len(seen) == 2  # the entry now lives until 4.2 + 5

        r = await client.delete(f"/v1/tokens/{token_id}", headers=ADMIN)  # revoked by another process
        assert r.status_code == 200, r.text
        clock.now += 3.0  # t = 7.2: the cached answer stands, within the TTL
        assert await resolver.resolve(secret) is not None
        clock.now += 1.0  # t = 8.2: refreshed behind this request, which still gets the valid entry
        assert await resolver.resolve(secret) is not None
        await in_flight(resolver)
        assert await resolver.resolve(secret) is None  # the refresh saw the revocation
        assert len(seen) == 3


async def test_no_entry_is_served_after_its_expiry(client: AsyncTestClient, engine: AsyncEngine) -> None:
    token_id, secret = await mint(client)
    clock = Clock()
    resolver = TokenResolver(engine, None, 5, monotonic=clock)
    assert await resolver.resolve(secret) is not None
    assert (await client.delete(f"/v1/tokens/{token_id}", headers=ADMIN)).status_code == 200
    clock.now += 5.0  # expired, not used in its last second: the next request waits for a fresh lookup
    with lookups(engine) as seen:
        assert await resolver.resolve(secret) is None
    assert len(seen) == 1


async def test_forget_discards_what_lookups_in_flight_bring_back(client: AsyncTestClient, engine: AsyncEngine) -> None:
    token_id, secret = await mint(client)
    resolver = TokenResolver(engine, None, 5, monotonic=Clock())
    pending = asyncio.ensure_future(resolver.resolve(secret))
    await asyncio.sleep(0)  # the lookup has started; the token is still valid
    assert len(resolver._lookups) == 1
    resolver.forget()
    assert await pending is not None
    assert resolver._cache == {}
    assert (await client.delete(f"/v1/tokens/{token_id}", headers=ADMIN)).status_code == 200
    assert await resolver.resolve(secret) is None  # looked up afresh, not from the discarded answer


async def test_a_token_is_not_served_from_the_cache_past_its_own_expiry(
    client: AsyncTestClient, engine: AsyncEngine
) -> None:
    """A token that expires in 30 s is cached for at most 30 s, whatever the cache's lifetime (300 s here)."""
    expires = (datetime.now(UTC) + timedelta(seconds=30)).isoformat()
    r = await client.post(
        "/v1/tokens", json={"name": "short", "scopes": ["gateway"], "expires_at": expires}, headers=ADMIN
    )
    assert r.status_code == 201, r.text
    clock = Clock()
    resolver = TokenResolver(engine, None, 300, monotonic=clock)
    assert await resolver.resolve(r.json()["secret"]) is not None
    clock.now += 29
    assert resolver.known(r.json()["secret"]) is not None  # cached, and still valid
    clock.now += 2
    assert resolver.known(r.json()["secret"]) is None  # its expiry has passed: not answered from the cache
