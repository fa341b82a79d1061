"""The three calls the gateway makes on every model request — a charge, a hold, the hold's capture —
served in front of Litestar, without its routing, guards, dependency injection and response objects
(together about a third of the worker's CPU per charge, measured with py-spy under the benchmark).

Only the plain path is served here: a POST to exactly one of the three paths, with a bearer token that
resolves to a principal allowed to spend (the `gateway` scope, or admin), a JSON body that decodes to the
request's schema, and batching on. Then the request goes to the same batcher the Litestar route would
call, and its outcome — success, refusal, replay or `ApiError` — is written with the same status, body
bytes and headers. Anything else (another path or method, no or an unknown token, a token whose lookup
failed, a scope that may not spend, a body that does not decode, a charge that names no payer) is handed
to Litestar untouched, body included, and answered there: every error shape keeps one source. Under
`billing serve` most of these calls never get here: its HTTP protocol serves them from the same functions
a step earlier (billing/gateway/protocol.py).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from litestar import Litestar
from litestar.datastructures import State
from litestar.serialization import encode_json

from billing.auth.middleware import bearer_secret
from billing.auth.principal import GATEWAY, Principal
from billing.errors import ApiError, internal_error, unstorable_text
from billing.gateway import schemas as s
from billing.gateway.batch import ChargeBatcher
from billing.gateway.hold_batch import CaptureBatcher, HoldBatcher

log = logging.getLogger("billing")

Scope = dict[str, Any]
Headers = list[tuple[bytes, bytes]]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_CAPTURE = re.compile(r"/v1/holds/([^/]+)/capture")
_JSON = b"application/json"
# Larger bodies are no call the fast path can serve (every field of the three is bounded, far below this):
# they go to Litestar unread, or with what was read so far, and its own size limit answers them.
MAX_BODY = 64 * 1024

Outcome = tuple[int, Any, bool]  # status, body, replayed
# Queues a decoded call for its batch: the future of its outcome, or None for a call no batch takes.
Queue = Callable[[Principal, Any], "asyncio.Future[Outcome] | None"]


def spending_call(state: State, method: str, path: str) -> tuple[type[msgspec.Struct], Queue] | None:
    """The request schema and batch queue of a charge, hold or capture request; None for any other, and for
    all of them when batching is off."""
    if method != "POST":
        return None
    if path == "/v1/charges":
        charges: ChargeBatcher | None = state.charge_batcher
        return (s.CreateCharge, charges.queue_charge) if charges is not None else None
    if path == "/v1/holds":
        holds: HoldBatcher | None = state.hold_batcher
        return (s.CreateHold, holds.queue_hold) if holds is not None else None
    if (capture := _CAPTURE.fullmatch(path)) is not None:
        hold = capture[1]
        captures: CaptureBatcher | None = state.capture_batcher
        if captures is None:
            return None
        return s.Capture, lambda principal, data: captures.queue_capture(principal, hold, data)
    return None


def decode(kind: type[msgspec.Struct], headers: Headers, body: bytes | bytearray, principal: Principal | None) -> Any:
    """The call, when a principal that may spend sent a JSON body that decodes to `kind`; else None."""
    if principal is None or not principal.has_any(GATEWAY) or not _is_json(headers):
        return None
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.MsgspecError:
        return None


def answer(outcome: Outcome | BaseException) -> tuple[int, bytes, bool]:
    """Status, JSON body and whether it is a replay, for a batch's outcome or the error a call raised. Never
    raises: an outcome that does not encode is an unhandled error, a 500 as Litestar would answer it."""
    try:
        if isinstance(outcome, ApiError):
            return outcome.status, encode_json(outcome.body()), False
        if isinstance(outcome, BaseException):
            refused = unstorable_text(outcome) if isinstance(outcome, Exception) else None
            if refused is None:
                log.error("unhandled error", exc_info=outcome)
                refused = internal_error()
            return refused.status, encode_json(refused.body()), False
        status, out, replayed = outcome
        return status, encode_json(out), replayed
    except Exception as exc:  # raised from here: no answer at all from the protocol, uvicorn's plain text 500
        return answer(exc)


def bearer(headers: Headers) -> str | None:
    for name, value in headers:
        if name == b"authorization":
            return bearer_secret(value.decode("latin-1"))
    return None


class GatewayFastPath:
    """An ASGI app: the gateway's three spending calls served directly, everything else by `app`. (Under
    `billing serve`, `GatewayProtocol` serves the same calls a step earlier, and sends here what it cannot.)"""

    def __init__(self, app: Litestar) -> None:
        self.app = app
        self.served = 0  # requests answered here (the rest went to Litestar)

    def __getattr__(self, name: str) -> Any:  # `state`, `route_handler_method_map`, ... are the app's
        return getattr(self.app, name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        call = spending_call(self.app.state, scope["method"], scope["path"]) if scope["type"] == "http" else None
        if call is None or declared_length(scope["headers"]) > MAX_BODY:
            return await self.app(scope, receive, send)  # type: ignore[arg-type]
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before its request was whole: nothing was done
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
            if len(body) > MAX_BODY:  # no gateway call is this large: Litestar reads the rest, or refuses it
                return await self.app(scope, _replay(bytes(body), receive, more=True), send)  # type: ignore[arg-type]

        kind, queue = call
        secret = bearer(scope["headers"])
        try:
            principal = await self.app.state.tokens.resolve(secret) if secret is not None else None
        except Exception:  # (the database unreachable, say) Litestar looks it up again, and answers its failure
            return await self.app(scope, _replay(bytes(body), receive), send)  # type: ignore[arg-type]
        data = decode(kind, scope["headers"], body, principal)
        queued = None
        outcome: Outcome | BaseException
        try:
            if data is not None:
                queued = queue(principal, data)  # type: ignore[arg-type]  # (decoded: a principal)
        except Exception as exc:
            outcome = exc
        else:
            if queued is None:  # Litestar answers it, from the body read here
                return await self.app(scope, _replay(bytes(body), receive), send)  # type: ignore[arg-type]
            try:
                outcome = await queued
            except Exception as exc:
                outcome = exc
        self.served += 1
        status, payload, replayed = answer(outcome)
        headers = [(b"content-type", _JSON), (b"content-length", b"%d" % len(payload))]
        if replayed:
            headers.append((b"idempotent-replayed", b"true"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


def _is_json(headers: Headers) -> bool:
    for name, value in headers:
        if name == b"content-type":
            return bool(value.split(b";", 1)[0].strip().lower() == _JSON)
    return False


def declared_length(headers: Headers) -> int:
    """The Content-Length header's value; 0 when there is none (or it is not a number)."""
    for name, value in headers:
        if name == b"content-length":
            return int(value) if value.isdigit() else 0
    return 0


def _replay(body: bytes, receive: Receive, *, more: bool = False) -> Receive:
    """`receive` for an app that gets the request after (`more`: the start of) its body was read here."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": more}
        return await receive()

    return replayed
