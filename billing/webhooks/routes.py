"""`POST /v1/stripe/webhooks`: authenticated by Stripe's signature on the raw body, not by a token."""

from __future__ import annotations

import msgspec
from litestar import Request, post
from litestar.di import NamedDependency

from billing.context import Context
from billing.errors import API, ApiError
from billing.http import error_responses
from billing.webhooks import service
from billing.webhooks.verify import verified_event


class WebhookReceipt(msgspec.Struct):
    received: bool
    event: str
    type: str
    status: str
    outcome: str
    duplicate: bool
    object: str = "stripe_event_receipt"


@post(
    "/v1/stripe/webhooks",
    tags=["stripe"],
    summary="Stripe webhooks (signed; deduplicated on event id)",
    description=(
        "2xx: recorded (handled, ignored as an unknown type, or kept for review: no purchase matches, or the"
        " object lacks a field its handler uses). 400: bad signature, stale timestamp or malformed event (no `id`,"
        " `type` or `data.object`); nothing changed. 5xx: handling failed and nothing was kept; Stripe retries."
    ),
    responses=error_responses(400, 503),
    status_code=200,
    security=[{}],
)
async def stripe_webhook(request: Request, ctx: NamedDependency[Context]) -> WebhookReceipt:
    secret = ctx.settings.stripe_webhook_secret
    if not secret:
        raise ApiError(503, API, "webhooks_not_configured", "STRIPE_WEBHOOK_SECRET is not set.")
    payload = await request.body()
    event = verified_event(payload, request.headers.get("stripe-signature"), secret)
    receipt = await service.receive(ctx, event, request.app.state.stripe)
    return WebhookReceipt(
        received=True,
        event=receipt.event,
        type=receipt.type,
        status=receipt.status,
        outcome=receipt.outcome,
        duplicate=receipt.duplicate,
    )
