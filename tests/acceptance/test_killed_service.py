"""A service process killed in the middle of a burst of charges loses no money and creates none: every
acknowledged charge is in the ledger once, and every charge left without an answer lands exactly once
when the gateway retries it with the same generation id (SPEC §9: faults lose no money and create none)."""

import asyncio
import signal
import time
import uuid

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from billing.verify import verify_ledger
from tests.acceptance.conftest import serving
from tests.conftest import ADMIN

ANSWERED = 40  # charges acknowledged before the burst
IN_FLIGHT = 200  # charges sent while the account's row is locked, then the process is killed


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


async def test_sigkill_with_charges_in_flight_then_retries_leave_each_charge_once(
    database_url: str, engine: AsyncEngine
) -> None:
    with serving(database_url) as (process, base):
        async with httpx.AsyncClient(base_url=base, headers=ADMIN, timeout=60) as http:
            account = (await http.post("/v1/accounts", json={"external_id": f"k_{uuid.uuid4().hex}"})).json()["id"]
            granted = await http.post(
                f"/v1/accounts/{account}/grants",
                json={"amount": "10.00", "reason": "kill test"},
                headers={"Idempotency-Key": uuid.uuid4().hex},
            )
            assert granted.status_code == 201
            token = (await http.post("/v1/tokens", json={"name": "gw", "scopes": ["gateway"]})).json()["secret"]
        gateway = {"Authorization": f"Bearer {token}"}
        body = {"account": account, "cost": "0.01", "model": "m"}
        first = [f"gen-kill-{uuid.uuid4().hex}" for _ in range(ANSWERED)]
        burst = [f"gen-kill-{uuid.uuid4().hex}" for _ in range(IN_FLIGHT)]

        async def charge(http: httpx.AsyncClient, generation: str) -> int | None:
            try:
                return (await http.post("/v1/charges", json={"generation_id": generation, **body})).status_code
            except httpx.TransportError:
                return None  # no answer: in doubt

        limits = httpx.Limits(max_connections=IN_FLIGHT)
        async with httpx.AsyncClient(base_url=base, headers=gateway, timeout=60, limits=limits) as http:
            assert await asyncio.gather(*[charge(http, g) for g in first]) == [201] * ANSWERED
            async with engine.connect() as locker:
                # Hold the account's balance row, so the burst's batches are in the database, waiting, when
                # the process dies; the lock goes when this transaction ends.
                account_id = await locker.scalar(text("SELECT id FROM accounts WHERE public_id = :p"), {"p": account})
                await locker.execute(text("SELECT 1 FROM balances WHERE account_id = :a FOR UPDATE"), {"a": account_id})
                tasks = [asyncio.create_task(charge(http, g)) for g in burst]
                await wait_for_a_blocked_batch(engine)
                process.send_signal(signal.SIGKILL)
                assert await asyncio.gather(*tasks) == [None] * IN_FLIGHT
                await locker.rollback()

    async def landed(generations: list[str]) -> dict[str, int]:
        async with engine.connect() as conn:
            rows = await conn.execute(
                text("SELECT generation_id, count(*) FROM generations WHERE generation_id = ANY(:g) GROUP BY 1"),
                {"g": generations},
            )
            return {row[0]: row[1] for row in rows}

    assert await landed(first) == dict.fromkeys(first, 1)
    assert await landed(burst) == {}  # the killed batches' transactions were rolled back whole

    with serving(database_url) as (_, base):
        async with httpx.AsyncClient(base_url=base, headers=gateway, timeout=60, limits=limits) as http:
            assert await asyncio.gather(*[charge(http, g) for g in burst]) == [201] * IN_FLIGHT
            again = await http.post("/v1/charges", json={"generation_id": burst[0], **body})
            assert again.status_code == 201 and again.headers.get("idempotent-replayed") == "true"
            balance = (await http.get(f"/v1/accounts/{account}/balance", headers=ADMIN)).json()

    assert await landed(first + burst) == dict.fromkeys(first + burst, 1)
    assert (balance["balance"], balance["total_usage"]) == ("7.60", "2.40")
    async with engine.connect() as conn:
        assert await verify_ledger(conn) == {}
