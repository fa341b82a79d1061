"""The support console (SPEC §2: support staff "look at an account's history, refund, and make audited
adjustments — through the API and a small web console"): server-rendered pages under `/console` for
finding an account, reading its balance, lots, ledger, purchases, activity and tickets, adjusting its
balance, refunding a purchase and opening a missing-credit ticket.

Every action calls the API's own service function with the signed-in staff member's token, so the rules,
the idempotency and the audit record (actor and reason) are the API's. Signing in takes a `support` or
`admin` token; it is kept in an HttpOnly, SameSite=Strict cookie scoped to `/console`, checked on every
request like a bearer token (a revoked token signs the console out). A form posted from another origin
is refused (the cookie is not even sent cross-site), and every money form carries its own idempotency
key: a double click or a reload moves money once.
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import quote, urlsplit

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.enums import MediaType, RequestEncodingType
from litestar.params import Body, FromPath, FromQuery
from litestar.response import Redirect, Stream

from billing.accounts import schemas as account_schemas
from billing.accounts import service as accounts
from billing.auth.principal import SUPPORT, Principal
from billing.console import pages
from billing.context import Context
from billing.errors import ApiError, invalid
from billing.gateway import activity
from billing.idempotency import Outcome
from billing.purchases import schemas as purchase_schemas
from billing.purchases import service as purchases
from billing.support import schemas as support_schemas
from billing.support import service as support

Ctx = NamedDependency[Context]
Form = Annotated[dict[str, str], Body(media_type=RequestEncodingType.URL_ENCODED)]
COOKIE = "billing_console"


def _html(content: str, status: int = 200) -> Response[str]:
    return Response(
        content,
        status_code=status,
        media_type=MediaType.HTML,
        headers={
            "Cache-Control": "no-store",
            "X-Frame-Options": "DENY",
            "Content-Security-Policy": "default-src 'self'; style-src 'unsafe-inline'",
        },
    )


async def _staff(request: Request[Any, Any, Any]) -> Principal | None:
    """The signed-in staff member: the cookie's token, resolved like a bearer token, with support scope."""
    secret = request.cookies.get(COOKIE)
    if not secret:
        return None
    principal = await request.app.state.tokens.resolve(secret)
    return principal if principal is not None and principal.has_any(SUPPORT) else None


def _same_origin(request: Request[Any, Any, Any]) -> bool:
    """A form posted from this console's own pages (browsers send `Origin`, or at least `Referer`, on a POST).
    The host is compared, not the scheme: behind a proxy that ends TLS the service sees plain HTTP."""
    sent = request.headers.get("origin") or request.headers.get("referer")
    if not sent:
        return True  # browsers send one of them on a form post; a client sending neither has no cookie to abuse
    return urlsplit(sent).netloc == request.url.netloc


def _flash(outcome: Outcome) -> tuple[str, str]:
    """What a form did, in a line: the entry, refund or ticket it made (a ticket with what it found)."""
    if outcome.status >= 400:
        return "err", _message(outcome.body)
    body = outcome.body
    if isinstance(body.get("entry"), dict):
        what = f"entry {body['entry'].get('id')}"
    elif isinstance(body.get("refund"), dict):
        what = f"refund {body['refund'].get('id')} of {body['refund'].get('amount')} USD"
    else:
        what = f"ticket {body.get('id')}: {body.get('status')} — {body.get('resolution')}"
    again = " (this form had been sent before: nothing was done twice)" if outcome.replayed else ""
    return "ok", f"Done: {what}{again}."


def _message(body: Any) -> str:
    error = body.get("error", {}) if isinstance(body, dict) else {}
    return f"{error.get('message', 'Refused.')} ({error.get('code', 'error')})"


def _decode(kind: type[Any], fields: dict[str, Any]) -> Any:
    """A form as the API's request body: the same validation, a 400 with the same message."""
    try:
        return msgspec.convert({k: v for k, v in fields.items() if v != ""}, kind, strict=False)
    except msgspec.ValidationError as exc:
        raise invalid("invalid_parameter", str(exc)) from None


