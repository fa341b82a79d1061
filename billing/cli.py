"""The `billing` command line (SPEC §8).

    billing migrate [--revision REV]         upgrade the schema (Alembic)
    billing serve [--host H] [--port P] [--workers N]
    billing dev [--host H] [--port P]        everything at once, on embedded defaults
    billing bench [--quick] [--workers N] [--duration S]   the benchmark (README, "Benchmark")
    billing worker [--threads N]             run background jobs (Dramatiq on Redis)
    billing scheduler                        enqueue the periodic jobs (run exactly one)
    billing expire [--dry-run [--as-of T]]   expire credits (breakage) and holds now, or say what would
    billing reconcile [--window-hours 72]    credit Stripe's paid payments the ledger is missing; report the reverse
    billing byok-reconcile [--month 2026-11] [--close]   correct BYOK fees of a month; close an ended one
    billing verify                           check the ledger's invariants; non-zero exit on a problem
    billing dead-letters [--replay]          list (or send again) jobs that failed every retry

A subcommand is a function `cmd_<name>(args) -> int` plus a few lines in `build_parser()`.
`billing dev` starts its processes from `dev_children()`: add a `Child` there for a new one.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, TypeVar

from billing.settings import Settings

if TYPE_CHECKING:
    from billing.context import Context

APP_FACTORY = "billing.app:create_asgi"
T = TypeVar("T")


def log(message: str) -> None:
    print(f"billing: {message}", file=sys.stderr, flush=True)


def database_url(settings: Settings) -> str:
    try:
        return settings.require_database_url()
    except RuntimeError as exc:
        sys.exit(f"billing: {exc}")


# --- migrate ---------------------------------------------------------------------------------------


def cmd_migrate(args: argparse.Namespace) -> int:
    from alembic.util import CommandError

    from billing.db.migrate import upgrade

    try:
        upgrade(database_url(Settings.from_env()), args.revision)
    except CommandError as e:  # an unknown or ambiguous revision: Alembic's own words, not a traceback
        sys.exit(f"billing: {e}")
    log(f"database migrated to {args.revision}")
    return 0


# --- serve -----------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    settings = Settings.from_env()
    database_url(settings)
    level = settings.log_level.lower()
    # uvicorn with httptools and uvloop: HTTP is parsed in the event loop's own thread. Measured against
    # granian (HTTP in a Rust thread, handing each request over to the Python thread) on the 2-core
    # benchmark box, where the service shares the cores with PostgreSQL: 10-25% more charges per second
    # and lower latency at the same offered rate (docs/performance.md). Its httptools protocol, extended to
    # answer the gateway's spending calls without an ASGI task each (billing/gateway/protocol.py).
    uvicorn.run(
        APP_FACTORY,
        factory=True,
        host=args.host or settings.host,
        port=args.port or settings.port,
        workers=args.workers or settings.server_workers,
        loop="uvloop" if _has_uvloop() else "asyncio",
        http="billing.gateway.protocol:GatewayProtocol",
        log_level=level if level in ("critical", "error", "warning", "info", "debug") else "info",
        access_log=False,
        server_header=False,
    )
    return 0


def _has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


# --- dev -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Child:
    """A process `billing dev` runs: started in order, each awaited on `ready_url` (when given)
    before the next starts, then `on_ready` (when given); stopped in reverse order."""

    name: str
    argv: list[str]
    ready_url: str | None = None
    on_ready: Callable[[], None] | None = None


def billing_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "billing.cli", *args]


def dev_children(settings: Settings, base_url: str) -> list[Child]:
    # Worker and scheduler after the API: by then the schema is migrated and the API answers.
    children = []
    if uses_local_stripe(settings):
        children.append(localstripe_child(settings, base_url))
    children.append(Child("api", billing_command("serve"), ready_url=f"{base_url}/readyz"))
    children.append(Child("worker", billing_command("worker")))
    children.append(Child("scheduler", billing_command("scheduler")))
    return children


# --- the local Stripe emulator ---------------------------------------------------------------------


def uses_local_stripe(settings: Settings) -> bool:
    from billing.stripe_client import LOCAL_API_KEY

    return settings.stripe_api_key == LOCAL_API_KEY and bool(settings.stripe_api_base)


def ensure_local_stripe(settings: Settings) -> Settings:
    """With no STRIPE_API_KEY, point everything started from here at a local emulator on 127.0.0.1 (SPEC §8).
    Its port is BILLING_LOCALSTRIPE_PORT (default 8420), or a free one when that is taken."""
    if settings.stripe_api_key:
        return settings
    from billing.stripe_client import LOCAL_API_KEY

    port = settings.localstripe_port
    if port == 0 or _listening("127.0.0.1", port):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    os.environ["STRIPE_API_KEY"] = LOCAL_API_KEY
    os.environ["STRIPE_API_BASE"] = f"http://127.0.0.1:{port}"
    os.environ["BILLING_LOCALSTRIPE_PORT"] = str(port)
    if not settings.stripe_webhook_secret:
        os.environ["STRIPE_WEBHOOK_SECRET"] = "whsec_" + secrets.token_hex(24)
    return Settings.from_env()


def localstripe_child(settings: Settings, base_url: str) -> Child:
    """localstripe on 127.0.0.1, its objects kept in the data folder, sending its signed webhooks to us."""
    from billing.stripe_client import register_local_webhook

    api_base = settings.stripe_api_base or ""
    secret = settings.stripe_webhook_secret or ""

    def register() -> None:
        try:
            register_local_webhook(api_base, "billing", f"{base_url}/v1/stripe/webhooks", secret)
        except (OSError, RuntimeError) as exc:
            raise DevError(f"could not register the webhook with localstripe: {exc}") from exc

    argv = [sys.executable, "-m", "billing.localstripe", "--host", "127.0.0.1"]
    argv += ["--port", str(settings.localstripe_port), "--state", str(settings.data_dir / "localstripe.pickle")]
    return Child("localstripe", argv, ready_url=f"{api_base}/js.stripe.com/v3/", on_ready=register)


class DevError(Exception):
    """An expected failure of `billing dev`, reported without a traceback."""


class Stop(Exception):
    """SIGTERM, handled like Ctrl-C."""


def _raise_stop(signum: int, frame: object) -> None:
    raise Stop


def _local_base_url(settings: Settings) -> str:
    host = settings.host
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.port}"


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host if host not in ("0.0.0.0", "", "::") else "127.0.0.1", port), 0.5):
            return True
    except OSError:
        return False


def wait_ready(child: Child, process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    assert child.ready_url is not None
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise DevError(f"{child.name} exited with code {process.returncode} before it was ready")
        try:
            with opener.open(child.ready_url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise DevError(f"{child.name} not ready after {timeout:.0f}s: {child.ready_url}")
        time.sleep(0.2)


def stop_children(running: list[tuple[Child, subprocess.Popen[bytes]]], timeout: float = 10.0) -> None:
    for child, process in reversed(running):
        if process.poll() is None:
            log(f"stopping {child.name}")
            process.terminate()
    for child, process in reversed(running):
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            log(f"{child.name} did not stop within {timeout:.0f}s, killing it")
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _without_password(url: str | None) -> str | None:
    if not url:
        return url
    parts = urllib.parse.urlsplit(url)
    if not parts.password:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def print_banner(settings: Settings, base_url: str) -> None:
    token = settings.admin_token
    stripe_line = (
        f"local emulator (localstripe) at {settings.stripe_api_base}; test card 4242 4242 4242 4242"
        if uses_local_stripe(settings)
        else (settings.stripe_api_base or "api.stripe.com")
    )
    print(
        f"""
  billing is running
    API       {base_url}/v1
    OpenAPI   {base_url}/schema
    Database  {_without_password(settings.database_url)}
    Redis     {_without_password(settings.redis_url)}
    Stripe    {stripe_line}
    Admin token (scope admin): {token}

  Try it:
    export TOKEN={token}
    curl -H "Authorization: Bearer $TOKEN" -H "Content-Type: application/json" \\
      {base_url}/v1/accounts -d '{{"external_id":"user_1","kind":"user"}}'

  Ctrl-C stops everything.
