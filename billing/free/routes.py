"""HTTP adapter for free-model admission: thin; the rules live in the service and `quota`."""

from __future__ import annotations

from typing import Any

from litestar import Controller, MediaType, Request, Response, post
from litestar.di import NamedDependency
from litestar.params import JSONBody

from billing.auth.middleware import requires
from billing.auth.principal import GATEWAY
from billing.context import Context
from billing.free import schemas as s
from billing.free import service
from billing.free.quota import FreeLimiter
from billing.http import error_responses

# The route's contract, served as its OpenAPI description.
ADMISSION = """Ask before each request to a `:free` model. Quotas are per account, across all its keys:
20 per UTC minute, and 50 per UTC day (1,000 once the account has purchased $10 of credits in total);
the day resets at 00:00 UTC. A refused request is not counted.

- 402 `negative_balance` when the balance is below zero (checked before the quota).
- 429 `free_model_rate_limited` names the window (`limit_window`: `minute` or `day`), its `limit`,
  `remaining` and `reset_at`, with a `Retry-After` header in seconds.

If Redis is unreachable the service fails open to a per-process counter with the same limits (so an
outage neither blocks free traffic nor makes it unlimited) and answers `degraded: true`; with several
API processes an account may then get up to that many times its quota until Redis is back.
"""


def _rate_limited(_: Request, exc: service.RateLimited) -> Response[Any]:
    return Response(
        exc.body(), status_code=exc.status, media_type=MediaType.JSON, headers={"Retry-After": str(exc.retry_after)}
    )


class FreeRequestsController(Controller):
    path = "/v1/free_requests"
    tags = ["free models"]
    guards = [requires(GATEWAY)]
    exception_handlers = {service.RateLimited: _rate_limited}

    @post(
        "/",
        summary="Admit a free-model request (counts it against the account's quota)",
        responses=error_responses(400, 401, 402, 403, 404, 429),
        status_code=200,
        description=ADMISSION,
    )
    async def create_free_request(
        self, data: JSONBody[s.CreateFreeRequest], ctx: NamedDependency[Context], request: Request
    ) -> s.FreeRequest:
        """Admit or refuse one free-model request (rules: `ADMISSION`). If Redis is unreachable it fails
        open to per-process counters with the same limits and answers `degraded: true`."""
        limiter: FreeLimiter = request.app.state.free_limiter
        return await service.admit(ctx, limiter, request.user, data)
