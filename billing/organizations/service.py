"""Organization membership, and who may act for an organization's money.

An organization account has one shared credit pool; user accounts belong to it as `admin` or `member`
(`organization_members`). Buying (and refunding) credits for an organization is allowed to its own account
token, to support/admin, and to the account token of a user who is one of its `admin`s; a plain member's
token is refused with 403 `not_an_organization_admin` (SPEC §5 Organizations; issue 4). An organization key
names a member, who must belong to the organization.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from billing.accounts.service import find_account
from billing.auth.audit import audit, require_reason
from billing.auth.principal import SUPPORT, Principal
from billing.context import Context
from billing.errors import INVALID_REQUEST, PERMISSION, ApiError, invalid, not_found
from billing.organizations import schemas as s
from billing.schemas import ListOf

ADMIN_ROLE = "admin"
# Reads an account whatever the caller's token; the caller's own rights are checked separately.
_LOOKUP = Principal(token_id="internal", name="organization access check", scopes=frozenset({SUPPORT}))

NOT_AN_ADMIN = "not_an_organization_admin"


async def role_of(conn: AsyncConnection, organization_id: int, member_id: int, *, lock: bool = False) -> str | None:
    """The member's role in the organization, or None. `lock` holds the membership (FOR SHARE) until the
    transaction ends, so a concurrent removal waits for what depends on it."""
    return await conn.scalar(
        text(
            "SELECT role FROM organization_members WHERE organization_id = :o AND member_id = :m"
            + (" FOR SHARE" if lock else "")
        ),
        {"o": organization_id, "m": member_id},
    )


async def member_account(conn: AsyncConnection, organization_id: int, member: str, *, lock: bool = False) -> int | None:
    """The account id of `member` if it is a member of the organization, else None, an unknown account alike.
    Read whatever the caller's token: a member's account is not the organization's to see, and the caller's
    right to the organization is checked before; the answer reveals no account that is not a member. `lock`
    as in `role_of`."""
    try:
        row = await find_account(conn, _LOOKUP, member)
    except ApiError:
        return None
    return row.id if await role_of(conn, organization_id, row.id, lock=lock) is not None else None


async def authorize(conn: AsyncConnection, principal: Principal, account_id: int, what: str, ident: str) -> None:
    """May this caller act for the account's money? Staff and the account's own token may; so may the
    account token of an `admin` member of the organization. A plain member is told no (403); anyone else
    is answered as if the thing did not exist (404)."""
    if principal.may_see(account_id):
        return
    if principal.account_id is not None:
        role = await role_of(conn, account_id, principal.account_id)
        if role == ADMIN_ROLE:
            return
        if role is not None:
            raise ApiError(
                403,
                PERMISSION,
                NOT_AN_ADMIN,
                "Only the organization's admins (or its own token, or support) may do this.",
            )
    raise not_found(what, ident)


async def find_account_to_act_for(conn: AsyncConnection, principal: Principal, account: str) -> Row[Any]:
    """`find_account`, where an organization's admin members may act for it too (`authorize`)."""
    if principal.account_id is None:
        return await find_account(conn, principal, account)
    try:
        row = await find_account(conn, _LOOKUP, account)
    except ApiError as missing:
        raise not_found("account", account) from missing
    await authorize(conn, principal, row.id, "account", account)
    return row


async def _organization(conn: AsyncConnection, principal: Principal, organization: str) -> Row[Any]:
    row = await find_account(conn, principal, organization)
    if row.kind != "organization":
        raise invalid("not_an_organization", f"Account {organization!r} is not an organization.")
    return row


async def _lock_memberships(conn: AsyncConnection, organization_id: int) -> None:
    """Changes to one organization's members serialize on its account row. NO KEY UPDATE: it does not
    conflict with the key-share locks the ledger's inserts take on the same row."""
    await conn.execute(text("SELECT 1 FROM accounts WHERE id = :o FOR NO KEY UPDATE"), {"o": organization_id})


