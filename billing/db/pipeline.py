"""The hot path's transport: statements pipelined on the raw psycopg connection (from the same pool as
everything else), so BEGIN + lock + read cost one network round trip, and write + COMMIT another.

Statements keep SQLAlchemy's `:name` parameter style so one SQL text serves both paths.
"""

from __future__ import annotations

import functools
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from psycopg import AsyncConnection
from psycopg.pq import TransactionStatus
from psycopg.rows import namedtuple_row
from sqlalchemy.ext.asyncio import AsyncEngine

_PARAM = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


@functools.lru_cache(maxsize=512)
def psycopg_sql(sql: str) -> str:
    """`:name` → `%(name)s` (and a literal % doubled); `::type` casts are left alone."""
    return _PARAM.sub(r"%(\1)s", sql.replace("%", "%%"))


class Pipe:
    """One transaction, driven by explicit BEGIN / COMMIT statements in autocommit mode: psycopg's implicit
    BEGIN would cost a round trip of its own inside a pipeline."""

    def __init__(self, pg: AsyncConnection[Any]) -> None:
        self.pg = pg
        self.begun = False

    async def run(self, *statements: tuple[str, dict[str, Any]], commit: bool = False) -> list[list[Any]]:
        """Send all statements (and COMMIT) in one go; rows of each, as named tuples."""
        cursors = []
        async with self.pg.pipeline():
            if not self.begun:
                await self.pg.execute(b"BEGIN")
                self.begun = True
            for sql, params in statements:
                cursor = self.pg.cursor(row_factory=namedtuple_row)
                await cursor.execute(psycopg_sql(sql), params)
                cursors.append(cursor)
            if commit:
                await self.pg.execute(b"COMMIT")
        if commit:
            self.begun = False
        # (`pgresult.nfields`, not `description`: that builds a Column object per column on every call)
        return [await c.fetchall() if c.pgresult is not None and c.pgresult.nfields else [] for c in cursors]


@asynccontextmanager
async def transaction(engine: AsyncEngine) -> AsyncIterator[Pipe]:
    """A connection from the engine's pool; whatever is not committed by the end is rolled back."""
    async with engine.connect() as conn:
        fairy = await conn.get_raw_connection()
        pg: AsyncConnection[Any] = fairy.driver_connection  # type: ignore[assignment]
        await pg.set_autocommit(True)
        try:
            yield Pipe(pg)
        finally:
            try:
                if pg.info.transaction_status != TransactionStatus.IDLE:
                    await pg.execute(b"ROLLBACK")
                await pg.set_autocommit(False)
            except Exception:
                # A connection we cannot bring back to a clean state never returns to the pool.
                await conn.invalidate()
                raise
