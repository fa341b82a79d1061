"""Ledger verification (SPEC §4, §9): every invariant, reported — never fixed — by the job, the metric and
`billing verify`'s exit status. Breaking a ledger on purpose happens in a throwaway database."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from types import ModuleType

import pytest
import redis
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from billing.context import Context
from billing.db import pipeline
from billing.db.journal import Journal
from billing.jobs.verify import LAST_RESULT_KEY, verify
from billing.ledger import entries
from billing.ledger.model import Customer, LotCategory
from billing.settings import Settings, sqlalchemy_url
from tests.conftest import ROOT, create_database, drop_database
from tests.workers.conftest import eventually, worker_env


@pytest.fixture
async def throwaway(jobs_settings: Settings) -> AsyncIterator[Context]:
    """A database of its own, migrated, with one customer granted $5 — ready to be broken."""
    from billing.db.migrate import upgrade

    url = create_database("billing_broken")
    engine = create_async_engine(sqlalchemy_url(url), connect_args={"options": "-c timezone=UTC"})
    try:
        upgrade(url)
        ctx = Context(db=engine, journal=Journal(), settings=replace(jobs_settings, database_url=url))
        async with engine.begin() as conn:
            account = await conn.scalar(
                text("INSERT INTO accounts (public_id, kind, type, external_id)"
                     " VALUES ('acct_broken', 'user', 'liability', 'broken') RETURNING id")
            )  # fmt: skip
            await conn.execute(text("INSERT INTO balances (account_id) VALUES (:a)"), {"a": account})
            state = await ctx.journal.lock_customer(conn, Customer(account))
            now = datetime.now(UTC)
            entry = entries.grant(
                Customer(account), Decimal("5"), category=LotCategory.PROMOTIONAL, expires_at=now + timedelta(days=1),
                debt=state.debt, now=now, reason="test", actor="test",
            )  # fmt: skip
            await ctx.journal.post(conn, entry, balance_before=state.balance)
        yield ctx
    finally:
        await pipeline.dispose(engine)
        drop_database(url)


class Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def billing_verify(ctx: Context) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "billing.cli", "verify"],
        cwd=ROOT, env=worker_env(ctx.settings), capture_output=True, text=True, timeout=120,
    )  # fmt: skip


async def test_a_broken_cached_balance_is_reported_and_billing_verify_exits_non_zero(throwaway: Context) -> None:
    assert (await verify(throwaway)).ok
    done = billing_verify(throwaway)
    assert done.returncode == 0, done.stderr
    assert "billing_ledger_ok 1" in done.stdout

    async with throwaway.db.begin() as conn:
        await conn.execute(text("UPDATE balances SET balance = balance + 1"))

    errors = Errors()
    logging.getLogger("billing.jobs.verify").addHandler(errors)
    try:
        result = await verify(throwaway)
    finally:
        logging.getLogger("billing.jobs.verify").removeHandler(errors)
    assert set(result.problems) == {"cached_balance_mismatch", "running_balance_mismatch"}
    assert any("cached_balance_mismatch" in m for m in errors.messages)

    done = billing_verify(throwaway)
    assert done.returncode == 1
    assert 'billing_ledger_problems{check="cached_balance_mismatch"} 1' in done.stdout
    assert 'billing_ledger_problems{check="unbalanced_entries"} 0' in done.stdout
    assert "billing_ledger_ok 0" in done.stdout
    async with throwaway.db.connect() as conn:  # reported, never fixed
        assert await conn.scalar(text("SELECT balance FROM balances")) == Decimal("6")


async def _account(conn: AsyncConnection, public_id: str) -> int:
    return int(await conn.scalar(text("SELECT id FROM accounts WHERE public_id = :p"), {"p": public_id}))


async def _adjust(conn: AsyncConnection, account: int, other: int, amount: str, after: str | None) -> None:
    """An entry written past the journal: `amount` on `account` with the running balance `after` (as given,
    right or wrong), the opposite on `other`."""
    entry = await conn.scalar(
        text("INSERT INTO journal_entries (kind, account_id) VALUES ('adjustment', :a) RETURNING id"), {"a": account}
    )
    await conn.execute(
        text("INSERT INTO postings (entry_id, account_id, amount, balance_after) VALUES"
             " (:e, :a, CAST(:x AS numeric), CAST(:after AS numeric)), (:e, :p, -CAST(:x AS numeric), NULL)"),
        {"e": entry, "a": account, "p": other, "x": amount, "after": after},
    )  # fmt: skip


async def test_a_wrong_running_balance_inside_the_history_is_reported(throwaway: Context) -> None:
    """Two entries whose customer postings carry a wrong running balance, then the right one again: the cached
    balance and the last running balance still agree, the history in between does not."""
    async with throwaway.db.begin() as conn:
        account, adjustments = await _account(conn, "acct_broken"), await _account(conn, "manual_adjustments")
        for amount, after in (("1", "100"), ("-1", "5")):
            await _adjust(conn, account, adjustments, amount, after)
    result = await verify(throwaway)
    assert set(result.problems) == {"history_balance_mismatch"}


async def test_a_customer_posting_without_a_running_balance_is_reported(throwaway: Context) -> None:
    """The running-balance checks compare the running balances there are; a customer posting with none is
    reported by its own check."""
    async with throwaway.db.begin() as conn:
        account, adjustments = await _account(conn, "acct_broken"), await _account(conn, "manual_adjustments")
        await _adjust(conn, account, adjustments, "-1", None)
        await conn.execute(text("UPDATE balances SET balance = balance - 1 WHERE account_id = :a"), {"a": account})
    result = await verify(throwaway)
    assert set(result.problems) == {"missing_running_balance"}


async def _draw_on_another_accounts_lot(conn: AsyncConnection) -> None:
    """Customer B spends $1 of acct_broken's lot: every cache equals its postings, but acct_broken's balance
    is 5 with 4 left in its lots, and B owes 1 that is no debt."""
    account, revenue = await _account(conn, "acct_broken"), await _account(conn, "usage_revenue")
    lot = await conn.scalar(text("SELECT id FROM lots WHERE account_id = :a"), {"a": account})
    other = await conn.scalar(
        text("INSERT INTO accounts (public_id, kind, type, external_id)"
             " VALUES ('acct_other', 'user', 'liability', 'other') RETURNING id")
    )  # fmt: skip
    await conn.execute(text("INSERT INTO balances (account_id, balance, total_usage) VALUES (:b, -1, 1)"), {"b": other})
    entry = await conn.scalar(
        text("INSERT INTO journal_entries (kind, account_id) VALUES ('usage', :b) RETURNING id"), {"b": other}
    )
    await conn.execute(
        text("INSERT INTO postings (entry_id, account_id, lot_id, amount, balance_after)"
             " VALUES (:e, :b, :lot, -1, -1), (:e, :r, NULL, 1, NULL)"),
        {"e": entry, "b": other, "lot": lot, "r": revenue},
    )  # fmt: skip
    await conn.execute(text("UPDATE lots SET remaining = remaining - 1 WHERE id = :lot"), {"lot": lot})


async def test_a_posting_drawing_on_another_accounts_lot_is_refused(throwaway: Context) -> None:
    with pytest.raises(IntegrityError, match="fk_postings_lot_id_account_id_lots"):
        async with throwaway.db.begin() as conn:
            await _draw_on_another_accounts_lot(conn)


async def test_a_posting_drawing_on_another_accounts_lot_is_reported(throwaway: Context) -> None:
    """A ledger written without the database's key (before migration 0017, or with it dropped)."""
    async with throwaway.db.begin() as conn:
        await conn.execute(text("ALTER TABLE postings DROP CONSTRAINT fk_postings_lot_id_account_id_lots"))
        await _draw_on_another_accounts_lot(conn)
    result = await verify(throwaway)
    assert set(result.problems) == {"posting_on_another_accounts_lot"}


