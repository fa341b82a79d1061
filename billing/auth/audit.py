"""The audit log: staff actions write one `audit_log` row — actor, action, account, entry, reason — in the
same transaction as the action, so an action is never kept without its record (SPEC §7).

A staff member says why: a support or admin token that changes an account's keys, members, auto top-up or
money, or the platform's fee rules, gives a `reason` or is refused before anything changes
(`require_reason`). A customer acting on its own account through its account token needs none. Tokens are
the one staff write without one: minting and revoking a credential is recorded with its actor and name."""

from __future__ import annotations

from typing import Any

import msgspec
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from billing.auth.principal import Principal
from billing.errors import invalid

_INSERT = text(
    "INSERT INTO audit_log (actor, action, account_id, entry_id, reason, details)"
    " VALUES (:actor, :action, :account_id, :entry_id, :reason, CAST(:details AS jsonb))"
)


def require_reason(principal: Principal, reason: object) -> None:
    """400 `reason_required` when staff acting through `principal` gave no reason (None or unset)."""
    if principal.is_staff and not isinstance(reason, str):
        raise invalid(
            "reason_required", "Staff give a `reason` for this change; it is kept in the audit log.", "reason"
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
