"""Configuration, from environment variables only.

With nothing set, the service runs on embedded defaults (SPEC §8): `billing.embedded` starts an
embedded PostgreSQL and Redis inside `BILLING_DATA_DIR` and exports their URLs, so every process
started afterwards (API workers, Dramatiq workers) sees ordinary `DATABASE_URL` / `REDIS_URL`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def _int(name: str, default: int) -> int:
    raw = _env(name)
    return int(raw) if raw is not None else default


def sqlalchemy_url(url: str) -> str:
    """Any PostgreSQL URL, as the SQLAlchemy async psycopg 3 driver wants it."""
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    raise ValueError(f"DATABASE_URL must be a PostgreSQL URL, got {url.split(':', 1)[0]}://...")


def libpq_url(url: str) -> str:
    """The same URL as libpq / psycopg / pgbench understand it."""
    return "postgresql://" + sqlalchemy_url(url).removeprefix("postgresql+psycopg://")


@dataclass(frozen=True)
class Settings:
    database_url: str | None = None
    redis_url: str | None = None
    data_dir: Path = Path(".data")
    host: str = "127.0.0.1"
    port: int = 8000
    server_workers: int = 1
    # Overflow connections are closed when returned, and opening one costs milliseconds: keep a steady pool.
    db_pool_size: int = 20
    db_max_overflow: int = 0
    admin_token: str | None = None
    stripe_api_key: str | None = None
    stripe_webhook_secret: str | None = None
    stripe_api_base: str | None = None
    # `billing dev` runs the Stripe emulator here when no STRIPE_API_KEY is set (0: any free port).
    localstripe_port: int = 8420
    default_lot_expiry_days: int = 365
    # Concurrent one-shot charges in a process share one transaction (billing/gateway/batch.py).
    charge_batching: bool = True
    # An account-scoped or staff token is looked up in the database at most this often per process.
    token_cache_seconds: int = 5
    log_level: str = "INFO"
    # Background work (workers/): Dramatiq's Redis keys live under this prefix, so deployments (and test
    # sessions) sharing one Redis never see each other's queues.
    queue_namespace: str = "billing"
    worker_threads: int = 4
    # How often `billing scheduler` enqueues each periodic job, in seconds.
    hold_expiry_every: int = 60
    credit_expiry_every: int = 300
    verify_every: int = 3600
    # A hold is marked expired this long after its expiry (it stops counting at the expiry itself).
    hold_expiry_grace: int = 60
    # The missing-credit reconciler (billing/reconcile/): how often, how far back it walks Stripe's payments,
    # and how young a payment may be before it is left to its webhook.
    reconcile_every: int = 300
    # BYOK fees of the current month recomputed and corrected; the previous month closed once.
    byok_reconcile_every: int = 3600
    # Accounts below their auto top-up threshold are topped up by a job this often (billing/purchases/auto_topup.py).
    auto_topup_every: int = 15
    reconcile_window_hours: int = 72
    reconcile_grace: int = 600
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            database_url=_env("DATABASE_URL"),
            redis_url=_env("REDIS_URL"),
            data_dir=Path(_env("BILLING_DATA_DIR", ".data") or ".data"),
            host=_env("BILLING_HOST", "127.0.0.1") or "127.0.0.1",
            port=_int("BILLING_PORT", 8000),
            server_workers=_int("BILLING_SERVER_WORKERS", 1),
            db_pool_size=_int("BILLING_DB_POOL_SIZE", 20),
            db_max_overflow=_int("BILLING_DB_MAX_OVERFLOW", 0),
            admin_token=_env("BILLING_ADMIN_TOKEN"),
            stripe_api_key=_env("STRIPE_API_KEY"),
            stripe_webhook_secret=_env("STRIPE_WEBHOOK_SECRET"),
            stripe_api_base=_env("STRIPE_API_BASE"),
            localstripe_port=_int("BILLING_LOCALSTRIPE_PORT", 8420),
            default_lot_expiry_days=_int("BILLING_DEFAULT_LOT_EXPIRY_DAYS", 365),
            charge_batching=_env("BILLING_CHARGE_BATCHING", "1") not in ("0", "false", "no"),
            token_cache_seconds=_int("BILLING_TOKEN_CACHE_SECONDS", 5),
            log_level=_env("BILLING_LOG_LEVEL", "INFO") or "INFO",
            queue_namespace=_env("BILLING_QUEUE_NAMESPACE", "billing") or "billing",
            worker_threads=_int("BILLING_WORKER_THREADS", 4),
            hold_expiry_every=_int("BILLING_HOLD_EXPIRY_EVERY", 60),
            credit_expiry_every=_int("BILLING_CREDIT_EXPIRY_EVERY", 300),
            verify_every=_int("BILLING_VERIFY_EVERY", 3600),
            hold_expiry_grace=_int("BILLING_HOLD_EXPIRY_GRACE", 60),
            reconcile_every=_int("BILLING_RECONCILE_EVERY", 300),
            byok_reconcile_every=_int("BILLING_BYOK_RECONCILE_EVERY", 3600),
            auto_topup_every=_int("BILLING_AUTO_TOPUP_EVERY", 15),
            reconcile_window_hours=_int("BILLING_RECONCILE_WINDOW_HOURS", 72),
            reconcile_grace=_int("BILLING_RECONCILE_GRACE", 600),
        )

    def require_database_url(self) -> str:
        if not self.database_url:
            raise RuntimeError("DATABASE_URL is not set. Run `billing dev` (embedded PostgreSQL) or set DATABASE_URL.")
        return self.database_url
