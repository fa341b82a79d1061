"""HTTP adapter for accounts: thin; every rule lives in the service and the ledger core."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter

from billing.accounts import schemas as s
from billing.accounts import service
from billing.auth.middleware import requires
from billing.auth.principal import ACCOUNT, GATEWAY, SUPPORT, Principal
from billing.context import Context
from billing.errors import invalid
from billing.http import IdempotencyKey, already_there, error_responses, money_response
from billing.idempotency import require_key
from billing.schemas import ListOf, timestamp_field

Limit = Annotated[int, QueryParameter(ge=1, le=service.MAX_PAGE, description="Page size, 1-100.")]
Cursor = Annotated[str | None, QueryParameter(description="Return entries older than this entry id (cursor).")]
LotCursor = Annotated[str | None, QueryParameter(description="Return the lots consumed after this lot id (cursor).")]
Live = Annotated[bool, QueryParameter(description="Only the lots with something left.")]
Ctx = NamedDependency[Context]

READERS = requires(SUPPORT, GATEWAY, ACCOUNT)
PROVISIONERS = requires(SUPPORT, GATEWAY)
STAFF = requires(SUPPORT)


def checked_as_of(request: Request, as_of: datetime) -> datetime:
    """An `as_of` query parameter, refused as a bare number (the parser reads one as Unix seconds: `as_of=2026`
    would be 1970) and held to the years every timestamp is (`timestamp_field`)."""
    if request.query_params.get("as_of", "").lstrip("+-").replace(".", "", 1).isdigit():
        raise invalid("invalid_parameter", "`as_of` is an ISO 8601 time, e.g. 2026-11-01T00:00:00Z.", "as_of")
    return timestamp_field(as_of, "as_of")


class AccountsController(Controller):
    path = "/v1/accounts"
    tags = ["accounts"]

    @post(
        "/",
        guards=[PROVISIONERS],
        summary="Create an account (idempotent on external_id)",
        responses={
            **already_there(s.Account, "An account with this external_id already existed: returned as it is"),
            **error_responses(400, 401, 403, 409),
        },
        status_code=201,
    )
    async def create_account(self, data: JSONBody[s.CreateAccount], ctx: Ctx) -> Response[s.Account]:
        account, created = await service.create_account(ctx, data)
        return Response(account, status_code=201 if created else 200)

    @get(
        "/",
        guards=[PROVISIONERS],
        summary="Find an account by external_id",
        responses=error_responses(400, 401, 403, 404),
    )
    async def find_account(self, external_id: FromQuery[str], ctx: Ctx, request: Request) -> s.Account:
        return await service.find_by_external_id(ctx, request.user, external_id)

    @get(
        "/{account_id:str}",
        guards=[READERS],
        summary="Retrieve an account",
        responses=error_responses(401, 403, 404),
    )
    async def get_account(self, account_id: FromPath[str], ctx: Ctx, request: Request) -> s.Account:
        return await service.get_account(ctx, request.user, account_id)

    @get(
        "/{account_id:str}/balance",
        guards=[READERS],
        summary="Balance now, or as of a past time",
        responses=error_responses(400, 401, 403, 404),
    )
    async def get_balance(
        self, account_id: FromPath[str], ctx: Ctx, request: Request, as_of: FromQuery[datetime | None] = None
    ) -> s.Balance | s.BalanceAsOf:
        principal: Principal = request.user
        if as_of is None:
            return await service.get_balance(ctx, principal, account_id)
        return await service.balance_as_of(ctx, principal, account_id, checked_as_of(request, as_of))

    @get(
        "/{account_id:str}/ledger",
        guards=[READERS],
        summary="Ledger history, newest first, with running balance",
        responses=error_responses(400, 401, 403, 404),
    )
    async def get_ledger(
        self,
        account_id: FromPath[str],
        ctx: Ctx,
        request: Request,
        limit: Limit = 20,
        starting_after: Cursor = None,
    ) -> ListOf[s.LedgerLine]:
        return await service.ledger(ctx, request.user, account_id, limit, starting_after)

    @get(
        "/{account_id:str}/lots",
        guards=[READERS],
        summary="Credit lots and what is left of each, in the order usage consumes them",
        responses=error_responses(400, 401, 403, 404),
    )
    async def get_lots(
        self,
        account_id: FromPath[str],
        ctx: Ctx,
        request: Request,
        limit: Limit = 20,
        starting_after: LotCursor = None,
        live: Live = False,
    ) -> ListOf[s.Lot]:
        return await service.lots(ctx, request.user, account_id, limit, starting_after, live=live)

    @post(
        "/{account_id:str}/grants",
        guards=[STAFF],
        summary="Grant credits (staff; audit-logged)",
        responses=error_responses(400, 401, 403, 404, 409),
        status_code=201,
    )
    async def create_grant(
        self,
        account_id: FromPath[str],
        data: JSONBody[s.CreateGrant],
        ctx: Ctx,
        request: Request,
        idempotency_key: IdempotencyKey,
    ) -> Response[s.MoneyMove]:
        outcome = await service.move_money(
            ctx,
            request.user,
            account_id,
            data,
            idempotency_key=require_key(idempotency_key),
            path=request.url.path,
        )
        return money_response(outcome)

    @post(
        "/{account_id:str}/adjustments",
        guards=[STAFF],
        summary="Adjust a balance up or down (staff; audit-logged)",
        responses=error_responses(400, 401, 402, 403, 404, 409),
        status_code=201,
    )
    async def create_adjustment(
        self,
        account_id: FromPath[str],
        data: JSONBody[s.CreateAdjustment],
        ctx: Ctx,
        request: Request,
        idempotency_key: IdempotencyKey,
    ) -> Response[s.MoneyMove]:
        outcome = await service.move_money(
            ctx,
            request.user,
            account_id,
            data,
            idempotency_key=require_key(idempotency_key),
            path=request.url.path,
        )
        return money_response(outcome)


class TrialBalanceController(Controller):
    path = "/v1/trial_balance"
    tags = ["ledger"]

    @get(
        "/",
        guards=[STAFF],
        summary="Trial balance: debits and credits per account of the chart, now or as of a past time",
        responses=error_responses(400, 401, 403),
    )
    async def get_trial_balance(
        self, ctx: Ctx, request: Request, as_of: FromQuery[datetime | None] = None
    ) -> s.TrialBalance:
        return await service.trial_balance(ctx, None if as_of is None else checked_as_of(request, as_of))


class JournalController(Controller):
    path = "/v1/journal_entries"
    tags = ["ledger"]

    @get(
        "/{entry_id:str}",
        guards=[STAFF],
        summary="A journal entry with all its postings",
        responses=error_responses(401, 403, 404),
    )
    async def get_entry(self, entry_id: FromPath[str], ctx: Ctx) -> s.JournalEntry:
        return await service.get_journal_entry(ctx, entry_id)
