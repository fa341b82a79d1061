"""HTTP adapter for organization membership: staff manage it; the organization and its admins read it."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, Request, Response, delete, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, QueryParameter

from billing.auth.middleware import requires
from billing.auth.principal import ACCOUNT, GATEWAY, SUPPORT
from billing.context import Context
from billing.http import already_there, error_responses
from billing.organizations import schemas as s
from billing.organizations import service
from billing.schemas import ListOf

Ctx = NamedDependency[Context]
AuditReason = Annotated[
    str | None,
    QueryParameter(
        min_length=1, max_length=1000, description="Why (kept in the audit log). Required when staff make the change."
    ),
]


class MembersController(Controller):
    path = "/v1/accounts/{account_id:str}/members"
    tags = ["organizations"]

    @post(
        "/",
        guards=[requires(SUPPORT)],
        summary="Add a user to an organization as `admin` or `member`, or change its role (staff; audit-logged)",
        description="Idempotent: 201 when the member was added, 200 when it already was (its role set).",
        responses={
            **already_there(s.Member, "The user already was a member: its role set"),
            **error_responses(400, 401, 403, 404),
        },
        status_code=201,
    )
    async def set_member(
        self, account_id: FromPath[str], data: JSONBody[s.SetMember], ctx: Ctx, request: Request
    ) -> Response[s.Member]:
        member, created = await service.set_member(ctx, request.user, account_id, data)
        return Response(member, status_code=201 if created else 200)

    @get(
        "/",
        guards=[requires(SUPPORT, GATEWAY, ACCOUNT)],
        summary="An organization's members (staff, gateway, the organization's own token, its admins)",
        responses=error_responses(400, 401, 403, 404),
    )
    async def list_members(self, account_id: FromPath[str], ctx: Ctx, request: Request) -> ListOf[s.Member]:
        return await service.list_members(ctx, request.user, account_id)

    @delete(
        "/{member_id:str}",
        guards=[requires(SUPPORT)],
        summary="Remove a member from an organization (staff; audit-logged)",
        responses=error_responses(400, 401, 403, 404),
        status_code=200,
    )
    async def remove_member(
        self,
        account_id: FromPath[str],
        member_id: FromPath[str],
        ctx: Ctx,
        request: Request,
        reason: AuditReason = None,
    ) -> s.Member:
        return await service.remove_member(ctx, request.user, account_id, member_id, reason)
