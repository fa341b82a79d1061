"""The service's Redis client (`REDIS_URL`), tuned for the hot path.

Redis holds only counters that may be lost (free-model quotas), never money. So a slow or absent Redis
must cost a request milliseconds, not seconds: short timeouts and a single immediate retry (redis-py's
default backs off for seconds), after which the caller falls back (see `billing.free.quota`).
"""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from billing.settings import Settings

CONNECT_TIMEOUT_SECONDS = 0.25
COMMAND_TIMEOUT_SECONDS = 0.25


def make_redis(settings: Settings) -> Redis | None:
    """A client for `settings.redis_url`, or None when it is unset (callers then use their fallback).

    Creating it does not connect: connections open on first use, inside the running event loop.
    """
    if not settings.redis_url:
        return None
    return Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=CONNECT_TIMEOUT_SECONDS,
        socket_timeout=COMMAND_TIMEOUT_SECONDS,
        # One immediate retry covers a pooled connection that died with a Redis restart.
        retry=Retry(NoBackoff(), retries=1),
        client_name="billing",
    )
