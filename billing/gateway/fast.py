"""The three calls the gateway makes on every model request — a charge, a hold, the hold's capture —
served in front of Litestar, without its routing, guards, dependency injection and response objects
(together about a third of the worker's CPU per charge, measured with py-spy under the benchmark).

Only the plain path is served here: a POST to exactly one of the three paths, with a bearer token that
resolves to a principal allowed to spend (the `gateway` scope, or admin), a JSON body that decodes to the
request's schema, and batching on. Then the request goes to the same batcher the Litestar route would
call, and its outcome — success, refusal, replay or `ApiError` — is written with the same status, body
bytes and headers. Anything else (another path or method, no or an unknown token, a scope that may not
spend, a body that does not decode) is handed to Litestar untouched, body included, and answered there:
every error shape keeps one source.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from litestar import Litestar
from litestar.serialization import encode_json

from billing.auth.middleware import bearer_secret
from billing.auth.principal import GATEWAY, Principal
from billing.errors import ApiError, internal_error, unstorable_text
from billing.gateway import schemas as s

log = logging.getLogger("billing")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_CAPTURE = re.compile(r"/v1/holds/([^/]+)/capture")
_JSON = b"application/json"
# Larger bodies are no call the fast path can serve (every field of the three is bounded, far below this):
# they go to Litestar unread, or with what was read so far, and its own size limit answers them.
MAX_BODY = 64 * 1024


class GatewayFastPath:
    """An ASGI app: the gateway's three spending calls served directly, everything else by `app`."""

    def __init__(self, app: Litestar) -> None:
        self.app = app
        self.served = 0  # requests answered here (the rest went to Litestar)

    def __getattr__(self, name: str) -> Any:  # `state`, `route_handler_method_map`, ... are the app's
        return getattr(self.app, name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)  # type: ignore[arg-type]
        state = self.app.state
        path: str = scope["path"]
        capture = None
        if path == "/v1/charges":
            kind: type[msgspec.Struct] = s.CreateCharge
            batcher = state.charge_batcher
        elif path == "/v1/holds":
            kind, batcher = s.CreateHold, state.hold_batcher
        elif (capture := _CAPTURE.fullmatch(path)) is not None:
            kind, batcher = s.Capture, state.capture_batcher
        else:
            batcher = None
        if batcher is None:
            return await self.app(scope, receive, send)  # type: ignore[arg-type]

        if _declared_length(scope) > MAX_BODY:
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

        principal = await self._principal(scope)
        data = None
        if principal is not None and principal.has_any(GATEWAY) and _is_json(scope):
            try:
                data = msgspec.json.decode(body, type=kind)
            except msgspec.MsgspecError:
                data = None
        if data is None:
            return await self.app(scope, _replay(bytes(body), receive), send)  # type: ignore[arg-type]

        assert principal is not None
        try:
            if capture is not None:
                status, out, replayed = await batcher.capture(principal, capture[1], data)
            elif kind is s.CreateHold:
                status, out, replayed = await batcher.hold(principal, data)
            else:
                status, out, replayed = await batcher.charge(principal, data)
        except ApiError as error:
            status, out, replayed = error.status, error.body(), False
        except Exception as exc:
            refused = unstorable_text(exc)
            if refused is None:
                log.exception("unhandled error")
                refused = internal_error()
            status, out, replayed = refused.status, refused.body(), False
        self.served += 1
        payload = encode_json(out)
        headers = [(b"content-type", _JSON), (b"content-length", b"%d" % len(payload))]
        if replayed:
            headers.append((b"idempotent-replayed", b"true"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    async def _principal(self, scope: Scope) -> Principal | None:
        """The bearer token's principal, the way BearerAuth finds it; None when there is none."""
        for name, value in scope["headers"]:
            if name == b"authorization":
                secret = bearer_secret(value.decode("latin-1"))
                if secret is None:
                    return None
                principal: Principal | None = await self.app.state.tokens.resolve(secret)
                return principal
        return None


def _is_json(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"content-type":
            return bool(value.split(b";", 1)[0].strip().lower() == _JSON)
    return False


def _declared_length(scope: Scope) -> int:
    for name, value in scope["headers"]:
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
