"""BYOK fee policies are versioned data: admins add a new version with an effective time; every BYOK
generation records the policy id that priced it, so past fees keep the rule that made them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec
from litestar import Controller, Request, get, post
from litestar.di import NamedDependency
from litestar.params import JSONBody
from sqlalchemy import text

from billing.auth.audit import audit
from billing.auth.middleware import requires
from billing.auth.principal import ADMIN
from billing.context import Context
from billing.errors import invalid
from billing.http import error_responses
from billing.schemas import ListOf, MoneyStr, Reason, money_field, money_or_none, public_id, rate_field, timestamp_field

Ctx = NamedDependency[Context]


class CreatePolicy(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    kind: Literal["allowance_usd", "free_requests"]
    rate: Annotated[str, msgspec.Meta(description='Fee rate as a decimal string, e.g. "0.05" for 5%.')]
    effective_from: datetime
    allowance_usd: MoneyStr | None = None
    enterprise_allowance_usd: MoneyStr | None = None
    free_requests: Annotated[int, msgspec.Meta(ge=0)] | None = None
    reason: Reason  # kept in the audit log


class Policy(msgspec.Struct):
    id: str
    kind: str
    rate: str
    effective_from: datetime
    allowance_usd: str | None
    enterprise_allowance_usd: str | None
    free_requests: int | None
    object: str = "byok_fee_policy"


class ByokPoliciesController(Controller):
    path = "/v1/byok_fee_policies"
    tags = ["admin"]
    guards = [requires(ADMIN)]

    @post("/", summary="Add a BYOK fee policy version", responses=error_responses(400, 401, 403), status_code=201)
    async def create_policy(self, data: JSONBody[CreatePolicy], ctx: Ctx, request: Request) -> Policy:
        """A new version, audit-logged with the admin who added it and why (SPEC §7)."""
        rate = rate_field(data.rate, "rate", upto_one=True)
        effective_from = timestamp_field(data.effective_from, "effective_from")
        if data.kind == "allowance_usd" and data.allowance_usd is None:
            raise invalid("allowance_required", "An `allowance_usd` policy gives `allowance_usd`.", "allowance_usd")
        if data.kind == "free_requests" and data.free_requests is None:
            raise invalid("free_requests_required", "A `free_requests` policy gives `free_requests`.", "free_requests")
        async with ctx.db.begin() as conn:
            row = (
                await conn.execute(
                    text(
                        "INSERT INTO byok_fee_policies (kind, allowance_usd, enterprise_allowance_usd, free_requests,"
                        " rate, effective_from) VALUES (:k, :a, :e, :f, :r, :t) RETURNING *"
                    ),
                    {
                        "k": data.kind,
                        "a": money_field(data.allowance_usd, "allowance_usd"),
                        "e": money_field(data.enterprise_allowance_usd, "enterprise_allowance_usd"),
                        "f": data.free_requests,
                        "r": rate,
                        "t": effective_from,
                    },
                )
            ).one()
            policy = _view(row)
            await audit(
                conn, request.user, "byok_fee_policy.create", reason=data.reason, details=msgspec.to_builtins(policy)
            )
        return policy

    @get("/", summary="BYOK fee policy versions, newest first", responses=error_responses(401, 403))
    async def list_policies(self, ctx: Ctx) -> ListOf[Policy]:
        async with ctx.db.connect() as conn:
            rows = await conn.execute(text("SELECT * FROM byok_fee_policies ORDER BY effective_from DESC, id DESC"))
            return ListOf(data=[_view(r) for r in rows], has_more=False)


def _view(r: object) -> Policy:
    return Policy(
        id=public_id("byokpol", r.id), kind=r.kind, rate=format(r.rate.normalize(), "f"),  # type: ignore[attr-defined]
        effective_from=r.effective_from, allowance_usd=money_or_none(r.allowance_usd),  # type: ignore[attr-defined]
        enterprise_allowance_usd=money_or_none(r.enterprise_allowance_usd), free_requests=r.free_requests,  # type: ignore[attr-defined]
    )  # fmt: skip
