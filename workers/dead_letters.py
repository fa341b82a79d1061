"""Dead letters: messages whose actor failed on every retry. Dramatiq's Redis broker keeps them (for 7 days)
in a sorted set `<namespace>:<queue>.XQ` with their bodies in `<queue>.XQ.msgs`; `billing dead-letters`
lists them and, with `--replay`, sends them again with a fresh retry budget.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.common import q_name

# Options that belong to the failed delivery, not to the message.
_DELIVERY_OPTIONS = ("retries", "traceback", "requeue_timestamp", "redis_message_id", "eta")


@dataclass(frozen=True)
class DeadLetter:
    queue: str
    redis_id: str
    message: dramatiq.Message
    dead_at: datetime

    @property
    def attempts(self) -> int:
        # The stored body is the one last enqueued: its `retries` counts the attempts before the last.
        return int(self.message.options.get("retries", 0)) + 1

    @property
    def error(self) -> str:
        """The exception line of the last traceback kept (the one before the final attempt)."""
        lines = (self.message.options.get("traceback") or "").strip().splitlines()
        errors = [line for line in lines if line and not line[0].isspace() and not line.startswith("(Background")]
        return errors[-1] if errors else ""

    def describe(self) -> str:
        m = self.message
        args = ", ".join([*map(repr, m.args), *(f"{k}={v!r}" for k, v in m.kwargs.items())])
        return (
            f"{self.dead_at.isoformat(timespec='seconds')} {self.queue} {m.actor_name}({args}) "
            f"message_id={m.message_id} attempts={self.attempts} error={self.error!r}"
        )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def dead_letters(broker: RedisBroker) -> Iterator[DeadLetter]:
    """Every dead-lettered message under the broker's namespace, oldest first per queue."""
    client: Any = broker.client  # the synchronous client: its calls return values, not awaitables
    prefix = f"{broker.namespace}:"
    for key in sorted(map(_text, client.scan_iter(match=f"{prefix}*.XQ", _type="zset"))):
        queue = key[len(prefix) : -len(".XQ")]
        for redis_id, score in client.zrange(key, 0, -1, withscores=True):
            data = client.hget(f"{key}.msgs", redis_id)
            if data is not None:
                message = dramatiq.Message.decode(data)
                yield DeadLetter(queue, _text(redis_id), message, datetime.fromtimestamp(score / 1000, UTC))


def replay(broker: RedisBroker, letter: DeadLetter) -> bool:
    """Send a dead letter again with a fresh retry budget; False when someone else already took it.

    The letter is claimed first (ZREM is atomic), so two operators replaying at once send it once.
    """
    key = f"{broker.namespace}:{letter.queue}.XQ"
    if not broker.client.zrem(key, letter.redis_id):
        return False
    broker.client.hdel(f"{key}.msgs", letter.redis_id)
    m = letter.message
    options = {k: v for k, v in m.options.items() if k not in _DELIVERY_OPTIONS}
    broker.enqueue(dramatiq.Message(q_name(m.queue_name), m.actor_name, m.args, m.kwargs, options))
    return True
