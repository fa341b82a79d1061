"""`billing serve`'s HTTP protocol: uvicorn's httptools protocol, which serves the gateway's three spending
calls — a charge, a hold, the hold's capture — without an ASGI cycle.

Under uvicorn each request is a task running the ASGI app, fed through `receive` and answered through
two `send` messages whose headers are checked one by one; with the fast path around it, about a fifth of
the service's busy time under the benchmark (py-spy, docs/performance.md). Here a spending call whose body has
arrived in full goes straight to its batch's queue, and the batch's future writes the answer — the same
status, headers and body bytes as `GatewayFastPath` (billing/gateway/fast.py) — with no task of its own.

It serves only what it can serve whole, and hands everything else, untouched, to the ASGI app as plain
uvicorn would: other paths and methods, a body without Content-Length or over `MAX_BODY`,
`Expect: 100-continue`, a token not already in the resolver's cache (the ASGI path looks it up, and the
next request finds it there), a principal that may not spend, a body that does not decode, a charge that
names no payer. One request per connection is served at a time, in order, as uvicorn does: pipelined
requests wait in uvicorn's own queue. An answer is never written inside a parser callback, not even a
refusal known at once: like an ASGI task's, it comes from the event loop, once the bytes at hand are parsed.
While the transport has paused writing, an answer waits for it to resume, as uvicorn's `send` waits for
`drain`, and the next request waits behind it: a client that pipelines and never reads is not answered
into a buffer without bound.

A client that hangs up before its answer changes nothing about the call: its batch commits or not as it
goes, the answer is dropped, and a retry with the same id finds it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

from billing.gateway.fast import (
    MAX_BODY,
    GatewayFastPath,
    Outcome,
    Queue,
    answer,
    bearer,
    declared_length,
    decode,
    spending_call,
)

_HEAD = b"content-type: application/json\r\ncontent-length: %d\r\n"
_REPLAYED = b"idempotent-replayed: true\r\n"
_CLOSE = b"connection: close\r\n"


def fast_path_of(app: Any) -> GatewayFastPath | None:
    """The `GatewayFastPath` inside uvicorn's middleware around the app (None: this app has none)."""
    for _ in range(8):
        if isinstance(app, GatewayFastPath):
            return app
        app = getattr(app, "app", None)
    return None


class GatewayProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol; the gateway's spending calls answered from their batch's future."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fast = fast_path_of(self.app)
        # A spending call whose turn has come while its body is still arriving: served once it is whole.
        self._waiting: tuple[RequestResponseCycle, type[Any], Queue] | None = None
        # An answer due while the transport has paused writing: written once it resumes.
        self._held: tuple[RequestResponseCycle, Outcome | BaseException] | None = None

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        """Where uvicorn starts a request's ASGI task (at its headers, or its turn when pipelined)."""
        call = self._spending_call(cycle) if app is self.app else None
        if call is None:
            return super()._start_asgi_task(cycle, app)
        if cycle.more_body:
            self._waiting = (cycle, *call)
        else:
            self._serve(cycle, *call)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        waiting = self._waiting
        if waiting is not None and waiting[0] is self.cycle and not self.cycle.more_body:
            self._waiting = None
            self._serve(*waiting)

    def _spending_call(self, cycle: RequestResponseCycle) -> tuple[type[Any], Queue] | None:
        if self.fast is None or cycle.waiting_for_100_continue:
            return None
        scope: Any = cycle.scope
        call = spending_call(self.fast.app.state, scope["method"], scope["path"])
        if call is None or not 0 < declared_length(scope["headers"]) <= MAX_BODY:
            return None
        return call

    def _serve(self, cycle: RequestResponseCycle, kind: type[Any], queue: Queue) -> None:
        assert self.fast is not None
        headers = cycle.scope["headers"]
        secret = bearer(headers)  # type: ignore[arg-type]
        principal = self.fast.app.state.tokens.known(secret) if secret is not None else None
        data = decode(kind, headers, cycle.body, principal)  # type: ignore[arg-type]
        if data is None:
            return super()._start_asgi_task(cycle, self.app)  # the ASGI app answers, from the same body
        try:
            queued = queue(principal, data)  # type: ignore[arg-type]  # (decoded: a principal)
        except Exception as exc:
            # Answered after this callback, not inside it: a cycle completed mid-parse arms the idle timer
            # under the pipelined request still being parsed, and each queued refusal answered inside the
            # previous one's completion nests one level deeper.
            self.loop.call_soon(self._answer, cycle, exc)
            return
        if queued is None:
            return super()._start_asgi_task(cycle, self.app)
        queued.add_done_callback(lambda done: self._answer(cycle, _outcome(done)))

    def resume_writing(self) -> None:
        super().resume_writing()
        held, self._held = self._held, None
        if held is not None:  # (answered from the event loop, not inside the transport call that resumed it)
            self.loop.call_soon(self._answer, *held)

    def _answer(self, cycle: RequestResponseCycle, outcome: Outcome | BaseException) -> None:
        """Write the response the ASGI path would send (uvicorn's default headers first), then complete the
        cycle as uvicorn does: close unless kept alive, and start the next pipelined request or the idle
        timer. Held while the transport has paused writing."""
        if cycle.disconnected:
            return
        if self.flow.write_paused:
            self._held = (cycle, outcome)
            return
        self.fast.served += 1  # type: ignore[union-attr]  # (served only with a fast path)
        status, payload, replayed = answer(outcome)
        head = [STATUS_LINE[status]]
        head.extend(b"%s: %s\r\n" % header for header in self.server_state.default_headers)
        head.append(_HEAD % len(payload))
        if replayed:
            head.append(_REPLAYED)
        if not cycle.keep_alive:
            head.append(_CLOSE)
        head += (b"\r\n", payload)
        self.transport.write(b"".join(head))
        cycle.response_started = cycle.response_complete = True
        if not cycle.keep_alive:
            self.transport.close()
        self.on_response_complete()


def _outcome(done: asyncio.Future[Outcome]) -> Outcome | BaseException:
    if done.cancelled():
        return asyncio.CancelledError()
    return done.exception() or done.result()
