"""Who is calling, and what they may touch."""

from __future__ import annotations

from dataclasses import dataclass

ADMIN = "admin"
SUPPORT = "support"
GATEWAY = "gateway"
ACCOUNT = "account"
SCOPES = (ADMIN, SUPPORT, GATEWAY, ACCOUNT)
STAFF = (ADMIN, SUPPORT)


@dataclass(frozen=True, slots=True)
class Principal:
    token_id: str
    name: str
    scopes: frozenset[str]
    account_id: int | None = None  # set exactly for account-scoped tokens

    def has_any(self, *scopes: str) -> bool:
        """Admin may do everything; otherwise one of `scopes` is needed."""
        return ADMIN in self.scopes or bool(self.scopes.intersection(scopes))

    def may_see(self, account_id: int) -> bool:
        """An account-scoped token sees only its own account; platform scopes see every account."""
        if self.account_id is not None:
            return self.account_id == account_id
        return self.has_any(SUPPORT, GATEWAY)

    @property
    def is_staff(self) -> bool:
        """Support or admin: what such a token does to an account is audit-logged (SPEC §7)."""
        return bool(self.scopes.intersection(STAFF))

    @property
    def actor(self) -> str:
        return f"{self.name} ({self.token_id})"

    @property
    def idempotency_scope(self) -> str:
        """Idempotency keys are unique per tenant: one account, or the platform's own callers."""
        return f"account:{self.account_id}" if self.account_id is not None else "platform"
