"""The journal store: persists entries the ledger core built, and reads what the core needs.

It never invents postings. Lock order, always: the customer's balance row first, then its lots — so
concurrent money moves on one account serialize on one row they own, and never deadlock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from billing.ledger.model import NEW_LOT, Customer, Entry, LotBalance, Platform
from billing.ledger.money import ZERO


@dataclass(frozen=True, slots=True)
class CustomerState:
    """A customer's ledger state, read under the balance row lock."""

    balance: Decimal
    lots: tuple[LotBalance, ...]

    @property
    def debt(self) -> Decimal:
        """Lot-less postings: what the balance owes beyond every lot (≤ 0)."""
        return min(self.balance - sum((lot.remaining for lot in self.lots), ZERO), ZERO)


@dataclass(frozen=True, slots=True)
class Posted:
    entry_id: int
    posted_at: datetime
    lot_id: int | None
    balance_after: Decimal | None


class AccountMissing(LookupError):
    pass


class Journal:
    def __init__(self) -> None:
        self._platform: dict[Platform, int] = {}

    async def load_platform(self, conn: AsyncConnection) -> None:
        """Platform account ids never change once migrated: read them once per process."""
        if not self._platform:
            rows = await conn.execute(text("SELECT public_id, id FROM accounts WHERE kind = 'platform'"))
            self._platform = {Platform(code): id_ for code, id_ in rows if code in Platform._value2member_map_}

    async def ensure_loaded(self, engine: AsyncEngine) -> None:
        if not self._platform:
            async with engine.connect() as conn:
                await self.load_platform(conn)

    def account_id(self, account: Customer | Platform) -> int:
        """The `accounts.id` a posting names (platform ids once `load_platform` has run)."""
        return account.id if isinstance(account, Customer) else self._platform[account]

    async def lock_customer(self, conn: AsyncConnection, customer: Customer) -> CustomerState:
        balance = await conn.scalar(
            text("SELECT balance FROM balances WHERE account_id = :id FOR UPDATE"), {"id": customer.id}
        )
        if balance is None:
            raise AccountMissing(customer.id)
        rows = await conn.execute(
            text("SELECT id, remaining, expires_at FROM lots WHERE account_id = :id AND live ORDER BY expires_at, id"),
            {"id": customer.id},
        )
        return CustomerState(balance, tuple(LotBalance(*row) for row in rows))

    async def post(
        self,
        conn: AsyncConnection,
        entry: Entry,
        *,
        balance_before: Decimal | None,
        riders: Sequence[Rider] = (),
    ) -> Posted:
        """Write the entry and its riders in one statement, under the balance lock the caller holds."""
        await self.load_platform(conn)
        statement = self.entry_statement(entry, balance_before=balance_before, riders=riders)
        entry_id, posted_at, lot_id = (await conn.execute(text(statement.sql), statement.params)).one()
        return Posted(entry_id, posted_at, lot_id, statement.balance_after)

    async def write(self, conn: AsyncConnection, riders: Sequence[Rider]) -> None:
        """Riders with no journal entry (a hold, a zero-cost generation), in one statement."""
        statement = self.riders_statement(riders)
        await conn.execute(text(statement.sql), statement.params)

    def entry_statement(
        self, entry: Entry, *, balance_before: Decimal | None, riders: Sequence[Rider] = ()
    ) -> Statement:
        """The one statement that writes an entry — journal row, postings with running balances, its new
        lot, consumed lots, cached totals — plus `riders` (CTEs that may use the entry's id as
        `(SELECT id FROM e)`). It returns (entry id, posted_at, new lot id).
        """
        if not self._platform:
            raise RuntimeError("load_platform() first")
        customer = entry.customer
        if customer is not None and balance_before is None:
            raise ValueError("a customer entry is posted under its balance lock: pass balance_before")
        accounts: list[int] = []
        lots: list[int | None] = []
        new_lot: list[bool] = []
        amounts: list[Decimal] = []
        after: list[Decimal | None] = []
        consumed: dict[int, Decimal] = {}
        running = balance_before
        for p in entry.postings:
            if isinstance(p.account, Customer):
                assert running is not None
                running += p.amount
                accounts.append(p.account.id)
                after.append(running)
            else:
                accounts.append(self.account_id(p.account))
                after.append(None)
            lots.append(p.lot if isinstance(p.lot, int) else None)
            new_lot.append(p.lot is NEW_LOT)
            amounts.append(p.amount)
            if isinstance(p.lot, int):
                consumed[p.lot] = consumed.get(p.lot, ZERO) + p.amount
        lot = entry.new_lot
        params: dict[str, Any] = {
            "e_kind": entry.kind.value,
            "e_account": customer.id if customer else None,
            "e_description": entry.description,
            "e_actor": entry.actor,
            "e_reason": entry.reason,
            "e_reverses": entry.reverses,
            "p_accounts": accounts,
            "p_lots": lots,
            "p_new": new_lot,
            "p_amounts": amounts,
            "p_after": after,
            "has_lot": lot is not None,
            "l_category": lot.category.value if lot else None,
            "l_amount": lot.amount if lot else None,
            "l_remaining": sum((p.amount for p in entry.postings if p.lot is NEW_LOT), ZERO) if lot else None,
            "l_expires": lot.expires_at if lot else None,
            "b_delta": entry.balance_delta,
            "b_credits": entry.credits_delta,
            "b_purchased": entry.purchased_delta,
            "b_usage": entry.usage_delta,
            "u_ids": list(consumed),
            "u_deltas": list(consumed.values()),
        }
        ctes = [_ENTRY_CTES]
        for rider in riders:
            ctes.append(f"{rider.name} AS ({rider.sql})")
            params.update(rider.params)
        sql = (
            "WITH " + ",\n".join(ctes) + "\nSELECT e.id AS entry_id, e.posted_at, (SELECT id FROM nl) AS lot_id FROM e"
        )
        return Statement(sql, params, running)

    @staticmethod
    def riders_statement(riders: Sequence[Rider]) -> Statement:
        params: dict[str, Any] = {}
        for rider in riders:
            params.update(rider.params)
        sql = "WITH " + ",\n".join(f"{r.name} AS ({r.sql})" for r in riders) + "\nSELECT 1"
        return Statement(sql, params, None)


