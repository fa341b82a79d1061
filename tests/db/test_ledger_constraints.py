"""The database itself refuses what would break the ledger, whatever code (or person) writes SQL."""

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from tests.conftest import Api

POSTING = (
    "INSERT INTO postings (entry_id, account_id, amount)"
    " SELECT :e, id, CAST(:a AS numeric) FROM accounts WHERE public_id = 'manual_adjustments'"
)


async def _entry_with(engine: AsyncEngine, amounts: list[str], *, one_by_one: bool = False) -> int:
    """An entry with postings of `amounts` on one platform account: all in one INSERT, or one INSERT each."""
    async with engine.begin() as conn:
        entry = await conn.scalar(text("INSERT INTO journal_entries (kind) VALUES ('adjustment') RETURNING id"))
        if one_by_one:
            for amount in amounts:
                await conn.execute(text(POSTING), {"e": entry, "a": amount})
        elif amounts:
            await _postings(conn, entry, amounts)
    return int(entry)


async def _postings(conn: AsyncConnection, entry: int, amounts: list[str]) -> None:
    await conn.execute(
        text(
            "INSERT INTO postings (entry_id, account_id, amount)"
            " SELECT :e, a.id, x.amount FROM accounts a, unnest(CAST(:amounts AS numeric[])) AS x(amount)"
            " WHERE a.public_id = 'manual_adjustments'"
        ),
        {"e": entry, "amounts": amounts},
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
    entry = await _entry_with(engine, ["0.000000000001", "-0.000000000001"])
    async with engine.connect() as conn:
        assert await conn.scalar(text("SELECT count(*) FROM postings WHERE entry_id = :e"), {"e": entry}) == 2


async def test_every_insert_leaves_its_entries_balanced(engine: AsyncEngine) -> None:
    """Checked per statement: an entry's postings go in together, and an entry already posted can gain
    postings only if the same statement keeps it balanced."""
    with pytest.raises(DBAPIError, match="unbalanced"):
        await _entry_with(engine, ["1.00", "-1.00"], one_by_one=True)
    entry = await _entry_with(engine, ["2.00", "-2.00"])
    with pytest.raises(DBAPIError, match="unbalanced"):
        async with engine.begin() as conn:
            await _postings(conn, entry, ["0.01"])
    with pytest.raises(DBAPIError, match="unbalanced"):  # in one statement with a balanced new entry
        async with engine.begin() as conn:
            other = await conn.scalar(text("INSERT INTO journal_entries (kind) VALUES ('adjustment') RETURNING id"))
            await conn.execute(
                text(
                    "INSERT INTO postings (entry_id, account_id, amount)"
                    " SELECT x.e, a.id, x.amount FROM accounts a,"
                    " unnest(CAST(:entries AS bigint[]), CAST(:amounts AS numeric[])) AS x(e, amount)"
                    " WHERE a.public_id = 'manual_adjustments'"
                ),
                {"entries": [other, other, entry], "amounts": ["3.00", "-3.00", "0.01"]},
            )
    async with engine.begin() as conn:
        await _postings(conn, entry, ["0.50", "-0.50"])  # balanced within the statement: allowed
    async with engine.connect() as conn:
        assert (
            await conn.execute(text("SELECT count(*), sum(amount) FROM postings WHERE entry_id = :e"), {"e": entry})
        ).one() == (4, 0)


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
