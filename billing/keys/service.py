"""Key management. Usage counters are written only by the spending path, under the account's lock."""

from __future__ import annotations

import base64
import secrets
from decimal import Decimal
from typing import Any

import msgspec
from sqlalchemy import text
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from billing import clock
from billing.accounts.service import find_account
from billing.auth.audit import audit, require_reason
from billing.auth.principal import Principal
from billing.context import Context
from billing.errors import invalid, not_found
from billing.free.quota import purchased_enough_sql
from billing.keys import schemas as s
from billing.ledger.money import format_money
from billing.ledger.usage import KeyLimit, KeyUsage
from billing.organizations.service import member_account, role_of
from billing.schemas import checked_reason, money_field, money_or_none, timestamp_field

KEY_COLUMNS = f"""k.id, k.public_id, a.public_id AS account, m.public_id AS member, k.name, k."limit", k.limit_reset,
    k.include_byok_in_limit, k.disabled, k.expires_at, k.created_at, k.usage_total, k.byok_total, k.day_start,
    k.usage_day, k.byok_day, k.week_start, k.usage_week, k.byok_week, k.month_start, k.usage_month,
    k.byok_month, k.account_id,
    (SELECT coalesce(sum(h.amount), 0) FROM open_holds h
      WHERE h.key_id = k.id AND h.expires_at > :now) AS key_held,
    {purchased_enough_sql("k.account_id")} AS purchased_enough"""
KEY_FROM = "api_keys k JOIN accounts a ON a.id = k.account_id LEFT JOIN accounts m ON m.id = k.member_id"


def new_key_id() -> str:
    return "key_" + base64.b32encode(secrets.token_bytes(10)).decode().lower()


def key_usage(row: Any) -> KeyUsage:
    return KeyUsage(
        row.usage_total, row.byok_total, row.day_start, row.usage_day, row.byok_day, row.week_start,
        row.usage_week, row.byok_week, row.month_start, row.usage_month, row.byok_month,
    )  # fmt: skip


def key_limit(row: Any) -> KeyLimit:
    return KeyLimit(row.limit, row.limit_reset, row.include_byok_in_limit, key_usage(row))


def view(row: Row[Any]) -> s.Key:
    now = clock.now()
    current = key_usage(row).current(now)
    remaining = key_limit(row).remaining(now, row.key_held)
    return s.Key(
        id=row.public_id,
        account=row.account,
        member=row.member,
        name=row.name,
        limit=money_or_none(row.limit),
        limit_remaining=money_or_none(remaining),
        limit_reset=row.limit_reset,
        include_byok_in_limit=row.include_byok_in_limit,
        usage=format_money(current.usage_total),
        usage_daily=format_money(current.usage_day),
        usage_weekly=format_money(current.usage_week),
        usage_monthly=format_money(current.usage_month),
        byok_usage=format_money(current.byok_total),
        byok_usage_daily=format_money(current.byok_day),
        byok_usage_weekly=format_money(current.byok_week),
        byok_usage_monthly=format_money(current.byok_month),
        # An account that has purchased $10 in total leaves the free tier (SPEC §5, free models).
        is_free_tier=not row.purchased_enough,
        disabled=row.disabled,
        expires_at=row.expires_at,
        created_at=row.created_at,
    )


def _limit(raw: str | None) -> Decimal | None:
    return money_field(raw, "limit", negative="limit_must_not_be_negative")


async def _row(conn: AsyncConnection, principal: Principal, key: str) -> Row[Any]:
    row = (
        await conn.execute(
            text(f"SELECT {KEY_COLUMNS} FROM {KEY_FROM} WHERE k.public_id = :p AND k.deleted_at IS NULL"),
            {"p": key, "now": clock.now()},
        )
    ).first()
    if row is None or not principal.may_see(row.account_id):
        raise not_found("key", key)
    return row


