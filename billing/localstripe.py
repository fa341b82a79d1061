"""Run the local Stripe emulator (`localstripe`) bound to one address, for `billing dev` and the tests.

`localstripe`'s own command listens on every interface and keeps its state in a fixed file under /tmp
shared by every instance; this runs the same app on the address given, with its state in `--state`
(or in memory only).

    python -m billing.localstripe --host 127.0.0.1 --port 8420 [--state .data/localstripe.pickle]
"""

from __future__ import annotations

import argparse
import logging
import pickle
from pathlib import Path


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
    web.run_app(server.app, host=args.host, port=args.port, print=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
