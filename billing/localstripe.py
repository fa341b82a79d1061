"""Run the local Stripe emulator (`localstripe`) bound to one address, for `billing dev` and the tests.

`localstripe`'s own command listens on every interface and keeps its state in a fixed file under /tmp
shared by every instance; this runs the same app on the address given, with its state in `--state`
(or in memory only).

It also honours `Idempotency-Key` on POST as Stripe does, which `localstripe` ignores: the first answer
to a key is kept for 24 hours and every later request with the key gets that answer again, nothing run
twice (a request with the key still in progress waits for it). The service relies on this to finish an
auto top-up whose run died after asking Stripe for the payment.

    python -m billing.localstripe --host 127.0.0.1 --port 8420 [--state .data/localstripe.pickle]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import pickle
import time
from pathlib import Path
from typing import Any

IDEMPOTENCY_WINDOW_S = 24 * 3600


def idempotency_middleware() -> Any:
    """An aiohttp middleware replaying the first answer to each POST's `Idempotency-Key`."""
    from aiohttp import web

    answers: dict[str, tuple[float, int, bytes, str]] = {}  # key -> (when, status, body, content type)
    locks: dict[str, asyncio.Lock] = {}

    @web.middleware
    async def idempotent(request: web.Request, handler: Any) -> web.StreamResponse:
        key = request.headers.get("Idempotency-Key")
        if request.method != "POST" or not key:
            return await handler(request)  # type: ignore[no-any-return]
        scoped = f"{request.headers.get('Authorization', '')} {key}"
        async with locks.setdefault(scoped, asyncio.Lock()):
            now = time.time()
            kept = answers.get(scoped)
            if kept is None or now - kept[0] > IDEMPOTENCY_WINDOW_S:
                response = await handler(request)
                body = response.body if isinstance(response, web.Response) and isinstance(response.body, bytes) else b""
                answers[scoped] = (now, response.status, body, response.content_type)
                return response  # type: ignore[no-any-return]
        headers = {"Idempotent-Replayed": "true"}
        return web.Response(status=kept[1], body=kept[2], content_type=kept[3], headers=headers)

    return idempotent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="billing.localstripe")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8420)
    parser.add_argument("--state", type=Path, help="keep the emulator's objects in this file across restarts")
    args = parser.parse_args(argv)

    from aiohttp import web
    from localstripe import resources, server

    state: Path | None = args.state

    def load(self: resources.Store) -> None:
        if state is not None and state.exists():
            with state.open("rb") as f:
                self.clear()
                self.update(pickle.load(f))

    def dump(self: resources.Store) -> None:
        if state is not None:
            state.parent.mkdir(parents=True, exist_ok=True)
            tmp = state.with_suffix(".tmp")
            with tmp.open("wb") as f:
                pickle.dump(dict(self), f, protocol=pickle.HIGHEST_PROTOCOL)
            tmp.replace(state)

    resources.Store.try_load_from_disk = load  # type: ignore[method-assign]
    resources.Store.dump_to_disk = dump  # type: ignore[method-assign]
    resources.store.try_load_from_disk()
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    server.app.middlewares.insert(0, idempotency_middleware())  # outermost: it keeps the final answer
    web.run_app(server.app, host=args.host, port=args.port, print=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
