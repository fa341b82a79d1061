"""The database itself refuses what would break the ledger, whatever code (or person) writes SQL."""

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import Api


async def _entry_with(engine: AsyncEngine, amounts: list[str]) -> None:
    async with engine.begin() as conn:
        entry = await conn.scalar(text("INSERT INTO journal_entries (kind) VALUES ('adjustment') RETURNING id"))
        for amount in amounts:
            await conn.execute(
                text(
                    "INSERT INTO postings (entry_id, account_id, amount)"
                    " SELECT :e, id, CAST(:a AS numeric) FROM accounts WHERE public_id = 'manual_adjustments'"
                ),
                {"e": entry, "a": amount},
            )


async def test_unbalanced_entry_by_raw_sql_is_rejected(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        before = await conn.scalar(text("SELECT count(*) FROM journal_entries"))
    with pytest.raises(DBAPIError, match="unbalanced"):
        await _entry_with(engine, ["1.00", "-0.99"])
    with pytest.raises(DBAPIError, match="unbalanced"):
        await _entry_with(engine, ["5.00"])
    with pytest.raises(DBAPIError, match="unbalanced"):
        await _entry_with(engine, [])  # an entry with no postings at all
    async with engine.connect() as conn:
        assert await conn.scalar(text("SELECT count(*) FROM journal_entries")) == before


async def test_balanced_entry_by_raw_sql_is_accepted(engine: AsyncEngine) -> None:
    await _entry_with(engine, ["0.000000000001", "-0.000000000001"])


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE postings SET amount = amount * 2 WHERE id = (SELECT max(id) FROM postings)",
        "DELETE FROM postings WHERE id = (SELECT max(id) FROM postings)",
        "UPDATE journal_entries SET kind = 'grant' WHERE id = (SELECT max(id) FROM journal_entries)",
        "DELETE FROM journal_entries WHERE id = (SELECT max(id) FROM journal_entries)",
        "TRUNCATE postings CASCADE",
        "DELETE FROM audit_log",
    ],
)
async def test_posted_rows_cannot_change(engine: AsyncEngine, api: Api, statement: str) -> None:
    account = await api.account()
    await api.grant(account["id"], "3.00")
    async with engine.connect() as conn:
        before = (await conn.execute(text("SELECT count(*), sum(amount) FROM postings"))).one()
    with pytest.raises(DBAPIError, match="append-only"):
        async with engine.begin() as conn:
            await conn.execute(text(statement))
    async with engine.connect() as conn:
        assert (await conn.execute(text("SELECT count(*), sum(amount) FROM postings"))).one() == before
