"""The gateway's HTTP surface. Money moves here are idempotent on the gateway's own ids (request id,
generation id); a retry with the same id and body replays the first answer (`Idempotent-Replayed`).
"""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody

from billing.auth.middleware import requires
from billing.auth.principal import GATEWAY
from billing.context import Context
from billing.gateway import schemas as s
from billing.gateway import service
from billing.gateway.batch import ChargeBatcher
from billing.gateway.hold_batch import CaptureBatcher, HoldBatcher
from billing.http import error_responses, money_response
from billing.idempotency import Outcome

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
