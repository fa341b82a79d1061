"""`billing scheduler`: enqueue each periodic job once per interval.

Time is cut into slots of each job's interval (aligned to the Unix epoch), and a slot is claimed in Redis
with SET NX before its message is sent. So exactly one scheduler is expected (deploy/: one replica), but a
second one — a rollout overlap, a mistake — sends nothing extra: both race for the same slot and one wins.
Even a duplicate message would be harmless: every job is idempotent (workers/actors.py).

A claim is not a send: a send that fails gives the claim back, so the retry claims the slot again instead
of finding it taken; and a claim lives only `CLAIM_SECONDS` until its message is sent (then it is kept
for the slot), so a scheduler that dies between the two leaves the slot to be claimed again soon.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import dramatiq
from redis import Redis
from redis.exceptions import RedisError

from billing.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Schedule:
    actor: dramatiq.Actor
    every: int  # seconds; 0 or less: not scheduled

    def slot(self, at: float) -> int:
        return int(at // self.every)


def schedules(settings: Settings) -> list[Schedule]:
    from workers import actors

    every = {
        actors.expire_holds: settings.hold_expiry_every,
        actors.expire_credits: settings.credit_expiry_every,
        actors.verify_ledger: settings.verify_every,
        actors.reconcile_payments: settings.reconcile_every,
        actors.reconcile_byok_fees: settings.byok_reconcile_every,
        actors.auto_topup: settings.auto_topup_every,
    }
    return [Schedule(actor, seconds) for actor, seconds in every.items() if seconds > 0]


CLAIM_SECONDS = 10  # how long a claim not yet followed by its send keeps the slot from the others


def slot_key(namespace: str, schedule: Schedule, slot: int) -> str:
    return f"{namespace}:schedule:{schedule.actor.actor_name}:{slot}"


def claim(client: Redis, namespace: str, schedule: Schedule, slot: int) -> bool:
    """True for the one scheduler that gets to send this slot's message (for `CLAIM_SECONDS`, until `sent`)."""
    return bool(client.set(slot_key(namespace, schedule, slot), "1", nx=True, ex=CLAIM_SECONDS))


def sent(client: Redis, namespace: str, schedule: Schedule, slot: int) -> None:
    """The slot's message went out: its claim is kept for the rest of the slot and beyond."""
    client.expire(slot_key(namespace, schedule, slot), max(2 * schedule.every, 10))


def send(client: Redis, namespace: str, schedule: Schedule, slot: int) -> None:
    """Send the slot's message after claiming it; a send that fails gives the claim back (and raises)."""
    try:
        schedule.actor.send()
    except RedisError:
        try:
            client.delete(slot_key(namespace, schedule, slot))
        except RedisError:  # Redis still away: the claim expires by itself after CLAIM_SECONDS
            log.warning("could not release the claim of %s's slot %d", schedule.actor.actor_name, slot)
        raise


def run(settings: Settings, stop: threading.Event) -> None:
    from workers import actors

    client = actors.broker.client
    plan = schedules(settings)
    for s in plan:
        log.info("scheduling %s every %d s", s.actor.actor_name, s.every)
    done: dict[str, int] = {}  # each job's last slot sent, or found claimed by another scheduler
    while not stop.is_set():
        now = time.time()
        next_due = min(((s.slot(now) + 1) * s.every for s in plan), default=now + 60)
        for s in plan:
            slot = s.slot(now)
            if done.get(s.actor.actor_name) == slot:
                continue
            try:
                claimed = claim(client, settings.queue_namespace, s, slot)
                if claimed:
                    send(client, settings.queue_namespace, s, slot)
                done[s.actor.actor_name] = slot  # sent (not again, even if keeping its claim fails), or not ours
                if claimed:
                    log.info("enqueued %s", s.actor.actor_name)
                    sent(client, settings.queue_namespace, s, slot)
            except RedisError:  # Redis away for a moment: try again shortly, the slot is still open
                log.exception("could not schedule %s", s.actor.actor_name)
                next_due = min(next_due, time.time() + 1)
        stop.wait(max(next_due - time.time(), 0.05))
