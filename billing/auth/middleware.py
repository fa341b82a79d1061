"""Bearer-token authentication and scope guards."""

from __future__ import annotations

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult

from billing.auth.principal import Principal
from billing.auth.tokens import TokenResolver
from billing.errors import AUTHENTICATION, PERMISSION, ApiError

# (The console checks its own cookie: billing/console/routes.py.)
PUBLIC_PATHS = ["^/healthz$", "^/readyz$", "^/schema", "^/v1/stripe/webhooks", "^/console"]


def bearer_secret(header: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` header value; None when it is not one."""
    scheme, _, secret = header.partition(" ")
    secret = secret.strip()
    return secret if scheme.lower() == "bearer" and secret else None


class BearerAuth(AbstractAuthenticationMiddleware):
    async def authenticate_request(self, connection: ASGIConnection) -> AuthenticationResult:
        secret = bearer_secret(connection.headers.get("authorization", ""))
        if secret is None:
            raise ApiError(
                401,
                AUTHENTICATION,
                "missing_token",
                "Send `Authorization: Bearer <token>` with every request.",
            )
        resolver: TokenResolver = connection.app.state.tokens
        principal = await resolver.resolve(secret)
        if principal is None:
            raise ApiError(401, AUTHENTICATION, "invalid_token", "The bearer token is unknown, revoked or expired.")
        return AuthenticationResult(user=principal, auth=secret)


def requires(*scopes: str):  # type: ignore[no-untyped-def]
    """A route guard: the caller needs one of `scopes` (admin always passes)."""

    # Async on purpose: Litestar runs a sync guard in a thread pool, a thread hop on every request.
    async def guard(connection: ASGIConnection, _: BaseRouteHandler) -> None:
        if connection.scope.get("method") == "OPTIONS":
            # Litestar's own answer to OPTIONS (the allowed methods, as a CORS preflight needs them):
            # authentication skips that method, so there is no caller to check, and nothing to protect.
            return
        principal: Principal = connection.user
        if not principal.has_any(*scopes):
            raise ApiError(
                403,
                PERMISSION,
                "insufficient_scope",
                f"This endpoint needs a token with one of the scopes: {', '.join(scopes)}.",
            )

    return guard
