"""Token secrets, their hashes, and resolving a bearer token to a Principal.

Secrets are 256 random bits, so a plain SHA-256 is the right hash (no salt or stretching needed: there
is nothing to guess). Lookups are cached per process for `token_cache_seconds`, which bounds how long a
revoked token keeps working on another process.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from billing.auth.principal import ADMIN, Principal

PREFIX = "bil_"


def new_secret() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class TokenResolver:
    def __init__(self, db: AsyncEngine, bootstrap_admin_token: str | None, cache_seconds: int) -> None:
        self._db = db
        self._bootstrap_hash = hash_secret(bootstrap_admin_token) if bootstrap_admin_token else None
        self._ttl = cache_seconds
        self._cache: dict[str, tuple[float, Principal | None]] = {}

    async def resolve(self, secret: str) -> Principal | None:
        digest = hash_secret(secret)
        if self._bootstrap_hash and hmac.compare_digest(digest, self._bootstrap_hash):
            return Principal(token_id="bootstrap", name="bootstrap-admin", scopes=frozenset({ADMIN}))
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit and hit[0] > now:
            return hit[1]
        async with self._db.connect() as conn:
            row = (
                await conn.execute(
                    text(
                        "SELECT public_id, name, scopes, account_id FROM api_tokens WHERE token_hash = :h"
                        " AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())"
                    ),
                    {"h": digest},
                )
            ).first()
        principal = Principal(row[0], row[1], frozenset(row[2]), row[3]) if row else None
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[digest] = (now + self._ttl, principal)
        return principal

    def forget(self) -> None:
        """Drop cached lookups (after a revocation in this process)."""
        self._cache.clear()