""",
        flush=True,
    )


def cmd_dev(args: argparse.Namespace) -> int:
    from billing.db.migrate import upgrade
    from billing.embedded import ensure_env

    if args.host:
        os.environ["BILLING_HOST"] = args.host
    if args.port:
        os.environ["BILLING_PORT"] = str(args.port)
    if not os.environ.get("BILLING_ADMIN_TOKEN"):
        os.environ["BILLING_ADMIN_TOKEN"] = secrets.token_urlsafe(32)

    signal.signal(signal.SIGTERM, _raise_stop)
    running: list[tuple[Child, subprocess.Popen[bytes]]] = []
    try:
        settings = Settings.from_env()
        if not (settings.database_url and settings.redis_url):
            log(f"starting embedded PostgreSQL/Redis in {settings.data_dir.resolve()}")
        settings = ensure_env(settings)
        settings = ensure_local_stripe(settings)
        log("migrating the database")
        upgrade(database_url(settings))
        base_url = _local_base_url(settings)
        if _listening(settings.host, settings.port):
            raise DevError(f"port {settings.port} is already in use (another `billing dev`?); try --port")
        for child in dev_children(settings, base_url):
            log(f"starting {child.name}")
            # Own process group: Ctrl-C reaches only us, and we stop the children in order.
            process = subprocess.Popen(child.argv, env=os.environ.copy(), start_new_session=True)
            running.append((child, process))
            if child.ready_url:
                wait_ready(child, process)
            if child.on_ready:
                child.on_ready()
        print_banner(settings, base_url)
        while True:
            for child, process in running:
                if process.poll() is not None:
                    log(f"{child.name} exited with code {process.returncode}; stopping")
                    return process.returncode or 1
            time.sleep(0.5)
    except (KeyboardInterrupt, Stop):
        log("shutting down")
        return 0
    except DevError as exc:
        log(str(exc))
        return 1
    finally:
        # A second Ctrl-C / SIGTERM must not cut the cleanup short (it is bounded: terminate, then kill).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop_children(running)


# --- background work (workers/, billing/jobs/) -----------------------------------------------------


def _setup_logging(settings: Settings) -> None:
    import logging

    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _require_redis(settings: Settings) -> None:
    if not settings.redis_url:
        sys.exit("billing: REDIS_URL is not set. Run `billing dev` (embedded Redis) or set REDIS_URL.")


def cmd_worker(args: argparse.Namespace) -> int:
    from workers.worker import run

    settings = Settings.from_env()
    database_url(settings)
    _require_redis(settings)
    _setup_logging(settings)
    return run(settings, args.threads)


def cmd_scheduler(args: argparse.Namespace) -> int:
    import threading

    from workers.scheduler import run

    settings = Settings.from_env()
    _require_redis(settings)
    _setup_logging(settings)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    run(settings, stop)
    return 0


def _run_job(job: Callable[[Context], Awaitable[T]]) -> T:
    """Run one job's service function on a small engine of its own, as the actors do."""
    import asyncio
    from dataclasses import replace

    from billing.context import Context
    from billing.db import pipeline
    from billing.db.engine import make_engine
    from billing.db.journal import Journal

    settings = Settings.from_env()
    database_url(settings)
    _setup_logging(settings)

    async def main() -> T:
        engine = make_engine(replace(settings, db_pool_size=2, db_max_overflow=0))
        try:
            return await job(Context(db=engine, journal=Journal(), settings=settings))
        finally:
            await pipeline.dispose(engine)

    return asyncio.run(main())