@dataclass(frozen=True, slots=True)
class Statement:
    """SQL with `:name` parameters, and the balance after it (for entries on a customer)."""

    sql: str
    params: dict[str, Any]
    balance_after: Decimal | None


@dataclass(frozen=True, slots=True)
class Rider:
    """A data-modifying CTE written in the same statement as an entry (its params prefixed to stay apart)."""

    name: str
    sql: str
    params: dict[str, Any]


_ENTRY_CTES = """e AS (
    INSERT INTO journal_entries (kind, account_id, description, actor, reason, reverses_entry_id)
    VALUES (:e_kind, :e_account, :e_description, :e_actor, :e_reason, :e_reverses)
    RETURNING id, posted_at),
nl AS (
    INSERT INTO lots (account_id, category, amount, remaining, expires_at, entry_id)
    SELECT :e_account, :l_category, :l_amount, :l_remaining, :l_expires, e.id FROM e WHERE :has_lot
    RETURNING id),
p AS (
    INSERT INTO postings (entry_id, account_id, lot_id, amount, balance_after, posted_at)
    SELECT e.id, x.account_id, CASE WHEN x.new_lot THEN (SELECT id FROM nl) ELSE x.lot_id END,
           x.amount, x.balance_after, e.posted_at
    FROM e, unnest(CAST(:p_accounts AS bigint[]), CAST(:p_lots AS bigint[]), CAST(:p_new AS boolean[]),
                   CAST(:p_amounts AS numeric[]), CAST(:p_after AS numeric[]))
            WITH ORDINALITY AS x(account_id, lot_id, new_lot, amount, balance_after, n)
    ORDER BY x.n),
b AS (
    UPDATE balances SET balance = balance + :b_delta, total_credits = total_credits + :b_credits,
           total_usage = total_usage + :b_usage, purchased = purchased + :b_purchased, updated_at = now()
    WHERE account_id = :e_account),
u AS (
    UPDATE lots SET remaining = remaining + x.delta
    FROM unnest(CAST(:u_ids AS bigint[]), CAST(:u_deltas AS numeric[])) AS x(id, delta)
    WHERE lots.id = x.id)"""
