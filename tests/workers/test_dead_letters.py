"""A job that keeps failing ends in Dramatiq's dead-letter set; `billing dead-letters` lists it and
`--replay` sends it again, to be done once whatever broke is fixed."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

from sqlalchemy.ext.asyncio import AsyncEngine

from billing.settings import Settings
from tests.conftest import ROOT, Api, with_database
from tests.workers.conftest import eventually, namespace, raw_broker, running_worker, send, worker_env
from tests.workers.test_hold_expiry import holds, statuses


def dead_letters(settings: Settings, *args: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "billing.cli", "dead-letters", *args],
        cwd=ROOT, env=worker_env(settings), capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip


async def test_a_failing_job_is_dead_lettered_listed_and_replayed(
    jobs_settings: Settings, jobs_api: Api, jobs_engine: AsyncEngine
) -> None:
    settings = replace(jobs_settings, queue_namespace=namespace())
    broken = replace(settings, database_url=with_database(settings.database_url or "", "billing_no_such_database"))
    account = (await jobs_api.account())["id"]
    await jobs_api.grant(account, "1.00")
    (hold,) = await holds(jobs_api, account, 1, expired=True)

    with running_worker(broken, "--threads", "1"):  # every job fails: its database does not exist
        message = send(raw_broker(settings), "expire_holds", max_retries=1, min_backoff=10, max_backoff=20)
        xq = f"{settings.queue_namespace}:default.XQ"

        async def dead_lettered() -> bool:
            return raw_broker(settings).client.zcard(xq) == 1

        await eventually(dead_lettered, "the failing job to exhaust its retries")
    assert await statuses(jobs_engine, [hold]) == {hold: "open"}

    listed = dead_letters(settings)
    assert f"expire_holds() message_id={message.message_id} attempts=2" in listed
    assert "billing_no_such_database" in listed  # the last error says what went wrong

    with running_worker(settings, "--threads", "1"):  # fixed: the right database
        replayed = dead_letters(settings, "--replay")
        assert "replayed" in replayed and message.message_id in replayed

        async def done() -> bool:
            return await statuses(jobs_engine, [hold]) == {hold: "expired"}

        await eventually(done, "the replayed job to run")
    assert message.message_id not in dead_letters(settings)
    assert dead_letters(settings, "--replay") == ""