def _instant(raw: str) -> datetime:
    """An instant with its UTC offset, in UTC, in the years 2000 to 9000 like the API's (`timestamp_field`):
    one a job can compute with (a year-9999 instant west of UTC is past `datetime.max` in UTC)."""
    from billing.schemas import EARLIEST_TIMESTAMP, LATEST_TIMESTAMP

    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 instant: {raw!r}") from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"give a time zone, e.g. {raw}Z")
    if not EARLIEST_TIMESTAMP <= value < LATEST_TIMESTAMP:
        raise argparse.ArgumentTypeError(f"not in the years 2000 to 9000 (UTC): {raw!r}")
    return value.astimezone(UTC)


def _bounded(low: int, high: int) -> Callable[[str], int]:
    """An integer argument from `low` to `high`: a count a job can turn into a time span and subtract."""

    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {raw!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"not from {low} to {high:,}: {raw!r}")
        return value

    return parse


MAX_WINDOW_HOURS = 10 * 366 * 24  # ten years of Stripe's payments
MAX_GRACE_SECONDS = 7 * 24 * 3600


def cmd_expire(args: argparse.Namespace) -> int:
    from billing import clock
    from billing.jobs.expiry import ExpiryRun, expire_credits
    from billing.jobs.holds import count_due_holds, expire_holds
    from billing.ledger.money import format_money

    if args.as_of and not args.dry_run:
        sys.exit("billing: --as-of only with --dry-run (a real run expires what has expired by now)")
    now = args.as_of or clock.now()

    async def job(ctx: Context) -> tuple[ExpiryRun, int]:
        grace = timedelta(seconds=ctx.settings.hold_expiry_grace)
        credits = await expire_credits(ctx, now=now, dry_run=args.dry_run)
        if args.dry_run:
            return credits, await count_due_holds(ctx, now=now, grace=grace)
        return credits, await expire_holds(ctx, now=now, grace=grace)

    credits, holds = _run_job(job)
    verb = "would expire" if args.dry_run else "expired"
    for account in credits.accounts:
        for lot in account.lots:
            entry = f"  {account.entry}" if account.entry else ""
            print(
                f"{account.account}  {lot.lot}  {format_money(lot.amount)} USD  "
                f"(expired {lot.expires_at.isoformat()}){entry}"
            )
    print(
        f"{verb} as of {now.isoformat()}: {format_money(credits.total)} USD in {credits.lots} lot(s) on "
        f"{len(credits.accounts)} account(s) to breakage; {holds} hold(s) "
        f"{'would be ' if args.dry_run else ''}marked expired"
    )
    return 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    from billing.reconcile.service import Run, reconcile_payments, summary
    from billing.stripe_client import make_stripe

    settings = Settings.from_env()
    sdk = make_stripe(settings)
    if sdk is None:
        sys.exit("billing: STRIPE_API_KEY is not set: there is no Stripe to reconcile with")
    grace = None if args.grace_seconds is None else timedelta(seconds=args.grace_seconds)

    async def job(ctx: Context) -> Run:
        return await reconcile_payments(ctx, sdk, window=timedelta(hours=args.window_hours), grace=grace, source="cli")

    run = _run_job(job)
    for finding in run.findings:
        print(f"{finding.kind}  {finding.payment_intent}  {finding.detail}")
    print(summary(run))
    return 0


