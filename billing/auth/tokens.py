"""Token secrets, their hashes, and resolving a bearer token to a Principal.

Secrets are 256 random bits, so a plain SHA-256 is the right hash (no salt or stretching needed: there
is nothing to guess). Lookups are cached per process for `token_cache_seconds`, which bounds how long a
revoked token keeps working on another process.

A token in steady use never makes a request wait for the database: in the last `REFRESH_AHEAD` of its
entry's life, the first request to see it starts one lookup in the background and is answered from the
entry, still valid. (Before, every request arriving while an expired entry was being looked up again did
its own lookup and waited for it: under the gateway's load, a stall of all requests every few seconds.)
Concurrent misses for one token share one lookup. No entry is ever served past its expiry — nor a token
past its own `expires_at` (an entry lives no longer than the token has left) — and `forget` also discards
what lookups already in flight would bring back.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable
from typing import cast

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from billing.auth.principal import ADMIN, Principal

PREFIX = "bil_"
REFRESH_AHEAD = 1.0  # seconds before an entry expires when a request starts looking it up again

log = logging.getLogger("billing.auth")
_UNKNOWN = object()  # not answerable without a lookup


def new_secret() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class TokenResolver:
    def __init__(
        self,
        db: AsyncEngine,
        bootstrap_admin_token: str | None,
        cache_seconds: int,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._db = db
        self._monotonic = monotonic
        self._bootstrap_hash = hash_secret(bootstrap_admin_token) if bootstrap_admin_token else None
        self._ttl = cache_seconds
        self._ahead = min(REFRESH_AHEAD, cache_seconds / 2)
        self._cache: dict[str, tuple[float, Principal | None]] = {}
        self._lookups: dict[str, asyncio.Task[Principal | None]] = {}  # in flight, per token hash
        self._epoch = 0  # bumped by `forget`: lookups started before it do not fill the cache

    async def resolve(self, secret: str) -> Principal | None:
        digest = hash_secret(secret)
        known = self._known(digest)
        if known is not _UNKNOWN:
            return cast(Principal | None, known)
        lookup = self._lookups.get(digest) or self._look_up(digest)
        # (shielded: a caller that goes away does not cancel the lookup others wait for)
        return await asyncio.shield(lookup)

    def known(self, secret: str) -> Principal | None:
        """`resolve`'s answer when it needs no wait (the bootstrap token, or a live cache entry); else None."""
        known = self._known(hash_secret(secret))
        return None if known is _UNKNOWN else cast(Principal | None, known)

    def _known(self, digest: str) -> Principal | object | None:
        if self._bootstrap_hash and hmac.compare_digest(digest, self._bootstrap_hash):
            return Principal(token_id="bootstrap", name="bootstrap-admin", scopes=frozenset({ADMIN}))
        now = self._monotonic()
        hit = self._cache.get(digest)
        if hit is not None and hit[0] > now:
            if hit[0] - now <= self._ahead and digest not in self._lookups:
                self._look_up(digest)  # in the background: this request is answered from the entry
            return hit[1]
        return _UNKNOWN

    def _look_up(self, digest: str) -> asyncio.Task[Principal | None]:
        task = asyncio.get_running_loop().create_task(self._fetch(digest, self._epoch))
        self._lookups[digest] = task
        task.add_done_callback(lambda t: self._done(digest, t))
        return task

    def _done(self, digest: str, task: asyncio.Task[Principal | None]) -> None:
        if self._lookups.get(digest) is task:
            del self._lookups[digest]
        if not task.cancelled() and task.exception() is not None:  # retrieved here; waiters get it too
            log.warning("looking up a token failed: %r", task.exception())

    async def _fetch(self, digest: str, epoch: int) -> Principal | None:
        read_at = self._monotonic()  # the entry's life counts from before the read
        async with self._db.connect() as conn:
            row = (
                await conn.execute(
                    text(
                        "SELECT public_id, name, scopes, account_id,"
                        " EXTRACT(EPOCH FROM expires_at - now()) AS expires_in FROM api_tokens WHERE token_hash = :h"
                        " AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())"
                    ),
                    {"h": digest},
                )
            ).first()
        principal = Principal(row[0], row[1], frozenset(row[2]), row[3]) if row else None
        life = float(self._ttl)
        if row is not None and row[4] is not None:
            life = min(life, float(row[4]))  # a token that expires sooner is not served past its expiry
        if epoch == self._epoch:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[digest] = (read_at + life, principal)
        return principal

    def forget(self) -> None:
        """Drop cached lookups (after a revocation in this process), and whatever lookups in flight bring."""
        self._epoch += 1
        self._cache.clear()
        self._lookups.clear()
