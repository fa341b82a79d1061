"""The journal store: persists entries the ledger core built, and reads what the core needs.

It never invents postings. Lock order, always: the customer's balance row first, then its lots — so
concurrent money moves on one account serialize on one row they own, and never deadlock.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from sqlalchemy import insert, text
from sqlalchemy.ext.asyncio import AsyncConnection

from billing.db.models import LotRow, PostingRow
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

    async def platform_id(self, conn: AsyncConnection, account: Platform) -> int:
        if not self._platform:
            rows = await conn.execute(text("SELECT public_id, id FROM accounts WHERE kind = 'platform'"))
            self._platform = {Platform(code): id_ for code, id_ in rows if code in Platform._value2member_map_}
        return self._platform[account]

    async def lock_customer(self, conn: AsyncConnection, customer: Customer) -> CustomerState:
        balance = await conn.scalar(
            text("SELECT balance FROM balances WHERE account_id = :id FOR UPDATE"), {"id": customer.id}
        )
        if balance is None:
            raise AccountMissing(customer.id)
        rows = await conn.execute(
            text(
                "SELECT id, remaining, expires_at FROM lots WHERE account_id = :id AND remaining > 0 "
                "ORDER BY expires_at, id"
            ),
            {"id": customer.id},
        )
        return CustomerState(balance, tuple(LotBalance(*row) for row in rows))

    async def post(self, conn: AsyncConnection, entry: Entry) -> Posted:
        new_balance: Decimal | None = None
        if entry.customer is not None:
            new_balance = await conn.scalar(
                text(
                    "UPDATE balances SET balance = balance + :delta, total_credits = total_credits + :credits,"
                    " total_usage = total_usage + :usage, updated_at = now()"
                    " WHERE account_id = :id RETURNING balance"
                ),
                {
                    "id": entry.customer.id,
                    "delta": entry.balance_delta,
                    "credits": entry.credits_delta,
                    "usage": entry.usage_delta,
                },
            )
            if new_balance is None:
                raise AccountMissing(entry.customer.id)
        entry_id, posted_at = (
            await conn.execute(
                text(
                    "INSERT INTO journal_entries (kind, account_id, description, actor, reason, reverses_entry_id)"
                    " VALUES (:kind, :account_id, :description, :actor, :reason, :reverses)"
                    " RETURNING id, posted_at"
                ),
                {
                    "kind": entry.kind.value,
                    "account_id": entry.customer.id if entry.customer else None,
                    "description": entry.description,
                    "actor": entry.actor,
                    "reason": entry.reason,
                    "reverses": entry.reverses,
                },
            )
        ).one()
        lot_id: int | None = None
        if entry.new_lot is not None and entry.customer is not None:
            remaining = sum((p.amount for p in entry.postings if p.lot is NEW_LOT), ZERO)
            lot_id = await conn.scalar(
                insert(LotRow).returning(LotRow.id),
                {
                    "account_id": entry.customer.id,
                    "category": entry.new_lot.category.value,
                    "amount": entry.new_lot.amount,
                    "remaining": remaining,
                    "expires_at": entry.new_lot.expires_at,
                    "entry_id": entry_id,
                },
            )
        running = None if new_balance is None else new_balance - entry.balance_delta
        rows = []
        consumed: dict[int, Decimal] = {}
        for p in entry.postings:
            if isinstance(p.account, Customer):
                account_id = p.account.id
                running = (running or ZERO) + p.amount
                balance_after: Decimal | None = running
            else:
                account_id = await self.platform_id(conn, p.account)
                balance_after = None
            lot = lot_id if p.lot is NEW_LOT else p.lot
            if isinstance(p.lot, int):
                consumed[p.lot] = consumed.get(p.lot, ZERO) + p.amount
            rows.append(
                {
                    "entry_id": entry_id,
                    "account_id": account_id,
                    "lot_id": lot,
                    "amount": p.amount,
                    "balance_after": balance_after,
                    "posted_at": posted_at,
                }
            )
        await conn.execute(insert(PostingRow), rows)
        if consumed:
            await conn.execute(
                text("UPDATE lots SET remaining = remaining + :delta WHERE id = :id"),
                [{"id": k, "delta": v} for k, v in consumed.items()],
            )
        return Posted(entry_id, posted_at, lot_id, new_balance)
