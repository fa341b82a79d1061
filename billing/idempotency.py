"""Idempotency keys (SPEC §4): the same key with the same body replays the first outcome, success or
refusal; the same key with another body is a 409. The primary key on (scope, key) is what enforces it:
a concurrent duplicate blocks on the first writer's uncommitted row, then reads its committed outcome.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from billing.errors import IDEMPOTENCY, ApiError, from_refusal, invalid
from billing.ledger.outcomes import Refused

HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 255


@dataclass(frozen=True, slots=True)
class Outcome:
    status: int
    body: dict[str, Any]
    replayed: bool = False


def require_key(raw: str | None) -> str:
    if raw is None or not raw.strip():
        raise invalid("idempotency_key_required", f"This request moves money: send an `{HEADER}` header.")
    key = raw.strip()
    if len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise invalid("invalid_idempotency_key", f"`{HEADER}` must be 1-{MAX_KEY_LENGTH} printable characters.")
    return key


def fingerprint(method: str, path: str, canonical_body: bytes) -> str:
    return hashlib.sha256(method.encode() + b" " + path.encode() + b"\n" + canonical_body).hexdigest()


async def run_once(
    conn: AsyncConnection,
    *,
    scope: str,
    key: str,
    method: str,
    path: str,
    canonical_body: bytes,
    work: Callable[[AsyncConnection], Awaitable[tuple[int, dict[str, Any]]]],
) -> Outcome:
    """Run `work` at most once per (scope, key) inside the caller's transaction."""
    print_ = fingerprint(method, path, canonical_body)
    claimed = await conn.scalar(
        text(
            "INSERT INTO idempotency_keys (scope, key, fingerprint, method, path)"
            " VALUES (:scope, :key, :fp, :method, :path) ON CONFLICT DO NOTHING RETURNING true"
        ),
        {"scope": scope, "key": key, "fp": print_, "method": method, "path": path},
    )
    if not claimed:
        row = (
            await conn.execute(
                text("SELECT fingerprint, status_code, response FROM idempotency_keys WHERE scope = :s AND key = :k"),
                {"s": scope, "k": key},
            )
        ).one()
        if row.fingerprint != print_:
            raise ApiError(
                409,
                IDEMPOTENCY,
                "idempotency_key_reused",
                f"`{HEADER}` {key!r} was already used with a different request.",
            )
        return Outcome(row.status_code, row.response, replayed=True)
    try:
        async with conn.begin_nested():
            status, body = await work(conn)
    except Refused as refused:
        error = from_refusal(refused)
        if error.status == 400:
            # The request itself was invalid: nothing started, so nothing is remembered (as Stripe does).
            raise error from refused
        # A refusal by the ledger is an outcome too: stored, so the retry is refused the same way.
        status, body = error.status, error.body()
    await conn.execute(
        text(
            "UPDATE idempotency_keys SET status_code = :st, response = CAST(:body AS jsonb) WHERE scope = :s AND key = :k"
        ),
        {"st": status, "body": _json(body), "s": scope, "k": key},
    )
    return Outcome(status, body)


def _json(body: dict[str, Any]) -> str:
    return msgspec.json.encode(body).decode()