def _month(raw: str) -> date:
    """A UTC month (YYYY-MM) in the years 2000 to 9000, like an instant (`_instant`): its end is a date too."""
    from billing.schemas import EARLIEST_TIMESTAMP, LATEST_TIMESTAMP

    try:
        month = datetime.strptime(raw, "%Y-%m").date()
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a month (YYYY-MM): {raw!r}") from None
    if not EARLIEST_TIMESTAMP.year <= month.year < LATEST_TIMESTAMP.year:
        raise argparse.ArgumentTypeError(f"not in the years 2000 to 9000: {raw!r}")
    return month


def cmd_byok_reconcile(args: argparse.Namespace) -> int:
    from billing import clock
    from billing.jobs.byok import ByokRun, reconcile_byok, summary
    from billing.ledger.money import format_money

    now = clock.now()
    month = args.month or now.date().replace(day=1)

    async def job(ctx: Context) -> ByokRun:
        return await reconcile_byok(ctx, month, close=args.close, now=now)

    try:
        run = _run_job(job)
    except ValueError as e:
        sys.exit(f"billing: {e}")
    for c in run.corrections:
        log(
            f"{c.account}: {format_money(c.amount)} USD ({c.entry}; expected {format_money(c.expected)},"
            f" charged {format_money(c.charged)})"
        )
    log(summary(run))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from billing.jobs.verify import Verification, metrics_text, verify

    result: Verification = _run_job(verify)
    sys.stdout.write(metrics_text(result))
    for check, ids in result.problems.items():
        log(f"ledger invariant broken: {check}: {ids}")
    return 0 if result.ok else 1


