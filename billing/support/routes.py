"""HTTP adapter for support tickets (staff only: `support` or `admin`)."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, QueryParameter

from billing.auth.middleware import requires
from billing.auth.principal import SUPPORT
from billing.context import Context
from billing.http import IdempotencyKey, error_responses, money_response
from billing.idempotency import require_key
from billing.schemas import ListOf
from billing.support import schemas as s
from billing.support import service

Limit = Annotated[int, QueryParameter(ge=1, le=service.MAX_PAGE, description="Page size, 1-100.")]
Cursor = Annotated[str | None, QueryParameter(description="Return tickets older than this ticket id (cursor).")]
Status = Annotated[str | None, QueryParameter(description="Only tickets resolved so: " + ", ".join(service.STATUSES))]
Account = Annotated[str | None, QueryParameter(description="Only tickets of this account.")]
Ctx = NamedDependency[Context]


class SupportTicketsController(Controller):
    path = "/v1/support_tickets"
    tags = ["support"]
    guards = [requires(SUPPORT)]

    @post(
        "/",
        summary="Missing credits: look a payment up at Stripe, credit it if paid and missing, record the ticket",
        description="Resolved at once as `credited`, `already_credited`, `not_paid`, `wrong_account` or "
        "`needs_review`; give exactly one of `payment_intent`, `checkout_session`, or a "
        "`created_after`/`created_before` window.",
        responses=error_responses(400, 401, 403, 404, 409, 503),
        status_code=201,
    )
    async def open_ticket(
        self, data: JSONBody[s.CreateTicket], ctx: Ctx, request: Request, idempotency_key: IdempotencyKey
    ) -> Response[s.Ticket]:
        outcome = await service.open_ticket(
            ctx,
            request.user,
            data,
            stripe_client=request.app.state.stripe,
            idempotency_key=require_key(idempotency_key),
            path=request.url.path,
        )
        return money_response(outcome)

    @get("/", summary="Tickets, newest first, by status or account", responses=error_responses(400, 401, 403, 404))
    async def list_tickets(
        self,
        ctx: Ctx,
        request: Request,
        status: Status = None,
        account: Account = None,
        limit: Limit = 20,
        starting_after: Cursor = None,
    ) -> ListOf[s.Ticket]:
        return await service.list_tickets(
            ctx, request.user, status=status, account=account, limit=limit, starting_after=starting_after
        )

    @get(
        "/{ticket_id:str}",
        summary="A ticket: what was found, the outcome, who and when",
        responses=error_responses(401, 403, 404),
    )
    async def get_ticket(self, ticket_id: FromPath[str], ctx: Ctx) -> s.Ticket:
        return await service.get_ticket(ctx, ticket_id)
