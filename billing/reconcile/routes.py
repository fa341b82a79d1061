"""HTTP adapter for the reconciler's recorded runs (staff: `support` or `admin`); read only."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, get
from litestar.di import NamedDependency
from litestar.params import FromPath, QueryParameter

from billing.auth.middleware import requires
from billing.auth.principal import SUPPORT
from billing.context import Context
from billing.http import error_responses
from billing.reconcile import schemas as s
from billing.reconcile import service
from billing.schemas import ListOf

Limit = Annotated[int, QueryParameter(ge=1, le=service.MAX_PAGE, description="Page size, 1-100.")]
Cursor = Annotated[str | None, QueryParameter(description="Return runs older than this run id (cursor).")]
Ctx = NamedDependency[Context]


class ReconciliationRunsController(Controller):
    path = "/v1/reconciliation_runs"
    tags = ["support"]
    guards = [requires(SUPPORT)]

    @get(
        "/", summary="The missing-credit reconciler's runs, newest first", responses=error_responses(400, 401, 403, 404)
    )
    async def list_runs(
        self, ctx: Ctx, limit: Limit = 20, starting_after: Cursor = None
    ) -> ListOf[s.ReconciliationRun]:
        return await service.list_runs(ctx, limit=limit, starting_after=starting_after)

    @get(
        "/{run_id:str}",
        summary="One run: window, counts, what it credited and what needs review",
        responses=error_responses(401, 403, 404),
    )
    async def get_run(self, run_id: FromPath[str], ctx: Ctx) -> s.ReconciliationRun:
        return await service.get_run(ctx, run_id)
