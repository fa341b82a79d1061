"""The async engine. Services own their transactions: `async with db.begin() as conn` commits before
the handler returns, so money is committed before the response is sent.
"""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from billing.settings import Settings, sqlalchemy_url

# Every statement here looks rows up by key, so one generic plan per prepared statement is right, and
# re-planning on each execution was a measurable share of the hot path's database time.
SESSION_OPTIONS = "-c timezone=UTC -c plan_cache_mode=force_generic_plan"
# ... except a listing whose rows for one value differ by orders of magnitude (a busy account's history, a quiet
# account's tickets) and whose LIMIT is a parameter: its generic plan was made for the average value and an
# unknown LIMIT, and read everything below the cursor. Such a read plans for its own values, in its own
# transaction only (docs/performance.md, session 22).
CUSTOM_PLANS = "SET LOCAL plan_cache_mode = force_custom_plan"
APPLICATION_NAME = "billing"


def make_engine(settings: Settings) -> AsyncEngine:
    return create_async_engine(
        sqlalchemy_url(settings.require_database_url()),
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        # No pre-ping: it costs a round trip on every checkout (over 1 ms measured here). A connection
        # that died is discarded by SQLAlchemy on the error, and the request fails before anything commits.
        pool_pre_ping=False,
        pool_recycle=1800,
        connect_args={
            # Prepare every statement on first use: the hot path's statements are few and fixed, and
            # planning the state read costs several milliseconds each time it is not prepared.
            "prepare_threshold": 0,
            "application_name": APPLICATION_NAME,
            "options": SESSION_OPTIONS,
        },
    )
