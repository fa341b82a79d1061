"""The gateway's HTTP surface. Money moves here are idempotent on the gateway's own ids (request id,
generation id); a retry with the same id and body replays the first answer (`Idempotent-Replayed`).
"""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, QueryParameter
from litestar.response import Stream

from billing.auth.middleware import requires
from billing.auth.principal import ACCOUNT, GATEWAY, SUPPORT
from billing.context import Context
from billing.gateway import activity, service
from billing.gateway import schemas as s
from billing.gateway.batch import ChargeBatcher
from billing.gateway.hold_batch import CaptureBatcher, HoldBatcher
from billing.http import error_responses, money_response
from billing.idempotency import Outcome
from billing.schemas import ListOf

Ctx = NamedDependency[Context]
SPENDERS = requires(GATEWAY)


def _answer(status: int, body: Any, replayed: bool) -> Response[Any]:
    return money_response(Outcome(status, body, replayed))


class ChargesController(Controller):
    path = "/v1/charges"
    tags = ["gateway"]
    guards = [SPENDERS]

    @post(
        "/",
        summary="Record a one-shot charge for a generation (idempotent on generation_id)",
        responses=error_responses(400, 401, 402, 403, 404, 409),
        status_code=201,
    )
    async def create_charge(
        self, data: JSONBody[s.CreateCharge], ctx: Ctx, request: Request
    ) -> Response[s.GenerationOut]:
        batcher: ChargeBatcher | None = request.app.state.charge_batcher
        if batcher is None:
            return _answer(*await service.charge(ctx, request.user, data))
        return _answer(*await batcher.charge(request.user, data))


class HoldsController(Controller):
    path = "/v1/holds"
    tags = ["gateway"]
    guards = [SPENDERS]

    @post(
        "/",
        summary="Reserve up to an amount for one request (idempotent on request_id)",
        responses=error_responses(400, 401, 402, 403, 404, 409),
        status_code=201,
    )
    async def create_hold(self, data: JSONBody[s.CreateHold], ctx: Ctx, request: Request) -> Response[s.HoldOut]:
        batcher: HoldBatcher | None = request.app.state.hold_batcher
        if batcher is None:
            return _answer(*await service.create_hold(ctx, request.user, data))
        return _answer(*await batcher.hold(request.user, data))

    @post(
        "/{hold_id:str}/capture",
        summary="Capture a hold with the generation's actual cost",
        responses=error_responses(400, 401, 403, 404, 409),
        status_code=200,
    )
    async def capture_hold(
        self, hold_id: FromPath[str], data: JSONBody[s.Capture], ctx: Ctx, request: Request
    ) -> Response[s.CaptureOut]:
        batcher: CaptureBatcher | None = request.app.state.capture_batcher
        if batcher is None:
            return _answer(*await service.resolve_hold(ctx, request.user, hold_id, data))
        return _answer(*await batcher.capture(request.user, hold_id, data))

    @post(
        "/{hold_id:str}/release",
        summary="Release a hold: nothing is charged",
        responses=error_responses(400, 401, 403, 404, 409),
        status_code=200,
    )
    async def release_hold(
        self, hold_id: FromPath[str], data: JSONBody[s.Release], ctx: Ctx, request: Request
    ) -> Response[s.HoldOut]:
        return _answer(*await service.resolve_hold(ctx, request.user, hold_id, data))


class GenerationsController(Controller):
    path = "/v1/generations"
    tags = ["gateway"]

    @get(
        "/{generation_id:str}",
        guards=[requires(GATEWAY, "support", "account")],
        summary="A generation's cost record",
        responses=error_responses(401, 403, 404),
    )
    async def get_generation(self, generation_id: FromPath[str], ctx: Ctx, request: Request) -> s.GenerationOut:
        return await service.get_generation(ctx, request.user, generation_id)


Limit = Annotated[int, QueryParameter(ge=1, le=activity.MAX_PAGE, description="Page size, 1-100.")]
Cursor = Annotated[str | None, QueryParameter(description="Return generations older than this generation id.")]
Since = Annotated[str | None, QueryParameter(description="Only generations created at or after this ISO 8601 time.")]
Until = Annotated[str | None, QueryParameter(description="Only generations created before this ISO 8601 time.")]
OfKey = Annotated[str | None, QueryParameter(description="Only generations paid through this key.")]


class ActivityController(Controller):
    """An account's activity: its charged generations (the dashboard's list and CSV export, support's view)."""

    path = "/v1/accounts/{account_id:str}"
    tags = ["gateway"]
    guards = [requires(GATEWAY, SUPPORT, ACCOUNT)]

    @get(
        "/generations",
        summary="The account's generations, newest first (activity)",
        responses=error_responses(400, 401, 403, 404),
    )
    async def list_generations(
        self,
        account_id: FromPath[str],
        ctx: Ctx,
        request: Request,
        limit: Limit = 20,
        starting_after: Cursor = None,
        key: OfKey = None,
        since: Since = None,
        until: Until = None,
    ) -> ListOf[s.GenerationOut]:
        return await activity.list_generations(
            ctx, request.user, account_id, limit=limit, starting_after=starting_after, key=key, since=since, until=until
        )

    @get(
        "/generations.csv",
        summary="The account's generations as CSV: 30 days before `until` (default now) unless `since` is given",
        description="At most 366 days per export (400 `export_range_too_long`). Columns: "
        + ", ".join(activity.COLUMNS)
        + ". Times in UTC; money as decimal strings; a text cell that a spreadsheet would read as a formula is"
        " prefixed with `'`.",
        responses=error_responses(400, 401, 403, 404),
        media_type="text/csv",
    )
    async def export_generations(
        self, account_id: FromPath[str], ctx: Ctx, request: Request, key: OfKey = None, since: Since = None,
        until: Until = None,
    ) -> Stream:  # fmt: skip
        name, lines = await activity.export_generations(
            ctx, request.user, account_id, key=key, since=since, until=until
        )
        return Stream(
            lines,
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )
