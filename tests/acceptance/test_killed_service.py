"""A service process killed with gateway calls in flight loses no money and creates none: every
acknowledged call is in the ledger once, and every call left without an answer lands exactly once when the
gateway retries it with the same id (SPEC §9: faults lose no money and create none).

The calls in flight are made to wait inside the database: the test holds the account's balance row, so
their batches are blocked on it when the process is SIGKILLed (a deterministic "in flight", no timing)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from billing.verify import verify_ledger
from tests.acceptance.conftest import funded_with_gateway, serving
from tests.conftest import ADMIN

ANSWERED = 40  # calls acknowledged before the burst
IN_FLIGHT = 100  # calls sent while the account's row is held, then the process is killed
LIMITS = httpx.Limits(max_connections=2 * IN_FLIGHT)

Call = Callable[[httpx.AsyncClient], Awaitable[httpx.Response]]


def post(path: str, body: dict[str, Any]) -> Call:
    return lambda http: http.post(path, json=body)


async def answer(call: Call, http: httpx.AsyncClient) -> int | None:
    try:
        return (await call(http)).status_code
    except httpx.TransportError:
        return None  # no answer: in doubt


async def wait_for_a_blocked_batch(engine: AsyncEngine, deadline_s: float = 30.0) -> None:
    """Until one of the service's connections waits on a row lock (a batch of the burst is in flight)."""
    deadline = time.monotonic() + deadline_s
    while True:
        async with engine.connect() as conn:  # a new snapshot of pg_stat_activity each time
            waiting = await conn.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE application_name = 'billing' AND wait_event_type = 'Lock'"
                )
            )
        if waiting:
            return
        assert time.monotonic() < deadline, "no batch of the burst reached the database"
        await asyncio.sleep(0.05)


async def kill_with_calls_in_flight(
    process: subprocess.Popen[bytes], http: httpx.AsyncClient, engine: AsyncEngine, account: str, burst: list[Call]
) -> None:
    """Send `burst` while the account's balance row is held, SIGKILL the server once a batch of it waits on
    that row, and check that none of the calls was answered."""
    async with engine.connect() as locker:
        await locker.execute(
            text("SELECT 1 FROM balances WHERE account_id = (SELECT id FROM accounts WHERE public_id = :p) FOR UPDATE"),
            {"p": account},
        )
        tasks = [asyncio.create_task(answer(call, http)) for call in burst]
        await wait_for_a_blocked_batch(engine)
        process.send_signal(signal.SIGKILL)
        assert await asyncio.gather(*tasks) == [None] * len(burst)
        await locker.rollback()


async def count_by(engine: AsyncEngine, sql: str, ids: list[str]) -> dict[str, int]:
    async with engine.connect() as conn:
        return {row[0]: row[1] for row in await conn.execute(text(sql), {"ids": ids})}


GENERATIONS = "SELECT generation_id, count(*) FROM generations WHERE generation_id = ANY(:ids) GROUP BY 1"
HOLDS = "SELECT request_id, count(*) FROM holds WHERE request_id = ANY(:ids) GROUP BY 1"


async def ledger_ok(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        assert await verify_ledger(conn) == {}


async def test_sigkill_with_charges_in_flight_then_retries_leave_each_charge_once(
    database_url: str, engine: AsyncEngine
) -> None:
    first = [f"gen-kill-{uuid.uuid4().hex}" for _ in range(ANSWERED)]
    burst = [f"gen-kill-{uuid.uuid4().hex}" for _ in range(IN_FLIGHT)]
    with serving(database_url) as (process, base):
        async with httpx.AsyncClient(base_url=base, headers=ADMIN, timeout=60) as admin:
            account, gateway = await funded_with_gateway(admin, "10.00")

        def charge(generation: str) -> Call:
            return post("/v1/charges", {"generation_id": generation, "account": account, "cost": "0.01"})

        async with httpx.AsyncClient(base_url=base, headers=gateway, timeout=60, limits=LIMITS) as http:
            assert await asyncio.gather(*[answer(charge(g), http) for g in first]) == [201] * ANSWERED
            await kill_with_calls_in_flight(process, http, engine, account, [charge(g) for g in burst])

    assert await count_by(engine, GENERATIONS, first) == dict.fromkeys(first, 1)
    assert await count_by(engine, GENERATIONS, burst) == {}  # the killed batches were rolled back whole

    with serving(database_url) as (_, base):
        async with httpx.AsyncClient(base_url=base, headers=gateway, timeout=60, limits=LIMITS) as http:
            assert await asyncio.gather(*[answer(charge(g), http) for g in burst]) == [201] * IN_FLIGHT
            again = await charge(burst[0])(http)
            assert again.status_code == 201 and again.headers.get("idempotent-replayed") == "true"
            balance = (await http.get(f"/v1/accounts/{account}/balance", headers=ADMIN)).json()

    assert await count_by(engine, GENERATIONS, first + burst) == dict.fromkeys(first + burst, 1)
    assert (balance["balance"], balance["total_usage"]) == ("8.60", "1.40")
    await ledger_ok(engine)


async def test_sigkill_with_holds_and_captures_in_flight_then_retries_leave_each_once(
    database_url: str, engine: AsyncEngine
) -> None:
    """40 holds of 0.05 acknowledged; then their captures at 0.01 and 100 new holds of 0.01 in flight."""
    first = [f"req-kill-{uuid.uuid4().hex}" for _ in range(ANSWERED)]
    new = [f"req-kill-{uuid.uuid4().hex}" for _ in range(IN_FLIGHT)]
    captures = {request: f"gen-kill-{uuid.uuid4().hex}" for request in first}
    with serving(database_url) as (process, base):
        async with httpx.AsyncClient(base_url=base, headers=ADMIN, timeout=60) as admin:
            account, gateway = await funded_with_gateway(admin, "10.00")

        def hold(request: str, amount: str) -> Call:
            return post("/v1/holds", {"request_id": request, "account": account, "amount": amount})

        async with httpx.AsyncClient(base_url=base, headers=gateway, timeout=60, limits=LIMITS) as http:
            held = await asyncio.gather(*[hold(r, "0.05")(http) for r in first])
            assert [r.status_code for r in held] == [201] * ANSWERED
            hold_ids = {r.json()["request_id"]: r.json()["id"] for r in held}

            def capture(request: str) -> Call:
                return post(
                    f"/v1/holds/{hold_ids[request]}/capture", {"generation_id": captures[request], "cost": "0.01"}
                )

            burst = [capture(r) for r in first] + [hold(r, "0.01") for r in new]
            await kill_with_calls_in_flight(process, http, engine, account, burst)

    assert await count_by(engine, HOLDS, first + new) == dict.fromkeys(first, 1)
    assert await count_by(engine, GENERATIONS, list(captures.values())) == {}

    with serving(database_url) as (_, base):
        async with httpx.AsyncClient(base_url=base, headers=gateway, timeout=60, limits=LIMITS) as http:
            statuses = await asyncio.gather(*[answer(call, http) for call in burst])
            assert statuses == [200] * ANSWERED + [201] * IN_FLIGHT
            balance = (await http.get(f"/v1/accounts/{account}/balance", headers=ADMIN)).json()

    assert await count_by(engine, HOLDS, first + new) == dict.fromkeys(first + new, 1)
    assert await count_by(engine, GENERATIONS, list(captures.values())) == dict.fromkeys(captures.values(), 1)
    assert (balance["balance"], balance["held"], balance["available"]) == ("9.60", "1.00", "8.60")
    await ledger_ok(engine)
