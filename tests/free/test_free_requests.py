"""Free-model admission (SPEC §5 "Free models"): 20/minute, 50/day or 1,000/day after $10 purchased,
account-wide, reset at 00:00 UTC, 429 with the window, limit and reset time; 402 on a negative balance.

Real Redis and PostgreSQL. The business clock is pinned with `billing.clock.set_offset` a few seconds
into a minute, so a test never straddles a real minute boundary; every test uses fresh accounts, so
Redis keys never collide, and removes its own accounts' keys afterwards.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from litestar.testing import AsyncTestClient
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from billing import clock
from billing.app import create_asgi
from billing.db.journal import Journal
from billing.free.quota import FreeLimiter, MemoryCounter, windows
from billing.ledger.model import Customer, Entry, EntryKind, Platform, Posting
from billing.settings import Settings
from tests import plans
from tests.conftest import ADMIN, ROOT, Api, served
from tests.purchases.conftest import buy, pay
from tests.webhooks.test_disputes import dispute, send

MODEL = "meta-llama/llama-3.3-70b-instruct:free"
T0 = datetime(2031, 5, 14, 10, 0, 5, tzinfo=UTC)  # 5 s into a minute: 55 s of real time to spare


def redis_url() -> str:
    url = os.environ.get("REDIS_URL")
    if url:
        return url
    from billing.embedded import start_redis

    return start_redis(ROOT / ".data" / "test")


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"  # nothing listens there any more: connections are refused


def at(moment: datetime) -> None:
    """Move the business clock so that it reads `moment` now."""
    clock.set_offset(moment - datetime.now(UTC))


def minute_key(account: str, moment: datetime) -> str:
    return f"free:{{{account}}}:m:{moment:%Y%m%d%H%M}"


def day_key(account: str, moment: datetime) -> str:
    return f"free:{{{account}}}:d:{moment:%Y%m%d}"


@pytest.fixture(scope="module")
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    """The tests' own connection (the app's lives on the app's event loop)."""
    r = Redis.from_url(settings.redis_url or "")
    yield r
    await r.aclose()


@pytest.fixture(autouse=True)
def real_clock() -> Iterator[None]:
    yield
    clock.set_offset(timedelta(0))


@pytest.fixture
async def fresh(api: Api, redis: Redis) -> AsyncIterator[Callable[[], Awaitable[str]]]:
    made: list[str] = []

    async def make() -> str:
        made.append((await api.account())["id"])
        return made[-1]

    yield make
    for account in made:
        keys = [k async for k in redis.scan_iter(match=f"free:{{{account}}}:*")]
        if keys:
            await redis.delete(*keys)


async def free(client: httpx.AsyncClient, account: str, headers: dict[str, str] = ADMIN, **body: Any) -> httpx.Response:
    return await client.post("/v1/free_requests", json={"account": account, "model": MODEL, **body}, headers=headers)


def error(response: httpx.Response) -> dict[str, Any]:
    """The error object without its human message (asserted separately where it matters)."""
    body = dict(response.json()["error"])
    assert body.pop("message")
    return body


async def test_admits_zero_balance_and_reports_both_windows(client: AsyncTestClient, fresh, api: Api, redis: Redis):
    account = await fresh()
    gateway = await api.token(["gateway"])
    key = (
        await client.post(f"/v1/accounts/{account}/keys", json={"reason": "test", "name": "k"}, headers=ADMIN)
    ).json()["id"]
    at(T0)
    r = await free(client, account, headers=gateway, key=key)
    assert r.status_code == 200, r.text
    assert r.json() == {
        "object": "free_request",
        "account": account,
        "model": MODEL,
        "key": key,
        "allowed": True,
        "degraded": False,
        "limits": {
            "per_minute": {"limit": 20, "remaining": 19, "reset_at": "2031-05-14T10:01:00Z"},
            "per_day": {"limit": 50, "remaining": 49, "reset_at": "2031-05-15T00:00:00Z"},
        },
    }
    # Account-wide counters in Redis, each expiring shortly after its window.
    assert await redis.get(minute_key(account, T0)) == b"1"
    assert await redis.get(day_key(account, T0)) == b"1"
    assert 55 <= await redis.ttl(minute_key(account, T0)) <= 55 + 60 + 1
    to_midnight = int((datetime(2031, 5, 15, tzinfo=UTC) - T0).total_seconds())
    assert to_midnight <= await redis.ttl(day_key(account, T0)) <= to_midnight + 3600 + 1