def cmd_dead_letters(args: argparse.Namespace) -> int:
    from workers.broker import setup_broker
    from workers.dead_letters import dead_letters, replay

    settings = Settings.from_env()
    _require_redis(settings)
    broker = setup_broker(settings)
    letters = [d for d in dead_letters(broker) if not args.message_id or d.message.message_id in args.message_id]
    for letter in letters:
        print(letter.describe())
        if args.replay:
            print("  replayed" if replay(broker, letter) else "  already taken by someone else")
    log(f"{len(letters)} dead letter(s){' replayed' if args.replay else ''}")
    return 0


# --- bench -----------------------------------------------------------------------------------------


def cmd_bench(args: argparse.Namespace) -> int:
    from billing.bench.run import main as bench

    return bench(args)


# --- the command line ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="billing", description="Credits ledger of an LLM API gateway.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("migrate", help="upgrade the database schema (Alembic)")
    p.add_argument("--revision", default="head", help="target revision (default: head)")
    p.set_defaults(func=cmd_migrate)

    p = commands.add_parser("serve", help="run the HTTP API (uvicorn, ASGI)")
    p.add_argument("--host", help="bind address (default: BILLING_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default: BILLING_PORT or 8000)")
    p.add_argument("--workers", type=int, help="processes (default: BILLING_SERVER_WORKERS or 1)")
    p.set_defaults(func=cmd_serve)

    p = commands.add_parser("dev", help="everything at once, on embedded PostgreSQL/Redis when unset")
    p.add_argument("--host", help="API bind address (default: BILLING_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, help="API port (default: BILLING_PORT or 8000)")
    p.set_defaults(func=cmd_dev)

    p = commands.add_parser("bench", help="the benchmark: the service under load next to pgbench (README)")
    p.add_argument("--quick", action="store_true", help="short runs: the whole benchmark in under 90 s")
    p.add_argument("--workers", type=int, help="API processes (default: BILLING_SERVER_WORKERS or 1)")
    p.add_argument("--duration", type=float, help="measured seconds per run (default: 20; --quick: 3)")
    p.set_defaults(func=cmd_bench)

    p = commands.add_parser("worker", help="run background jobs: Dramatiq workers on the Redis broker")
    p.add_argument("--threads", type=int, help="worker threads (default: BILLING_WORKER_THREADS or 4)")
    p.set_defaults(func=cmd_worker)

    p = commands.add_parser("scheduler", help="enqueue the periodic jobs on their intervals (run exactly one)")
    p.set_defaults(func=cmd_scheduler)

    p = commands.add_parser("expire", help="expire credits past their expiry (breakage) and holds, now")
    p.add_argument("--dry-run", action="store_true", help="say what would expire; change nothing")
    p.add_argument("--as-of", type=_instant, help="with --dry-run: as of this instant, e.g. 2027-12-01T00:00:00Z")
    p.set_defaults(func=cmd_expire)

    p = commands.add_parser("reconcile", help="credit Stripe's succeeded payments missing from the ledger, now")
    p.add_argument(
        "--window-hours",
        type=_bounded(1, MAX_WINDOW_HOURS),
        default=72,
        help="how far back to walk Stripe's payments (default 72)",
    )
    p.add_argument(
        "--grace-seconds",
        type=_bounded(0, MAX_GRACE_SECONDS),
        help="leave payments this young to their webhooks (default BILLING_RECONCILE_GRACE)",
    )
    p.set_defaults(func=cmd_reconcile)

    p = commands.add_parser("byok-reconcile", help="recompute a month's BYOK fees and correct wrong ones, now")
    p.add_argument("--month", type=_month, help="the UTC month, e.g. 2026-11 (default: the current one)")
    p.add_argument("--close", action="store_true", help="then close the month (it must have ended); once")
    p.set_defaults(func=cmd_byok_reconcile)

    p = commands.add_parser("verify", help="check the ledger's invariants (Prometheus text; exit 1 on a problem)")
    p.set_defaults(func=cmd_verify)

    p = commands.add_parser("dead-letters", help="list jobs that failed every retry; --replay sends them again")
    p.add_argument("--replay", action="store_true", help="send them again, with a fresh retry budget")
    p.add_argument("--message-id", action="append", help="only this message (repeatable)")
    p.set_defaults(func=cmd_dead_letters)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
