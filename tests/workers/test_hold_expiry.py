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
from billing.jobs.holds import count_due_holds, expire_holds
from tests.conftest import Api
from tests.workers.conftest import clock_moved, eventually


async def holds(api: Api, account: str, count: int, *, expired: bool, ago: timedelta = timedelta(hours=1)) -> list[str]:
    """`count` holds of 60 s, one after the other: opened `ago` when `expired`, else now."""
    gateway = await api.token(["gateway"])
    made = []
    when = datetime.now(UTC) - ago if expired else datetime.now(UTC)
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


async def test_the_job_passes_over_a_due_hold_whose_capture_holds_it_and_takes_it_out_of_open_holds(
    ctx: Context, jobs_api: Api, jobs_engine: AsyncEngine
) -> None:
    """A capture locks its hold, then (the trigger) its open row; the job must skip the hold, not wait for it
    in the other order, and leave the capture to decide — and go on to the holds due after it: a batch is
    the due holds it could lock, so one locked hold does not end the run. The holds it does expire leave
    `open_holds`."""
    account = (await jobs_api.account())["id"]
    await jobs_api.grant(account, "1.00")
    # due before any other test's holds, the one a capture holds first
    busy, *due = await holds(jobs_api, account, 3, expired=True, ago=timedelta(days=30))
    ids = [int(h.removeprefix("hold_")) for h in (busy, *due)]
    async with jobs_engine.connect() as capture:
        await capture.execute(text("SELECT id FROM holds WHERE id = :h FOR UPDATE"), {"h": ids[0]})
        run = expire_holds(ctx, now=datetime.now(UTC), batch_size=1)
        assert await asyncio.wait_for(run, timeout=30) >= 2
        await capture.rollback()
    assert await statuses(jobs_engine, [busy, *due]) == {busy: "open", **dict.fromkeys(due, "expired")}
    async with jobs_engine.connect() as conn:
        still = await conn.execute(text("SELECT hold_id FROM open_holds WHERE hold_id = ANY(:ids)"), {"ids": ids})
        assert still.scalars().all() == [ids[0]]
