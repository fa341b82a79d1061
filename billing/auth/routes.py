"""Minting, listing and revoking API tokens (admin only; audit-logged)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery, JSONBody
from sqlalchemy import text

from billing import clock
from billing.auth.audit import audit
from billing.auth.middleware import requires
from billing.auth.principal import ADMIN, Principal
from billing.auth.tokens import TokenResolver, hash_secret, new_secret
from billing.context import Context
from billing.errors import invalid, not_found
from billing.http import error_responses
from billing.schemas import ListOf, checked_reason, timestamp_field

Scope = Literal["admin", "support", "gateway", "account"]


class CreateToken(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    scopes: Annotated[list[Scope], msgspec.Meta(min_length=1)]
    account: str | None = None
    expires_at: datetime | None = None


class Token(msgspec.Struct, omit_defaults=True):
    id: str
    name: str
    scopes: list[str]
    account: str | None
    created_by: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    secret: str | None = None  # shown once, when minted
    object: str = "api_token"


COLUMNS = (
    "t.public_id, t.name, t.scopes, a.public_id AS account, t.created_by, t.created_at, t.expires_at, t.revoked_at"
)


def _token(row, secret: str | None = None) -> Token:  # type: ignore[no-untyped-def]
    return Token(
        id=row.public_id,
        name=row.name,
        scopes=list(row.scopes),
        account=row.account,
        created_by=row.created_by,
        created_at=row.created_at,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
        secret=secret,
    )


class TokensController(Controller):
    path = "/v1/tokens"
    tags = ["tokens"]
    guards = [requires(ADMIN)]

    @post(
        "/",
        summary="Mint a token (the secret is shown once)",
        responses=error_responses(400, 401, 403, 404),
        status_code=201,
    )
    async def create_token(
        self, data: JSONBody[CreateToken], ctx: NamedDependency[Context], request: Request
    ) -> Response[Token]:
        principal: Principal = request.user
        scopes = sorted(set(data.scopes))
        if ("account" in scopes) != (data.account is not None):
            raise invalid(
                "account_scope_mismatch",
                "A token has the `account` scope exactly when it names an `account`.",
                "account",
            )
        if "account" in scopes and len(scopes) > 1:
            raise invalid("account_scope_alone", "An account-scoped token carries no other scope.", "scopes")
        if data.expires_at is not None and (data.expires_at.tzinfo is None or data.expires_at <= clock.now()):
            raise invalid("invalid_expiry", "`expires_at` must be a future time with a UTC offset.", "expires_at")
        expires_at = timestamp_field(data.expires_at, "expires_at")
        secret = new_secret()
        async with ctx.db.begin() as conn:
            account_id = None
            if data.account is not None:
                account_id = await conn.scalar(
                    text("SELECT id FROM accounts WHERE public_id = :p AND kind <> 'platform'"),
                    {"p": data.account},
                )
                if account_id is None:
                    raise not_found("account", data.account)
            public = await conn.scalar(text("SELECT 'tok_' || nextval(pg_get_serial_sequence('api_tokens', 'id'))"))
            await conn.execute(
                text(
                    "INSERT INTO api_tokens (public_id, token_hash, name, scopes, account_id, created_by, expires_at)"
                    " VALUES (:p, :h, :n, :s, :a, :by, :exp)"
                ),
                {
                    "p": public,
                    "h": hash_secret(secret),
                    "n": data.name,
                    "s": scopes,
                    "a": account_id,
                    "by": principal.actor,
                    "exp": expires_at,
                },
            )
            await audit(
                conn, principal, "token.create", account_id=account_id, details={"token": public, "scopes": scopes}
            )
            row = (
                await conn.execute(
                    text(
                        f"SELECT {COLUMNS} FROM api_tokens t LEFT JOIN accounts a ON a.id = t.account_id WHERE t.public_id = :p"
                    ),
                    {"p": public},
                )
            ).one()
        return Response(_token(row, secret), status_code=201)

    @get("/", summary="List tokens", responses=error_responses(401, 403))
    async def list_tokens(self, ctx: NamedDependency[Context]) -> ListOf[Token]:
        async with ctx.db.connect() as conn:
            rows = await conn.execute(
                text(
                    f"SELECT {COLUMNS} FROM api_tokens t LEFT JOIN accounts a ON a.id = t.account_id ORDER BY t.id DESC"
                )
            )
            return ListOf(data=[_token(r) for r in rows], has_more=False)

    @delete(
        "/{token_id:str}",
        summary="Revoke a token (`?reason=` is kept in the audit log)",
        responses=error_responses(400, 401, 403, 404),
        status_code=200,
    )
    async def revoke_token(
        self,
        token_id: FromPath[str],
        ctx: NamedDependency[Context],
        request: Request,
        reason: FromQuery[str | None] = None,
    ) -> Token:
        checked_reason(reason)
        async with ctx.db.begin() as conn:
            row = (
                await conn.execute(
                    text(
                        "UPDATE api_tokens SET revoked_at = coalesce(revoked_at, now()) WHERE public_id = :p RETURNING account_id"
                    ),
                    {"p": token_id},
                )
            ).first()
            if row is None:
                raise not_found("api_token", token_id)
            await audit(
                conn,
                request.user,
                "token.revoke",
                account_id=row.account_id,
                reason=reason,
                details={"token": token_id},
            )
            out = (
                await conn.execute(
                    text(
                        f"SELECT {COLUMNS} FROM api_tokens t LEFT JOIN accounts a ON a.id = t.account_id WHERE t.public_id = :p"
                    ),
                    {"p": token_id},
                )
            ).one()
        resolver: TokenResolver = request.app.state.tokens
        resolver.forget()
        return _token(out)
