"""`billing scheduler`: each periodic job once per interval, even with two schedulers running; a worker on
the same queue then does the work."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from types import ModuleType
from typing import Any

import dramatiq
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy.ext.asyncio import AsyncEngine

from billing.settings import Settings
from tests.conftest import Api
from tests.workers.conftest import billing, eventually, namespace, raw_broker, running_worker, stop, worker_env
from tests.workers.test_hold_expiry import holds, statuses
from workers import scheduler

EVERY_SECOND = {
    "BILLING_HOLD_EXPIRY_EVERY": "1",
    "BILLING_CREDIT_EXPIRY_EVERY": "0",
    "BILLING_VERIFY_EVERY": "0",
    "BILLING_RECONCILE_EVERY": "0",
    "BILLING_BYOK_RECONCILE_EVERY": "0",
    "BILLING_AUTO_TOPUP_EVERY": "0",
}


async def test_two_schedulers_enqueue_each_slot_once_and_a_worker_runs_the_jobs(
    jobs_settings: Settings, jobs_api: Api, jobs_engine: AsyncEngine
) -> None:
    settings = replace(jobs_settings, queue_namespace=namespace())
    client = raw_broker(settings).client
    queue = f"{settings.queue_namespace}:default"
    account = (await jobs_api.account())["id"]
    await jobs_api.grant(account, "1.00")
    (hold,) = await holds(jobs_api, account, 1, expired=True)

    started = time.monotonic()
    schedulers = [billing("scheduler", env=worker_env(settings, **EVERY_SECOND)) for _ in range(2)]
    try:

        async def enqueued() -> bool:
            assert all(s.poll() is None for s in schedulers), "a scheduler exited"
            return client.llen(queue) >= 4

        await eventually(enqueued, "the schedulers to enqueue four slots")
    finally:
        for s in schedulers:
            stop(s)
    elapsed = time.monotonic() - started

    messages = [dramatiq.Message.decode(m) for m in client.hvals(f"{queue}.msgs")]
    slots = list(client.scan_iter(match=f"{settings.queue_namespace}:schedule:expire_holds:*"))
    assert {m.actor_name for m in messages} == {"expire_holds"}  # the disabled jobs are not scheduled
    assert len(messages) == len(slots)  # one message per claimed slot, whichever scheduler claimed it
    assert len(messages) <= elapsed + 2  # not two per second
    assert await statuses(jobs_engine, [hold]) == {hold: "open"}  # nothing ran yet: no worker

    with running_worker(settings, "--threads", "2"):

        async def done() -> bool:
            return await statuses(jobs_engine, [hold]) == {hold: "expired"} and client.llen(queue) == 0

        await eventually(done, "a worker to run the scheduled jobs")


class UntilIdle(threading.Event):
    """Set once a message went out, or once the scheduler sleeps towards its next slot (done with this one)."""

    def __init__(self, sent: list[int]) -> None:
        super().__init__()
        self.sent = sent

    def wait(self, timeout: float | None = None) -> bool:
        if self.sent or (timeout is not None and timeout > 60):
            self.set()
        return super().wait(timeout)


def test_a_slot_whose_send_failed_is_claimed_again_and_sent(
    jobs_settings: Settings, actors: ModuleType, monkeypatch: Any
) -> None:
    """A send failing with RedisError gives its claim back: the retry shortly after sends the slot's message
    instead of finding the slot claimed (by itself) and skipping it."""
    settings = replace(
        jobs_settings, queue_namespace=namespace(), hold_expiry_every=0, credit_expiry_every=10**8, verify_every=0,
        reconcile_every=0, byok_reconcile_every=0, auto_topup_every=0,
    )  # fmt: skip
    attempts: list[int] = []
    sent: list[int] = []

    def send(*args: Any, **kwargs: Any) -> None:
        attempts.append(1)
        if len(attempts) == 1:
            raise RedisConnectionError("Connection reset by peer")  # a blip right after the claim
        sent.append(1)  # recorded, not enqueued

    monkeypatch.setattr(actors.expire_credits, "send", send)
    runner = threading.Thread(target=scheduler.run, args=(settings, UntilIdle(sent)), daemon=True)
    runner.start()
    runner.join(120)
    assert not runner.is_alive()
    assert sent == [1], f"the slot's message was never sent ({len(attempts)} attempt)"