class ConsoleController(Controller):
    path = "/console"
    include_in_schema = False

    @get("/")
    async def home(self, request: Request[Any, Any, Any]) -> Response[str] | Redirect:
        if await _staff(request) is not None:
            return Redirect("/console/accounts", status_code=303)
        return _html(pages.login())

    @post("/login", status_code=303)
    async def login(self, data: Form, request: Request[Any, Any, Any]) -> Response[str] | Redirect:
        if not _same_origin(request):  # no signing a staff member in to someone else's token
            return _html(pages.page("Refused", "<p>This form was sent from another site.</p>"), 403)
        secret = (data.get("token") or "").strip()
        principal = await request.app.state.tokens.resolve(secret) if secret else None
        if principal is None or not principal.has_any(SUPPORT):
            return _html(pages.login("That token is unknown, revoked, expired, or not a support token."), 401)
        response = Redirect("/console/accounts", status_code=303)
        response.set_cookie(
            COOKIE, secret, path="/console", httponly=True, samesite="strict", secure=request.url.scheme == "https"
        )
        return response

    @post("/logout", status_code=303)
    async def logout(self) -> Redirect:
        response = Redirect("/console", status_code=303)
        response.delete_cookie(COOKIE, path="/console")
        return response

    @get("/accounts")
    async def find(
        self, ctx: Ctx, request: Request[Any, Any, Any], q: FromQuery[str | None] = None
    ) -> Response[str] | Redirect:
        staff = await _staff(request)
        if staff is None:
            return Redirect("/console", status_code=303)
        if not q:
            return _html(pages.search(staff.name))
        query = q.strip()
        try:
            found = await accounts.find_by_reference(ctx, staff, query)
        except ApiError as error:
            return _html(pages.search(staff.name, query, _message(error.body())), error.status)
        return Redirect(f"/console/accounts/{quote(found.id)}", status_code=303)

    @get("/accounts/{account_id:str}")
    async def account(
        self, account_id: FromPath[str], ctx: Ctx, request: Request[Any, Any, Any], done: FromQuery[str | None] = None,
        ledger_after: FromQuery[str | None] = None,
    ) -> Response[str] | Redirect:  # fmt: skip
        staff = await _staff(request)
        if staff is None:
            return Redirect("/console", status_code=303)
        return await self._account(ctx, staff, account_id, ("ok", done) if done else None, ledger_after=ledger_after)

    async def _account(
        self, ctx: Context, staff: Principal, account_id: str, flash: tuple[str, str] | None, status: int = 200,
        ledger_after: str | None = None,
    ) -> Response[str]:  # fmt: skip
        try:
            found = await accounts.get_account(ctx, staff, account_id)
            ledger = await accounts.ledger(ctx, staff, account_id, pages.LEDGER_PAGE, ledger_after)
        except ApiError as error:
            return _html(pages.search(staff.name, account_id, _message(error.body())), error.status)
        content = pages.account(
            staff.name,
            found,
            await accounts.lots(ctx, staff, account_id, live=True),
            ledger,
            await purchases.list_purchases(ctx, staff, account_id, 10, None),
            await activity.list_generations(ctx, staff, account_id, limit=20, starting_after=None),
            await support.list_tickets(ctx, staff, status=None, account=account_id, limit=20, starting_after=None),
            flash,
        )
        return _html(content, status)

    async def _act(self, request: Request[Any, Any, Any], account_id: str, act: Any) -> Response[str] | Redirect:
        """Run one money form: signed in and same-origin, or refused; then back to the account with what
        happened (a refusal is shown on the page, with the API's own message)."""
        staff = await _staff(request)
        if staff is None:
            return _html(pages.login("Sign in again: your session has ended."), 401)
        if not _same_origin(request):
            return _html(pages.page("Refused", "<p>This form was sent from another site.</p>"), 403)
        ctx: Context = request.app.state.context
        try:
            outcome: Outcome = await act(ctx, staff)
        except ApiError as error:
            return await self._account(ctx, staff, account_id, ("err", _message(error.body())), error.status)
        kind, text = _flash(outcome)
        if kind == "err":
            return await self._account(ctx, staff, account_id, (kind, text), outcome.status)
        return Redirect(f"/console/accounts/{quote(account_id)}?done={quote(text)}", status_code=303)

    @post("/accounts/{account_id:str}/adjustments", status_code=303)
    async def adjust(self, account_id: FromPath[str], data: Form, request: Request[Any, Any, Any]) -> Any:
        async def act(ctx: Context, staff: Principal) -> Outcome:
            body = _decode(
                account_schemas.CreateAdjustment, {k: data.get(k, "") for k in ("amount", "reason", "category")}
            )
            return await accounts.move_money(
                ctx, staff, account_id, body, idempotency_key=_key(data),
                path=f"/v1/accounts/{account_id}/adjustments",
            )  # fmt: skip

        return await self._act(request, account_id, act)

    @post("/accounts/{account_id:str}/tickets", status_code=303)
    async def ticket(self, account_id: FromPath[str], data: Form, request: Request[Any, Any, Any]) -> Any:
        async def act(ctx: Context, staff: Principal) -> Outcome:
            payment = (data.get("payment_intent") or "").strip()
            field = "checkout_session" if payment.startswith("cs_") else "payment_intent"
            body = _decode(
                support_schemas.CreateTicket, {"account": account_id, field: payment, "note": data.get("note", "")}
            )
            return await support.open_ticket(
                ctx, staff, body, stripe_client=request.app.state.stripe, idempotency_key=_key(data),
                path="/v1/support_tickets",
            )  # fmt: skip

        return await self._act(request, account_id, act)

    @post("/purchases/{purchase_id:str}/refunds", status_code=303)
    async def refund(
        self, purchase_id: FromPath[str], data: Form, request: Request[Any, Any, Any], account: FromQuery[str]
    ) -> Any:
        async def act(ctx: Context, staff: Principal) -> Outcome:
            body = _decode(purchase_schemas.CreateRefund, {k: data.get(k, "") for k in ("amount", "reason")})
            return await purchases.refund_purchase(
                ctx, staff, purchase_id, body, stripe_client=request.app.state.stripe, idempotency_key=_key(data),
                path=f"/v1/purchases/{purchase_id}/refunds",
            )  # fmt: skip

        return await self._act(request, account, act)

    @get("/accounts/{account_id:str}/activity.csv")
    async def activity_csv(
        self, account_id: FromPath[str], ctx: Ctx, request: Request[Any, Any, Any]
    ) -> Stream | Redirect:
        staff = await _staff(request)
        if staff is None:
            return Redirect("/console", status_code=303)
        name, lines = await activity.export_generations(ctx, staff, account_id)
        return Stream(
            lines,
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{name}"', "Cache-Control": "no-store"},
        )


def _key(data: dict[str, str]) -> str:
    key = (data.get("idempotency_key") or "").strip()
    if not key:
        raise invalid("idempotency_key_required", "Reload the page and send the form again.")
    return key