async def test_request_21_in_a_minute_is_refused_until_the_next_minute(client: AsyncTestClient, fresh):
    account = await fresh()
    at(T0)
    remaining = [(await free(client, account)).json()["limits"]["per_minute"]["remaining"] for _ in range(20)]
    assert remaining == list(range(19, -1, -1))

    refused = await free(client, account)
    assert refused.status_code == 429
    assert error(refused) == {
        "type": "rate_limit_error",
        "code": "free_model_rate_limited",
        "limit_window": "minute",
        "limit": 20,
        "remaining": 0,
        "reset_at": "2031-05-14T10:01:00Z",
        "degraded": False,
    }
    assert "20 per minute" in refused.json()["error"]["message"]
    assert 50 <= int(refused.headers["Retry-After"]) <= 55

    at(datetime(2031, 5, 14, 10, 1, tzinfo=UTC))
    r = await free(client, account)
    assert r.status_code == 200
    assert r.json()["limits"]["per_minute"] == {"limit": 20, "remaining": 19, "reset_at": "2031-05-14T10:02:00Z"}


async def test_refused_requests_consume_no_quota(client: AsyncTestClient, fresh, redis: Redis):
    account = await fresh()
    at(T0)
    codes = [(await free(client, account)).status_code for _ in range(25)]
    assert codes == [200] * 20 + [429] * 5
    assert await redis.get(minute_key(account, T0)) == b"20"

    at(T0 + timedelta(minutes=1))
    r = await free(client, account)
    assert r.json()["limits"]["per_day"]["remaining"] == 50 - 21
    assert await redis.get(day_key(account, T0)) == b"21"


