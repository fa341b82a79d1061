from __future__ import annotations

from litestar import Controller, Request, delete, get, patch, post
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery, JSONBody

from billing.auth.middleware import requires
from billing.auth.principal import ACCOUNT, GATEWAY, SUPPORT
from billing.context import Context
from billing.http import error_responses
from billing.keys import schemas as s
from billing.keys import service
from billing.schemas import ListOf

MANAGERS = requires(SUPPORT, GATEWAY, ACCOUNT)
Ctx = NamedDependency[Context]


class AccountKeysController(Controller):
    path = "/v1/accounts/{account_id:str}/keys"
    tags = ["keys"]
    guards = [MANAGERS]

    @post("/", summary="Create a key", responses=error_responses(400, 401, 403, 404), status_code=201)
    async def create_key(
        self, account_id: FromPath[str], data: JSONBody[s.CreateKey], ctx: Ctx, request: Request
    ) -> s.Key:
        return await service.create_key(ctx, request.user, account_id, data)

    @get("/", summary="List an account's keys", responses=error_responses(401, 403, 404))
    async def list_keys(self, account_id: FromPath[str], ctx: Ctx, request: Request) -> ListOf[s.Key]:
        return ListOf(data=await service.list_keys(ctx, request.user, account_id), has_more=False)


class KeysController(Controller):
    path = "/v1/keys/{key_id:str}"
    tags = ["keys"]
    guards = [MANAGERS]

    @get("/", summary="A key with its limit and usage", responses=error_responses(401, 403, 404))
    async def get_key(self, key_id: FromPath[str], ctx: Ctx, request: Request) -> s.Key:
        return await service.get_key(ctx, request.user, key_id)

    @patch(
        "/",
        summary="Change a key's limit, reset, name, expiry or disable it",
        responses=error_responses(400, 401, 403, 404),
    )
    async def update_key(self, key_id: FromPath[str], data: JSONBody[s.UpdateKey], ctx: Ctx, request: Request) -> s.Key:
        return await service.update_key(ctx, request.user, key_id, data)

    @delete(
        "/",
        summary="Delete a key (staff give `?reason=`, kept in the audit log)",
        responses=error_responses(400, 401, 403, 404),
        status_code=200,
    )
    async def delete_key(
        self, key_id: FromPath[str], ctx: Ctx, request: Request, reason: FromQuery[str | None] = None
    ) -> s.Key:
        return await service.delete_key(ctx, request.user, key_id, reason)
