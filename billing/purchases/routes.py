"""HTTP adapter for purchases: quotes, buying credits, purchase history, pricing versions (admin).

Who may buy for an account (quotes, purchases, history, refunds): the account's own token, or support/admin.
For an organization also the account token of a user who is one of its `admin` members; a plain member's
token is refused with 403 `not_an_organization_admin` (billing/organizations).
"""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, Request, Response, get, post, put
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, QueryParameter

from billing.auth.middleware import requires
from billing.auth.principal import ACCOUNT, ADMIN, SUPPORT
from billing.context import Context
from billing.http import IdempotencyKey, error_responses, money_response
from billing.idempotency import require_key
from billing.purchases import auto_topup, service
from billing.purchases import schemas as s
from billing.schemas import ListOf

Limit = Annotated[int, QueryParameter(ge=1, le=service.MAX_PAGE, description="Page size, 1-100.")]
Cursor = Annotated[str | None, QueryParameter(description="Return purchases older than this purchase id (cursor).")]
Ctx = NamedDependency[Context]

BUYERS = requires(SUPPORT, ACCOUNT)


class PurchasesController(Controller):
    path = "/v1/accounts/{account_id:str}"
    tags = ["purchases"]
    guards = [BUYERS]

    @post(
        "/quotes",
        summary="What buying credits would cost: credits, fee, volume discount, total charged",
        responses=error_responses(400, 401, 403, 404),
        status_code=200,
    )
    async def create_quote(
        self, account_id: FromPath[str], data: JSONBody[s.CreateQuote], ctx: Ctx, request: Request
    ) -> s.Quote:
        return await service.quote(ctx, request.user, account_id, data)

    @post(
        "/purchases",
        summary="Buy credits: a pending purchase and its Stripe PaymentIntent (client_secret to confirm it)",
        description="Credits are added when Stripe reports the payment (webhook), exactly once.",
        responses=error_responses(400, 401, 403, 404, 409, 503),
        status_code=201,
    )
    async def create_purchase(
        self,
        account_id: FromPath[str],
        data: JSONBody[s.CreatePurchase],
        ctx: Ctx,
        request: Request,
        idempotency_key: IdempotencyKey,
    ) -> Response[s.CreatedPurchase]:
        outcome = await service.create_purchase(
            ctx,
            request.user,
            account_id,
            data,
            stripe_client=request.app.state.stripe,
            idempotency_key=require_key(idempotency_key),
            path=request.url.path,
        )
        return money_response(outcome)

    @get(
        "/purchases",
        summary="Purchase history, newest first: status, fee, discount, what is left of each lot",
        responses=error_responses(400, 401, 403, 404),
    )
    async def list_purchases(
        self, account_id: FromPath[str], ctx: Ctx, request: Request, limit: Limit = 20, starting_after: Cursor = None
    ) -> ListOf[s.Purchase]:
        return await service.list_purchases(ctx, request.user, account_id, limit, starting_after)

    @put(
        "/auto_topup",
        summary="Set auto top-up: below `threshold`, buy `amount` off-session with the saved card",
        description="At most one payment in flight, a cooldown between attempts, an optional monthly cap; "
        "3 declines in a row, or an amount a newer pricing version refuses, disable it (`disabled_reason`)."
        " Re-enabling clears the declines. Stripe must say `payment_method` is attached to `stripe_customer`"
        " (400 `payment_method_not_attached`); a customer another account's auto top-up names is refused"
        " (409 `stripe_customer_of_another_account`).",
        responses=error_responses(400, 401, 403, 404, 409, 503),
        status_code=200,
    )
    async def set_auto_topup(
        self, account_id: FromPath[str], data: JSONBody[auto_topup.SetAutoTopup], ctx: Ctx, request: Request
    ) -> auto_topup.AutoTopup:
        return await auto_topup.set_auto_topup(
            ctx, request.user, account_id, data, stripe_client=request.app.state.stripe
        )

    @get(
        "/auto_topup", summary="The account's auto top-up settings and state", responses=error_responses(401, 403, 404)
    )
    async def get_auto_topup(self, account_id: FromPath[str], ctx: Ctx, request: Request) -> auto_topup.AutoTopup:
        return await auto_topup.get_auto_topup(ctx, request.user, account_id)


class PurchaseController(Controller):
    path = "/v1/purchases"
    tags = ["purchases"]
    guards = [BUYERS]

    @get("/{purchase_id:str}", summary="A purchase", responses=error_responses(401, 403, 404))
    async def get_purchase(self, purchase_id: FromPath[str], ctx: Ctx, request: Request) -> s.Purchase:
        return await service.get_purchase(ctx, request.user, purchase_id)

    @post(
        "/{purchase_id:str}/refunds",
        summary="Refund unused credits of a card purchase (within 24 hours; never the fee, never crypto)",
        description="A 4xx means nothing was refunded: every input is checked before Stripe is asked to refund."
        " 409 when the rules refuse: `purchase_not_paid`, `crypto_not_refundable`, `refund_window_closed`,"
        " `nothing_left_to_refund`, `refund_exceeds_remaining`; `refund_failed` when a retry finds the refund"
        " its first attempt made failed at Stripe. 503 `refund_not_recorded`: Stripe refunded but the ledger could"
        " not record it; retry with the same Idempotency-Key (the same refund, never a second: if Stripe's"
        " `charge.refunded` booked it meanwhile, the retry answers that booking).",
        responses=error_responses(400, 401, 403, 404, 409, 503),
        status_code=201,
    )
    async def create_refund(
        self,
        purchase_id: FromPath[str],
        data: JSONBody[s.CreateRefund],
        ctx: Ctx,
        request: Request,
        idempotency_key: IdempotencyKey,
    ) -> Response[s.RefundCreated]:
        outcome = await service.refund_purchase(
            ctx,
            request.user,
            purchase_id,
            data,
            stripe_client=request.app.state.stripe,
            idempotency_key=require_key(idempotency_key),
            path=request.url.path,
        )
        return money_response(outcome)


class PricingController(Controller):
    path = "/v1/pricing_versions"
    tags = ["admin"]
    guards = [requires(ADMIN)]

    @post(
        "/",
        summary="Add a version of the purchase fees and volume-discount tiers",
        responses=error_responses(400, 401, 403),
        status_code=201,
    )
    async def create_version(
        self, data: JSONBody[s.CreatePricingVersion], ctx: Ctx, request: Request
    ) -> s.PricingVersion:
        return await service.create_pricing_version(ctx, request.user, data)

    @get("/", summary="Pricing versions, newest first", responses=error_responses(401, 403))
    async def list_versions(self, ctx: Ctx) -> ListOf[s.PricingVersion]:
        return await service.list_pricing_versions(ctx)
