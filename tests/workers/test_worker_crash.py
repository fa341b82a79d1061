"""A worker killed with SIGKILL in the middle of a job, and another started: the message is redelivered (at
least once) and the job, being idempotent, leaves exactly one expiry entry per lot."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import replace
from decimal import Decimal

import psycopg
from dramatiq.brokers.redis import MAINTENANCE_SCALE
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from billing.settings import Settings
from tests.conftest import Api
from tests.workers.conftest import (
    DEADLINE_SECONDS,
    eventually,
    expired_lot,
    namespace,
    raw_broker,
    running_worker,
    send,
)
from tests.workers.test_credit_expiry import expiry_postings


async def test_sigkill_mid_job_then_restart_leaves_one_entry_per_lot(
    jobs_settings: Settings, jobs_api: Api, jobs_engine: AsyncEngine, jobs_database_url: str
) -> None:
    settings = replace(jobs_settings, queue_namespace=namespace())  # workers of this test only
    first, second = [await expired_lot(jobs_api, "3.00", used="1.00") for _ in range(2)]
    lots = [first[1], second[1]]
    async with jobs_engine.connect() as conn:
        second_id = await conn.scalar(text("SELECT id FROM accounts WHERE public_id = :p"), {"p": second[0]})

    # Hold the second account's balance row, so the job commits the first account and then waits.
    blocker = psycopg.connect(jobs_database_url)
    blocker.execute("SELECT 1 FROM balances WHERE account_id = %s FOR UPDATE", (second_id,))
    try:
        with running_worker(settings, "--threads", "1") as process:
            send(raw_broker(settings), "expire_credits")

            async def first_done_second_waiting() -> bool:
                async with jobs_engine.connect() as conn:
                    waiting = await conn.scalar(
                        text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                             " AND application_name = 'billing' AND wait_event_type = 'Lock'")
                    )  # fmt: skip
                return bool(waiting) and lots[0] in await expiry_postings(jobs_engine, lots)

            await eventually(first_done_second_waiting, "the job to expire one account and wait on the other")
            os.kill(process.pid, signal.SIGKILL)
            assert await asyncio.to_thread(process.wait, 10) == -signal.SIGKILL
    finally:
        blocker.rollback()
        blocker.close()
    assert await expiry_postings(jobs_engine, lots) == {lots[0]: (1, Decimal("-2"))}

    # Dramatiq redelivers a dead worker's unacknowledged messages once its heartbeat is older than the
    # timeout, during queue maintenance; here with a 1 s timeout and maintenance on every command.
    maintainer = raw_broker(settings, heartbeat_timeout=1000, maintenance_chance=MAINTENANCE_SCALE)
    deadline = time.monotonic() + DEADLINE_SECONDS
    while maintainer.client.llen(f"{settings.queue_namespace}:default") == 0:
        assert time.monotonic() < deadline, "the killed worker's message was not redelivered"
        maintainer.do_qsize("default")  # any command runs maintenance
        await asyncio.sleep(0.2)

    with running_worker(settings, "--threads", "2"):

        async def both_expired() -> bool:
            return len(await expiry_postings(jobs_engine, lots)) == 2

        await eventually(both_expired, "the restarted worker to finish the job")
        await asyncio.to_thread(maintainer.join, "default", timeout=60_000)
    assert await expiry_postings(jobs_engine, lots) == {lot: (1, Decimal("-2")) for lot in lots}
    for account, _ in (first, second):
        assert (await jobs_api.balance(account))["balance"] == "0.00"