async def create_key(ctx: Context, principal: Principal, account: str, data: s.CreateKey) -> s.Key:
    require_reason(principal, data.reason)
    limit = _limit(data.limit)
    expires_at = timestamp_field(data.expires_at, "expires_at")
    async with ctx.db.begin() as conn:
        owner = await find_account(conn, principal, account)
        member_id = None
        if data.member is not None:
            if owner.kind != "organization":
                raise invalid("member_needs_organization", "Only an organization's keys name a member.", "member")
            # The organization's own token names a member whose account it cannot see: membership decides.
            member_id = await member_account(conn, owner.id, data.member, lock=True)
            if member_id is None:
                raise invalid("not_a_member", f"{data.member!r} is not a member of {account!r}.", "member")
        public = new_key_id()
        await conn.execute(
            text(
                'INSERT INTO api_keys (public_id, account_id, member_id, name, "limit", limit_reset,'
                " include_byok_in_limit, expires_at) VALUES (:p, :a, :m, :n, :l, :r, :b, :x)"
            ),
            {
                "p": public, "a": owner.id, "m": member_id, "n": data.name, "l": limit, "r": data.limit_reset,
                "b": data.include_byok_in_limit, "x": expires_at,
            },
        )  # fmt: skip
        if principal.is_staff:
            await audit(conn, principal, "key.create", account_id=owner.id, reason=data.reason,
                        details={"key": public, **msgspec.to_builtins(data)})  # fmt: skip
        return view(await _row(conn, principal, public))


async def list_keys(ctx: Context, principal: Principal, account: str) -> list[s.Key]:
    async with ctx.db.connect() as conn:
        owner = await find_account(conn, principal, account)
        rows = await conn.execute(
            text(
                f"SELECT {KEY_COLUMNS} FROM {KEY_FROM} WHERE k.account_id = :a AND k.deleted_at IS NULL ORDER BY k.id"
            ),
            {"a": owner.id, "now": clock.now()},
        )
        return [view(r) for r in rows]


async def get_key(ctx: Context, principal: Principal, key: str) -> s.Key:
    async with ctx.db.connect() as conn:
        return view(await _row(conn, principal, key))


async def update_key(ctx: Context, principal: Principal, key: str, data: s.UpdateKey) -> s.Key:
    """Change only the fields sent; a change by staff is audit-logged with what was sent and why (SPEC §7)."""
    require_reason(principal, data.reason)
    changes: dict[str, Any] = {}
    for field in msgspec.structs.fields(data):
        value = getattr(data, field.name)
        if value is not msgspec.UNSET and field.name != "reason":
            changes[field.name] = _limit(value) if field.name == "limit" else value
    if "expires_at" in changes:
        changes["expires_at"] = timestamp_field(changes["expires_at"], "expires_at")
    async with ctx.db.begin() as conn:
        row = await _row(conn, principal, key)
        if changes.get("disabled") is False:
            # A member's key spends from the organization's pool only while it is a member: removal disabled
            # it, and enabling it again needs the membership back (held until this commits).
            member = await conn.scalar(text("SELECT member_id FROM api_keys WHERE id = :id"), {"id": row.id})
            if member is not None and await role_of(conn, row.account_id, member, lock=True) is None:
                raise invalid("not_a_member", f"The key's member is no longer a member of {row.account!r}.", "disabled")
        if changes:
            assignments = ", ".join(f'"{name}" = :{name}' for name in changes)
            await conn.execute(text(f"UPDATE api_keys SET {assignments} WHERE id = :id"), {**changes, "id": row.id})
            if principal.is_staff:
                reason = None if data.reason is msgspec.UNSET else data.reason
                await audit(conn, principal, "key.update", account_id=row.account_id, reason=reason,
                            details={"key": key, "changes": msgspec.to_builtins(data)})  # fmt: skip
        return view(await _row(conn, principal, key))


async def delete_key(ctx: Context, principal: Principal, key: str, reason: str | None = None) -> s.Key:
    """Delete a key: it is disabled for good and no longer listed or found. Answers the key as deleted
    (`disabled: true`), read back by id, since `_row` finds only keys not deleted. By staff: audit-logged, with
    the `reason` given (the request's query: a DELETE has no body)."""
    checked_reason(reason)
    require_reason(principal, reason)
    async with ctx.db.begin() as conn:
        row = await _row(conn, principal, key)
        await conn.execute(
            text("UPDATE api_keys SET deleted_at = now(), disabled = true WHERE id = :id"), {"id": row.id}
        )
        if principal.is_staff:
            await audit(conn, principal, "key.delete", account_id=row.account_id, reason=reason, details={"key": key})
        deleted = await conn.execute(
            text(f"SELECT {KEY_COLUMNS} FROM {KEY_FROM} WHERE k.id = :id"), {"id": row.id, "now": clock.now()}
        )
        return view(deleted.one())