async def set_member(ctx: Context, principal: Principal, organization: str, data: s.SetMember) -> tuple[s.Member, bool]:
    """Add a user to the organization with a role, or change its role (staff; audit-logged). Idempotent: the
    same role again changes nothing and logs nothing. Answers the membership and whether it was created."""
    require_reason(principal, data.reason)
    async with ctx.db.begin() as conn:
        org = await _organization(conn, principal, organization)
        member = await find_account(conn, principal, data.member)
        if member.kind != "user":
            raise invalid("member_must_be_a_user", "Only a `user` account can be a member.", "member")
        await _lock_memberships(conn, org.id)
        previous = await role_of(conn, org.id, member.id)
        row = (
            await conn.execute(
                text(
                    "INSERT INTO organization_members (organization_id, member_id, role) VALUES (:o, :m, :r)"
                    " ON CONFLICT (organization_id, member_id) DO UPDATE SET role = EXCLUDED.role"
                    " RETURNING role, created_at"
                ),
                {"o": org.id, "m": member.id, "r": data.role},
            )
        ).one()
        if previous != data.role:
            action = "organization_member_added" if previous is None else "organization_member_role_changed"
            details = {"member": data.member, "role": data.role, "previous_role": previous}
            await audit(conn, principal, action, account_id=org.id, reason=data.reason, details=details)
    view = s.Member(organization=organization, member=data.member, role=row.role, created_at=row.created_at)
    return view, previous is None


async def list_members(ctx: Context, principal: Principal, organization: str) -> ListOf[s.Member]:
    """The organization's members, oldest first: for staff, the gateway, its own token and its admins."""
    async with ctx.db.connect() as conn:
        org = await find_account_to_act_for(conn, principal, organization)
        if org.kind != "organization":
            raise invalid("not_an_organization", f"Account {organization!r} is not an organization.")
        rows = await conn.execute(
            text(
                "SELECT a.public_id, m.role, m.created_at FROM organization_members m"
                " JOIN accounts a ON a.id = m.member_id WHERE m.organization_id = :o ORDER BY m.created_at, a.id"
            ),
            {"o": org.id},
        )
        data = [s.Member(organization=organization, member=r[0], role=r[1], created_at=r[2]) for r in rows]
    return ListOf(data=data, has_more=False)


async def remove_member(
    ctx: Context, principal: Principal, organization: str, member: str, reason: str | None
) -> s.Member:
    """Remove a member (staff; audit-logged). A removed member's keys no longer spend from the pool (SPEC §5
    Organizations: its members' keys spend from it): the organization's keys that name it are disabled in the
    same transaction, and the audit records which. The keys stay (they record who spent what) and no new key
    can name it."""
    require_reason(principal, reason)
    async with ctx.db.begin() as conn:
        org = await _organization(conn, principal, organization)
        await _lock_memberships(conn, org.id)
        row = (
            await conn.execute(
                text(
                    "DELETE FROM organization_members m USING accounts a WHERE a.id = m.member_id"
                    " AND m.organization_id = :o AND a.public_id = :m RETURNING m.member_id, m.role, m.created_at"
                ),
                {"o": org.id, "m": member},
            )
        ).first()
        if row is None:
            raise ApiError(
                404,
                INVALID_REQUEST,
                "organization_member_not_found",
                f"{member!r} is not a member of {organization!r}.",
            )
        # A key creation for this member holds its membership FOR SHARE, so the DELETE above waited for it and
        # this statement sees its key. The gateway's spending SQL already refuses a disabled key.
        keys = await conn.scalars(
            text(
                "UPDATE api_keys SET disabled = true WHERE account_id = :o AND member_id = :m AND NOT disabled"
                " RETURNING public_id"
            ),
            {"o": org.id, "m": row.member_id},
        )
        details = {"member": member, "role": row.role, "disabled_keys": sorted(keys)}
        await audit(conn, principal, "organization_member_removed", account_id=org.id, reason=reason, details=details)
    return s.Member(organization=organization, member=member, role=row.role, created_at=row.created_at, deleted=True)