async def test_a_captured_hold_without_its_generation_is_reported(throwaway: Context) -> None:
    async with throwaway.db.begin() as conn:
        await conn.execute(
            text("INSERT INTO holds (account_id, request_id, amount, status, fingerprint, expires_at)"
                 " SELECT id, 'r1', 1, 'captured', 'x', now() FROM accounts WHERE public_id = 'acct_broken'")
        )  # fmt: skip
    result = await verify(throwaway)
    assert set(result.problems) == {"captured_hold_generations"}


async def _open_hold(conn: AsyncConnection, request_id: str) -> int:
    hold: int = await conn.scalar(
        text("INSERT INTO holds (account_id, request_id, amount, status, fingerprint, expires_at)"
             " SELECT id, :r, 1, 'open', 'x', now() + interval '10 minutes' FROM accounts"
             " WHERE public_id = 'acct_broken' RETURNING id"),
        {"r": request_id},
    )  # fmt: skip
    return hold


async def test_open_holds_kept_apart_from_holds_are_reported(throwaway: Context) -> None:
    """`open_holds` is what admissions count as held: a hold open in one and not in the other, or open in both
    with another amount, is reported (written with the triggers that keep them in step switched off)."""
    async with throwaway.db.begin() as conn:
        missing, changed, resolved = [await _open_hold(conn, f"r{n}") for n in range(3)]
        await conn.execute(text("ALTER TABLE holds DISABLE TRIGGER USER"))
        await conn.execute(text("DELETE FROM open_holds WHERE hold_id = :h"), {"h": missing})
        await conn.execute(text("UPDATE holds SET amount = 2 WHERE id = :h"), {"h": changed})
        await conn.execute(text("UPDATE holds SET status = 'released' WHERE id = :h"), {"h": resolved})
        await conn.execute(text("ALTER TABLE holds ENABLE TRIGGER USER"))
    result = await verify(throwaway)
    assert set(result.problems) == {"open_holds_mismatch"}
    assert sorted(result.problems["open_holds_mismatch"]) == sorted([missing, changed, resolved])


async def test_a_purchased_total_apart_from_the_paid_lots_is_reported(throwaway: Context) -> None:
    """`purchased` is what the free-model quota reads: one that no longer equals the paid lots the account's
    purchases and paid grants created is reported (the fixture's promotional grant counts for nothing)."""
    async with throwaway.db.begin() as conn:
        account = await conn.scalar(text("SELECT id FROM accounts WHERE public_id = 'acct_broken'"))
        assert await conn.scalar(text("SELECT purchased FROM balances WHERE account_id = :a"), {"a": account}) == 0
        await conn.execute(text("UPDATE balances SET purchased = 10 WHERE account_id = :a"), {"a": account})
    result = await verify(throwaway)
    assert result.problems == {"purchased_mismatch": [account]}


async def test_the_actor_publishes_the_result(
    actors: ModuleType, worker: subprocess.Popen[bytes], jobs_settings: Settings
) -> None:
    client = redis.Redis.from_url(jobs_settings.redis_url or "")
    key = f"{jobs_settings.queue_namespace}:{LAST_RESULT_KEY}"
    client.delete(key)
    actors.verify_ledger.send()

    async def published() -> bool:
        return client.get(key) is not None

    await eventually(published, "the verification result in Redis")
    result = json.loads(client.get(key) or b"{}")
    assert result["ok"] is True and result["problems"] == {}
    assert "billing_ledger_ok 1" in result["metrics"]
