"""The hot path's transport (billing/db/pipeline.py) on a real PostgreSQL, with the production engine:
statements of a round trip come back in order as named rows, a failure anywhere raises psycopg's own error
class and leaves nothing behind, and statements deallocated behind its back are prepared again."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from psycopg import OperationalError
from psycopg.errors import DivisionByZero, UniqueViolation
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from billing.db import pipeline
from billing.db.engine import make_engine
from billing.settings import Settings
from tests.conftest import open_idle, terminate_backends


@pytest.fixture
async def one_connection(settings: Settings) -> AsyncIterator[AsyncEngine]:
    """The production engine with a single pooled connection, so every block below reuses it."""
    engine = make_engine(dataclasses.replace(settings, db_pool_size=1, db_max_overflow=0))
    yield engine
    await pipeline.dispose(engine)


@pytest.fixture
async def probe(one_connection: AsyncEngine) -> AsyncIterator[str]:
    table = f"pipeline_probe_{uuid.uuid4().hex[:8]}"
    async with one_connection.begin() as conn:
        await conn.execute(text(f"CREATE TABLE {table} (id int PRIMARY KEY, amount numeric, at timestamptz)"))
    yield table
    async with one_connection.begin() as conn:
        await conn.execute(text(f"DROP TABLE {table}"))


PREPARED_HERE = "SELECT count(*) FROM pg_prepared_statements WHERE starts_with(name, '_billing_')"


async def rows_of(engine: AsyncEngine, table: str) -> list[tuple[int, Decimal]]:
    async with engine.connect() as conn:
        return [tuple(r) for r in await conn.execute(text(f"SELECT id, amount FROM {table} ORDER BY id"))]


async def test_statements_answer_in_order_as_named_rows_and_commit_once(
    one_connection: AsyncEngine, engine: AsyncEngine, probe: str
) -> None:
    at = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
    async with pipeline.transaction(one_connection) as tx:
        inserted, read = await tx.run(
            (f"INSERT INTO {probe} VALUES (:id, :amount, :at) RETURNING id", {"id": 1, "amount": Decimal("0.000000000001"), "at": at}),
            (f"SELECT id, amount, at, :id + 1 AS next, 1 AS \"?column?\" FROM {probe}", {"id": 1}),
        )  # fmt: skip
        assert [r.id for r in inserted] == [1]
        assert [(r.id, r.amount, r.at, r.next, r[4]) for r in read] == [(1, Decimal("0.000000000001"), at, 2, 1)]
        assert await rows_of(engine, probe) == []  # nothing visible elsewhere before COMMIT
        (written,) = await tx.run(
            (f"INSERT INTO {probe} VALUES (2, 2.5, :at) RETURNING amount", {"at": at}), commit=True
        )
        assert [r.amount for r in written] == [Decimal("2.5")]
    assert await rows_of(one_connection, probe) == [(1, Decimal("0.000000000001")), (2, Decimal("2.5"))]


async def test_a_failure_raises_psycopgs_error_and_nothing_stays(one_connection: AsyncEngine, probe: str) -> None:
    insert = f"INSERT INTO {probe} (id, amount) VALUES (:id, 1)"
    with pytest.raises(UniqueViolation):
        async with pipeline.transaction(one_connection) as tx:
            await tx.run((insert, {"id": 1}))
            await tx.run((insert, {"id": 2}), (insert, {"id": 1}), (insert, {"id": 3}), commit=True)
    with pytest.raises(DivisionByZero):
        async with pipeline.transaction(one_connection) as tx:
            await tx.run((insert, {"id": 4}), ("SELECT 1 / :zero AS x", {"zero": 0}))
    assert await rows_of(one_connection, probe) == []
    # the same connection, back in the pool clean, serves the next transaction
    async with pipeline.transaction(one_connection) as tx:
        await tx.run((insert, {"id": 5}), commit=True)
    assert await rows_of(one_connection, probe) == [(5, Decimal(1))]


async def test_statements_deallocated_behind_its_back_are_prepared_again(
    one_connection: AsyncEngine, probe: str
) -> None:
    insert = f"INSERT INTO {probe} (id, amount) VALUES (:id, :amount) RETURNING amount"
    async with pipeline.transaction(one_connection) as tx:
        await tx.run((insert, {"id": 1, "amount": Decimal(1)}), commit=True)
    async with pipeline.transaction(one_connection) as tx:  # the same connection: its pool holds one
        (prepared,) = await tx.run((PREPARED_HERE, {}))
        assert prepared[0].count == 4  # BEGIN, the insert, COMMIT, and this count
        await tx.run(("DEALLOCATE ALL", {}))  # what psycopg runs after a ROLLBACK of its own
    async with pipeline.transaction(one_connection) as tx:
        (written,) = await tx.run((insert, {"id": 2, "amount": Decimal(2)}), commit=True)
    assert [r.amount for r in written] == [Decimal(2)]
    async with pipeline.transaction(one_connection) as tx:
        (prepared,) = await tx.run((PREPARED_HERE, {}))
        assert prepared[0].count == 4
    assert await rows_of(one_connection, probe) == [(1, Decimal(1)), (2, Decimal(2))]


async def test_the_hot_path_keeps_its_connections_and_gives_back_only_clean_ones(
    one_connection: AsyncEngine, probe: str
) -> None:
    backend = "SELECT pg_backend_pid() AS pid"
    async with pipeline.transaction(one_connection) as tx:
        (first,) = await tx.run((backend, {}))
    async with pipeline.transaction(one_connection) as tx:
        (again,) = await tx.run((backend, {}))
    assert again[0].pid == first[0].pid  # reused, not opened again
    hot = pipeline.connections(one_connection)
    assert len(hot.idle) == 1 and hot.idle[0].autocommit

    async with pipeline.transaction(one_connection) as tx:
        await tx.run((f"INSERT INTO {probe} (id, amount) VALUES (1, 1)", {}))  # left open: rolled back
    async with pipeline.transaction(one_connection) as tx:
        (same,) = await tx.run((backend, {}))
    assert same[0].pid == first[0].pid
    assert await rows_of(one_connection, probe) == []

    with pytest.raises(RuntimeError):
        async with pipeline.transaction(one_connection) as tx:
            tx.broken = True  # as if an exchange had been cut off halfway
            raise RuntimeError
    assert hot.idle == []  # closed, not given back
    async with pipeline.transaction(one_connection) as tx:
        (fresh,) = await tx.run((backend, {}))
    assert fresh[0].pid != first[0].pid


async def test_a_connection_the_server_dropped_takes_the_idle_ones_with_it(
    settings: Settings, engine: AsyncEngine
) -> None:
    wider = make_engine(dataclasses.replace(settings, db_pool_size=3, db_max_overflow=0))
    try:
        pids = await open_idle(wider, 3)
        assert len(pipeline.connections(wider).idle) == 3
        await terminate_backends(engine, pids)

        with pytest.raises(OperationalError):  # the first caller finds out ...
            async with pipeline.transaction(wider) as tx:
                await tx.run(("SELECT 1 AS one", {}))
        assert pipeline.connections(wider).idle == []  # ... and the other dead ones go with its connection
        async with pipeline.transaction(wider) as tx:
            (rows,) = await tx.run(("SELECT pg_backend_pid() AS pid", {}))
        assert rows[0].pid not in pids
    finally:
        await pipeline.dispose(wider)