async def test_request_51_of_the_day_is_refused_until_midnight_utc(client: AsyncTestClient, fresh):
    account = await fresh()
    late = datetime(2031, 5, 14, 23, 57, 5, tzinfo=UTC)
    codes = []
    for n in range(50):
        if n % 20 == 0:
            at(late + timedelta(minutes=n // 20))  # a fresh minute every 20 requests
        codes.append((await free(client, account)).status_code)
    assert codes == [200] * 50

    at(datetime(2031, 5, 14, 23, 59, 30, tzinfo=UTC))  # this minute has room (10 used): the day is full
    refused = await free(client, account)
    assert refused.status_code == 429
    assert error(refused) == {
        "type": "rate_limit_error",
        "code": "free_model_rate_limited",
        "limit_window": "day",
        "limit": 50,
        "remaining": 0,
        "reset_at": "2031-05-15T00:00:00Z",
        "degraded": False,
    }
    assert 25 <= int(refused.headers["Retry-After"]) <= 30

    at(datetime(2031, 5, 15, 0, 0, tzinfo=UTC))
    r = await free(client, account)
    assert r.status_code == 200
    assert r.json()["limits"]["per_day"] == {"limit": 50, "remaining": 49, "reset_at": "2031-05-16T00:00:00Z"}


async def test_10_dollars_purchased_raises_the_day_limit_to_1000(
    client: AsyncTestClient, fresh, api: Api, redis: Redis
):
    account = await fresh()
    at(T0)
    await api.grant(account, "9.99", category="paid")
    await api.grant(account, "100.00", category="promotional")  # given away, not purchased
    r = await free(client, account)
    assert r.json()["limits"]["per_day"]["limit"] == 50

    await api.grant(account, "0.01", category="paid")  # $10.00 purchased in total
    r = await free(client, account)
    assert r.json()["limits"]["per_day"] == {"limit": 1000, "remaining": 998, "reset_at": "2031-05-15T00:00:00Z"}

    # Requests 3..999 through another limiter on the same Redis (as another API process would), 20 a minute.
    other_process = FreeLimiter(redis)
    for n in range(997):
        verdict = await other_process.admit(account, 1000, T0 + timedelta(minutes=1 + n // 20))
        assert verdict.admitted and not verdict.degraded

    at(T0 + timedelta(minutes=51))
    last = await free(client, account)
    assert last.status_code == 200
    assert last.json()["limits"]["per_day"]["remaining"] == 0
    refused = await free(client, account)
    assert refused.status_code == 429
    assert error(refused)["limit_window"] == "day"
    assert error(refused)["limit"] == 1000


async def test_a_won_dispute_does_not_count_its_purchase_twice(client: AsyncTestClient, fresh, api: Api):
    """What was purchased is what was paid for: a won dispute gives the disputed credits back as a new `paid` lot,
    which must not count as a second purchase — for the day quota or for a key's `is_free_tier`."""
    account = await fresh()
    key = (
        await client.post(f"/v1/accounts/{account}/keys", json={"reason": "test", "name": "k"}, headers=ADMIN)
    ).json()["id"]
    first = (await buy(client, account, "5.00"))["purchase"]
    await pay(client, first)
    dp = "dp_" + uuid.uuid4().hex[:14]
    await send(client, "charge.dispute.created", dispute(first, "needs_response", dispute_id=dp))
    await send(client, "charge.dispute.closed", dispute(first, "won", dispute_id=dp))
    assert (await api.balance(account))["total_credits"] == "5.00"  # $5 bought once, credited once

    async def day_limit_and_free_tier() -> tuple[int, bool]:
        r = await free(client, account)
        assert r.status_code == 200, r.text
        k = await client.get(f"/v1/keys/{key}", headers=ADMIN)
        return r.json()["limits"]["per_day"]["limit"], k.json()["is_free_tier"]

    at(T0)
    assert await day_limit_and_free_tier() == (50, True)

    second = (await buy(client, account, "5.00"))["purchase"]  # $10 purchased in total
    await pay(client, second)
    assert await day_limit_and_free_tier() == (1000, False)


async def test_whether_an_account_bought_enough_is_read_from_its_balance_row_not_its_lots(
    api: Api, engine: AsyncEngine
) -> None:
    """Each free-model request (and each key read) asks whether the account has purchased $10 in total. An
    account topping up every day has thousands of paid lots; the answer is the total the journal keeps beside
    the balance, read in the generic plan the service runs with, and no lot is read at all (counted in the
    plan's relations, not timed)."""
    from billing.free.service import _ACCOUNT

    account = (await api.account())["id"]
    for amount in ("4.00", "5.99"):
        await api.grant(account, amount, category="paid")
    await api.grant(account, "50.00", category="promotional")

    async def purchased_enough() -> tuple[bool, list[str]]:
        async with engine.connect() as conn:
            await conn.exec_driver_sql("SET plan_cache_mode = force_generic_plan")
            await conn.exec_driver_sql(plans.prepare("free_account", str(_ACCOUNT)))
            literals = {"p": f"'{account}'", "k": "NULL"}
            row = (await conn.exec_driver_sql(plans.execute("free_account", str(_ACCOUNT), literals))).one()
            plan = (await conn.exec_driver_sql(plans.explain("free_account", str(_ACCOUNT), literals))).scalar_one()
            await conn.exec_driver_sql("DEALLOCATE free_account")
        return row.purchased_enough, [node.get("Relation Name") for node in plans.nodes(plan[0]["Plan"])]

    enough, read = await purchased_enough()
    assert enough is False  # $9.99 paid for; the promotional $50 was given away
    assert "lots" not in read and "balances" in read
    await api.grant(account, "0.01", category="paid")
    assert (await purchased_enough())[0] is True


async def spend(engine: AsyncEngine, account: str, amount: Decimal) -> None:
    """Usage the balance cannot cover (a finished generation is paid even into debt): one balanced entry."""
    journal = Journal()
    async with engine.begin() as conn:
        customer = Customer(await conn.scalar(text("SELECT id FROM accounts WHERE public_id = :p"), {"p": account}))
        state = await journal.lock_customer(conn, customer)
        entry = Entry(
            kind=EntryKind.USAGE,
            customer=customer,
            postings=(Posting(customer, -amount, None), Posting(Platform.USAGE_REVENUE, amount)),
            usage_delta=amount,
            description="test: usage beyond the balance",
        )
        await journal.post(conn, entry, balance_before=state.balance)


async def test_negative_balance_is_refused_402_before_the_quota(client: AsyncTestClient, fresh, api: Api, engine):
    account = await fresh()
    at(T0)
    await spend(engine, account, Decimal("1.50"))
    assert (await api.balance(account))["balance"] == "-1.50"

    for _ in range(3):
        refused = await free(client, account)
        assert refused.status_code == 402
        assert error(refused) == {"type": "ledger_error", "code": "negative_balance", "balance": "-1.50"}

    await api.grant(account, "5.00")  # pays the debt off: balance 3.50
    r = await free(client, account)
    assert r.status_code == 200
    assert r.json()["limits"]["per_minute"]["remaining"] == 19  # the 402s counted nothing
    assert r.json()["limits"]["per_day"]["remaining"] == 49


async def test_30_concurrent_requests_admit_exactly_20(client: AsyncTestClient, fresh, redis: Redis):
    account = await fresh()
    at(T0)

    async def burst() -> list[httpx.Response]:
        # Runs on the app's event loop, so the 30 requests really interleave inside the app.
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as concurrent:
            return list(await asyncio.gather(*(free(concurrent, account) for _ in range(30))))

    responses = await asyncio.to_thread(client.blocking_portal.call, burst)
    assert sorted(r.status_code for r in responses) == [200] * 20 + [429] * 10
    admitted = [r.json()["limits"]["per_minute"]["remaining"] for r in responses if r.status_code == 200]
    assert sorted(admitted) == list(range(20))  # each admitted request saw its own count
    assert await redis.get(minute_key(account, T0)) == b"20"
    assert await redis.get(day_key(account, T0)) == b"20"


@pytest.mark.parametrize("url", [closed_port_url(), None], ids=["refused", "unset"])
async def test_redis_unreachable_falls_back_to_per_process_limits(
    settings: Settings, fresh, redis: Redis, url: str | None
):
    account = await fresh()
    at(T0)
    async with served(create_asgi(replace(settings, redis_url=url))) as degraded:
        answers = [await free(degraded, account) for _ in range(21)]
        at(T0 + timedelta(minutes=1))
        next_minute = await free(degraded, account)

    assert [a.status_code for a in answers] == [200] * 20 + [429]
    assert all(a.json()["degraded"] is True for a in answers[:20])
    assert answers[0].json()["limits"]["per_minute"]["remaining"] == 19
    assert error(answers[20])["limit_window"] == "minute"
    assert error(answers[20])["degraded"] is True
    assert next_minute.status_code == 200
    assert next_minute.json()["limits"]["per_day"]["remaining"] == 50 - 21
    assert await redis.exists(minute_key(account, T0), day_key(account, T0)) == 0  # counted in the process only


def test_fallback_counter_enforces_the_day_and_forgets_finished_windows():
    counter = MemoryCounter()
    for n in range(3):
        minute, day = windows("acct_x", T0 + timedelta(minutes=n), 3)
        assert counter.admit(minute, day, T0 + timedelta(minutes=n)) == (True, 1, n + 1)
    later = T0 + timedelta(minutes=3)
    minute, day = windows("acct_x", later, 3)
    assert counter.admit(minute, day, later) == (False, 0, 3)  # the day is full; nothing counted

    tomorrow = datetime(2031, 5, 15, 0, 1, tzinfo=UTC)
    minute, day = windows("acct_x", tomorrow, 3)
    assert counter.admit(minute, day, tomorrow) == (True, 1, 1)
    assert set(counter._counts) == {minute.key, day.key}  # yesterday's windows were dropped


async def test_only_free_models_known_accounts_and_gateway_tokens(client: AsyncTestClient, fresh, api: Api):
    account = await fresh()
    at(T0)
    for model in ("openai/gpt-4o", ":free", "vendor/model:free-ish"):
        r = await free(client, account, model=model)
        assert r.status_code == 400
        assert error(r) == {"type": "invalid_request_error", "code": "not_a_free_model", "param": "model"}
    r = await free(client, "acct_doesnotexist")
    assert r.status_code == 404
    assert error(r)["code"] == "account_not_found"
    assert (await free(client, account, headers=await api.token(["support"]))).status_code == 403
    assert (await free(client, account, headers=await api.token(["account"], account=account))).status_code == 403
    assert (await free(client, account, headers={})).status_code == 401

    r = await free(client, account)
    assert r.status_code == 200
    assert r.json()["limits"]["per_day"]["remaining"] == 49  # none of the refusals above was counted


async def test_openapi_documents_the_endpoint_and_its_refusals(client: AsyncTestClient):
    schema = (await client.get("/schema/openapi.json")).json()
    operation = schema["paths"]["/v1/free_requests"]["post"]
    assert {"200", "400", "401", "402", "403", "404", "429"} <= set(operation["responses"])
    assert "Redis is unreachable" in operation["description"]


async def test_disabled_expired_or_foreign_key_is_refused_and_not_counted(
    client: AsyncTestClient, fresh, api: Api, redis: Redis
):
    account = await fresh()
    other = await fresh()
    keys = {}
    for name, body in [("disabled", {}), ("expiring", {"expires_at": "2031-05-14T10:00:30Z"}), ("foreign", {})]:
        owner = other if name == "foreign" else account
        r = await client.post(
            f"/v1/accounts/{owner}/keys", json={"reason": "test", "name": name, **body}, headers=ADMIN
        )
        keys[name] = r.json()["id"]
    await client.patch(f"/v1/keys/{keys['disabled']}", json={"reason": "test", "disabled": True}, headers=ADMIN)
    at(T0 + timedelta(seconds=31))
    assert (await free(client, account, key=keys["disabled"])).json()["error"]["code"] == "key_disabled"
    assert (await free(client, account, key=keys["expiring"])).json()["error"]["code"] == "key_expired"
    assert (await free(client, account, key=keys["foreign"])).status_code == 404
    assert await redis.get(day_key(account, T0)) is None
