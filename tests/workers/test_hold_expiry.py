"""Hold expiry (SPEC §5 Holds: an expired hold releases itself): a status change, counted once."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from datetime import UTC, datetime, timedelta
from types import ModuleType

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from billing.context import Context
from billing.jobs.holds import EXPIRE_DUE, count_due_holds, expire_holds
from tests.conftest import Api, holds_resolved_since_the_statistics, indexes_planned
from tests.workers.conftest import clock_moved, eventually


async def holds(api: Api, account: str, count: int, *, expired: bool) -> list[str]:
    gateway = await api.token(["gateway"])
    made = []
    when = datetime.now(UTC) - timedelta(hours=1) if expired else datetime.now(UTC)
    with clock_moved(when):
        for _ in range(count):
            r = await api.client.post(
                "/v1/holds",
                json={
                    "account": account,
                    "amount": "0.10",
                    "request_id": f"req-{uuid.uuid4().hex}",
                    "timeout_seconds": 60,
                },
                headers=gateway,
            )
            assert r.status_code == 201, r.text
            made.append(r.json()["id"])
    return made


async def statuses(engine: AsyncEngine, ids: list[str]) -> dict[str, str]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT id, status FROM holds WHERE id = ANY(:ids)"),
            {"ids": [int(i.removeprefix("hold_")) for i in ids]},
        )
    return {f"hold_{i}": status for i, status in rows}


async def test_expired_holds_are_marked_expired_and_a_concurrent_double_run_counts_each_once(
    ctx: Context, jobs_api: Api, jobs_engine: AsyncEngine
) -> None:
    account = (await jobs_api.account())["id"]
    await jobs_api.grant(account, "10.00")
    old = await holds(jobs_api, account, 25, expired=True)
    live = await holds(jobs_api, account, 2, expired=False)
    assert (await jobs_api.balance(account))["held"] == "0.20"  # expired holds stopped counting already

    now = datetime.now(UTC)
    due = await count_due_holds(ctx, now=now)
    assert due >= len(old)
    counts = await asyncio.gather(*(expire_holds(ctx, now=now, batch_size=4) for _ in range(3)))

    assert sum(counts) == due  # every due hold counted by exactly one run
    assert await statuses(jobs_engine, old) == dict.fromkeys(old, "expired")
    assert await statuses(jobs_engine, live) == dict.fromkeys(live, "open")
    assert await expire_holds(ctx, now=now) == 0
    balance = await jobs_api.balance(account)
    assert (balance["balance"], balance["held"], balance["available"]) == ("10.00", "0.20", "9.80")


async def test_a_hold_inside_the_grace_is_left_open(ctx: Context, jobs_api: Api, jobs_engine: AsyncEngine) -> None:
    account = (await jobs_api.account())["id"]
    await jobs_api.grant(account, "1.00")
    (hold,) = await holds(jobs_api, account, 1, expired=True)  # expired 59 minutes ago
    await expire_holds(ctx, now=datetime.now(UTC), grace=timedelta(hours=2))
    assert await statuses(jobs_engine, [hold]) == {hold: "open"}
    await expire_holds(ctx, now=datetime.now(UTC), grace=timedelta(minutes=30))
    assert await statuses(jobs_engine, [hold]) == {hold: "expired"}


async def test_an_expired_hold_cannot_be_captured_after_the_job(
    ctx: Context, jobs_api: Api, jobs_engine: AsyncEngine
) -> None:
    account = (await jobs_api.account())["id"]
    await jobs_api.grant(account, "1.00")
    (hold,) = await holds(jobs_api, account, 1, expired=True)
    await expire_holds(ctx, now=datetime.now(UTC))
    r = await jobs_api.client.post(
        f"/v1/holds/{hold}/capture",
        json={"generation_id": f"gen-{hold}", "cost": "0.05"},
        headers=await jobs_api.token(["gateway"]),
    )
    assert r.status_code == 409, r.text
    assert (await jobs_api.balance(account))["balance"] == "1.00"


async def test_the_actor_expires_holds(
    actors: ModuleType, worker: subprocess.Popen[bytes], jobs_api: Api, jobs_engine: AsyncEngine
) -> None:
    account = (await jobs_api.account())["id"]
    await jobs_api.grant(account, "1.00")
    old = await holds(jobs_api, account, 3, expired=True)
    actors.expire_holds.send()
    actors.expire_holds.send()

    async def expired() -> bool:
        return await statuses(jobs_engine, old) == dict.fromkeys(old, "expired")

    await eventually(expired, "the worker to expire the holds")


async def test_the_job_updates_the_holds_it_found_due_through_the_primary_key(jobs_engine: AsyncEngine) -> None:
    """The job looks for due holds among the open ones (the partial index on open holds), but updates each through
    the primary key: not through the entries resolved holds leave in that index until the next vacuum."""
    async with jobs_engine.connect() as conn:
        ids, primary = await holds_resolved_since_the_statistics(conn)
        params = {"cutoff": datetime.now(UTC), "batch": 1000}
        assert (await indexes_planned(conn, EXPIRE_DUE.text, params))["h"] == {primary}
        marked = (await conn.execute(EXPIRE_DUE, params)).scalars().all()
        assert sorted(marked) == ids[:3]
        await conn.rollback()
