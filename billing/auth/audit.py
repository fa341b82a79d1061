"""The audit log: staff actions write one `audit_log` row — actor, action, account, entry, reason — in the
same transaction as the action, so an action is never kept without its record (SPEC §7)."""

from __future__ import annotations

from typing import Any

import msgspec
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from billing.auth.principal import Principal

_INSERT = text(
    "INSERT INTO audit_log (actor, action, account_id, entry_id, reason, details)"
    " VALUES (:actor, :action, :account_id, :entry_id, :reason, CAST(:details AS jsonb))"
)


async def audit(
    conn: AsyncConnection,
    principal: Principal,
    action: str,
    *,
    account_id: int | None = None,
    entry_id: int | None = None,
    reason: str | None = None,
    details: dict[str, Any] | None = None,
) -> None:
    """Record what `principal` did, on `conn` (the action's own transaction)."""
    await conn.execute(
        _INSERT,
        {
            "actor": principal.actor,
            "action": action,
            "account_id": account_id,
            "entry_id": entry_id,
            "reason": reason,
            "details": msgspec.json.encode(details or {}).decode(),
        },
    )
