"""The async engine. Services own their transactions: `async with db.begin() as conn` commits before
the handler returns, so money is committed before the response is sent.
"""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from billing.settings import Settings, sqlalchemy_url


def make_engine(settings: Settings) -> AsyncEngine:
    return create_async_engine(
        sqlalchemy_url(settings.require_database_url()),
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_pre_ping=True,
        connect_args={"application_name": "billing", "options": "-c timezone=UTC"},
    )
