"""Organization membership (issue 4): staff add, re-role and remove members (idempotent, audit-logged);
only an organization's admins (or its own token, or staff) may buy and refund for it; a plain member gets 403
`not_an_organization_admin`; an organization key's member must belong to it."""

from __future__ import annotations

from typing import Any

import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import ADMIN, Api, key, snapshot
from tests.purchases.conftest import buy, pay
from tests.stripe_helpers import full_snapshot


async def set_member(
    client: AsyncTestClient,
    org: str,
    member: str,
    role: str,
    headers: dict[str, str] = ADMIN,
    reason: str | None = "test",
    **extra: Any,
) -> Any:
    """Staff (the admin token by default, or a support token) give a `reason`, as they must; `reason=None`
    sends none, for a caller that is not staff."""
    body: dict[str, Any] = {"member": member, "role": role, **extra}
    if reason is not None:
        body["reason"] = reason
    return await client.post(f"/v1/accounts/{org}/members", json=body, headers=headers)


async def audit(engine: AsyncEngine, org: str) -> list[tuple[str, str, str | None, dict[str, Any]]]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT l.action, l.actor, l.reason, l.details FROM audit_log l JOIN accounts a ON a.id = l.account_id"
                " WHERE a.public_id = :o ORDER BY l.id"
            ),
            {"o": org},
        )
        return [(r[0], r[1], r[2], r[3]) for r in rows]


async def members_count(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(text("SELECT count(*) FROM organization_members")) or 0)


async def test_members_are_added_re_roled_listed_and_removed_with_an_audit_trail(
    api: Api, client: AsyncTestClient, engine: AsyncEngine
) -> None:
    org = (await api.account("organization"))["id"]
    alice = (await api.account())["id"]
    bob = (await api.account())["id"]
    support = await api.token(["support"])

    r = await set_member(client, org, alice, "admin", support, reason="founder")
    assert r.status_code == 201, r.text
    assert {k: r.json()[k] for k in ("organization", "member", "role", "object")} == {
        "organization": org, "member": alice, "role": "admin", "object": "organization_member",
    }  # fmt: skip
    again = await set_member(client, org, alice, "admin", support)
    assert again.status_code == 200 and again.json() == r.json()  # the same role again: nothing changes
    assert (await set_member(client, org, bob, "member")).status_code == 201
    changed = await set_member(client, org, bob, "admin", reason="promoted")
    assert (changed.status_code, changed.json()["role"]) == (200, "admin")
    assert (await set_member(client, org, bob, "member")).status_code == 200

    trail = await audit(engine, org)
    assert [(a, reason, d["member"], d["role"], d["previous_role"]) for a, _, reason, d in trail] == [
        ("organization_member_added", "founder", alice, "admin", None),
        ("organization_member_added", "test", bob, "member", None),
        ("organization_member_role_changed", "promoted", bob, "admin", "member"),
        ("organization_member_role_changed", "test", bob, "member", "admin"),
    ]
    assert trail[0][1].startswith("t (tok") and trail[1][1] == "bootstrap-admin (bootstrap)"  # the actor of each

    expected = [(alice, "admin"), (bob, "member")]
    own = await api.token(["account"], account=org)
    admin_member = await api.token(["account"], account=alice)
    for headers in (ADMIN, support, await api.token(["gateway"]), own, admin_member):
        r = await client.get(f"/v1/accounts/{org}/members", headers=headers)
        assert r.status_code == 200, r.text
        assert [(m["member"], m["role"]) for m in r.json()["data"]] == expected
    plain = await api.token(["account"], account=bob)
    r = await client.get(f"/v1/accounts/{org}/members", headers=plain)
    assert (r.status_code, r.json()["error"]["code"]) == (403, "not_an_organization_admin")
    stranger = await api.token(["account"], account=(await api.account())["id"])
    assert (await client.get(f"/v1/accounts/{org}/members", headers=stranger)).status_code == 404

    bob_key = (
        await client.post(
            f"/v1/accounts/{org}/keys", json={"reason": "test", "name": "k", "member": bob}, headers=ADMIN
        )
    ).json()
    r = await client.delete(f"/v1/accounts/{org}/members/{bob}?reason=left", headers=support)
    assert (r.status_code, r.json()["deleted"], r.json()["role"]) == (200, True, "member")
    r = await client.delete(f"/v1/accounts/{org}/members/{bob}?reason=again", headers=support)
    assert (r.status_code, r.json()["error"]["code"]) == (404, "organization_member_not_found")
    action, _, reason, details = (await audit(engine, org))[-1]
    assert (action, reason, details["disabled_keys"]) == ("organization_member_removed", "left", [bob_key["id"]])
    r = await client.get(f"/v1/accounts/{org}/members", headers=ADMIN)
    assert [m["member"] for m in r.json()["data"]] == [alice]


async def test_bad_membership_requests_are_refused_and_change_nothing(
    api: Api, client: AsyncTestClient, engine: AsyncEngine
) -> None:
    org = (await api.account("organization"))["id"]
    other_org = (await api.account("organization"))["id"]
    user = (await api.account())["id"]
    gateway = await api.token(["gateway"])
    as_org = await api.token(["account"], account=org)
    before = (await snapshot(engine), await members_count(engine))
    cases = [
        (await set_member(client, org, other_org, "member"), 400, "member_must_be_a_user"),
        (await set_member(client, user, user, "member"), 400, "not_an_organization"),
        (await set_member(client, org, "acct_nope", "member"), 404, "account_not_found"),
        (await set_member(client, "acct_nope", user, "member"), 404, "account_not_found"),
        (await set_member(client, org, user, "owner"), 400, "invalid_parameter"),
        (await set_member(client, org, user, "member", extra_field=1), 400, "invalid_parameter"),
        (await set_member(client, org, user, "member", gateway, reason=None), 403, "insufficient_scope"),
        (await set_member(client, org, user, "admin", as_org, reason=None), 403, "insufficient_scope"),
        (await client.delete(f"/v1/accounts/{org}/members/{user}"), 401, "missing_token"),
    ]
    for r, status, code in cases:
        assert r.status_code == status, r.text
        if code:
            assert r.json()["error"]["code"] == code
    assert (await snapshot(engine), await members_count(engine)) == before


async def test_only_admins_the_organization_and_staff_buy_and_refund_for_it(
    api: Api, client: AsyncTestClient, engine: AsyncEngine
) -> None:
    org = (await api.account("organization"))["id"]
    alice = (await api.account())["id"]  # admin
    bob = (await api.account())["id"]  # plain member
    await set_member(client, org, alice, "admin")
    await set_member(client, org, bob, "member")
    as_alice = await api.token(["account"], account=alice)
    as_bob = await api.token(["account"], account=bob)
    as_org = await api.token(["account"], account=org)
    stranger = await api.token(["account"], account=(await api.account())["id"])

    bought = await buy(client, org, "20.00", headers=as_alice)
    assert bought["purchase"]["account"] == org
    await pay(client, bought["purchase"])
    p = bought["purchase"]["id"]
    assert (await buy(client, org, "10.00", headers=as_org))["purchase"]["account"] == org
    r = await client.get(f"/v1/accounts/{org}/purchases", headers=as_alice)
    assert r.status_code == 200 and len(r.json()["data"]) == 2
    assert (await client.get(f"/v1/purchases/{p}", headers=as_alice)).status_code == 200
    r = await client.post(f"/v1/accounts/{org}/quotes", json={"amount": "10", "method": "card"}, headers=as_alice)
    assert r.status_code == 200 and r.json()["account"] == org

    before = await full_snapshot(engine)
    refused = [
        await client.post(
            f"/v1/accounts/{org}/purchases", json={"amount": "10", "method": "card"}, headers={**as_bob, **key()}
        ),
        await client.post(f"/v1/accounts/{org}/quotes", json={"amount": "10", "method": "card"}, headers=as_bob),
        await client.get(f"/v1/accounts/{org}/purchases", headers=as_bob),
        await client.get(f"/v1/purchases/{p}", headers=as_bob),
        await client.post(f"/v1/purchases/{p}/refunds", json={"amount": "1.00"}, headers={**as_bob, **key()}),
    ]
    assert [(r.status_code, r.json()["error"]["code"]) for r in refused] == [(403, "not_an_organization_admin")] * 5
    hidden = [
        await client.post(
            f"/v1/accounts/{org}/purchases", json={"amount": "10", "method": "card"}, headers={**stranger, **key()}
        ),
        await client.get(f"/v1/purchases/{p}", headers=stranger),
        # an organization's admin is not an admin of its members' own accounts
        await client.get(f"/v1/accounts/{bob}/purchases", headers=as_alice),
    ]
    assert [r.status_code for r in hidden] == [404, 404, 404]
    assert await full_snapshot(engine) == before

    # removing the admin takes the right away
    assert (await client.delete(f"/v1/accounts/{org}/members/{alice}?reason=left", headers=ADMIN)).status_code == 200
    r = await client.get(f"/v1/purchases/{p}", headers=as_alice)
    assert r.status_code == 404
    assert (await api.balance(org))["balance"] == "20.00"


async def test_an_admin_member_refunds_the_organizations_purchase(
    api: Api, client: AsyncTestClient, localstripe: str
) -> None:
    from tests.stripe_helpers import pay_at_emulator

    org = (await api.account("organization"))["id"]
    alice = (await api.account())["id"]
    await set_member(client, org, alice, "admin")
    as_alice = await api.token(["account"], account=alice)
    p = (await buy(client, org, "15.00", headers=as_alice))["purchase"]
    await pay_at_emulator(localstripe, p["payment_intent"])
    await pay(client, p)
    r = await client.post(f"/v1/purchases/{p['id']}/refunds", json={"amount": "4.00"}, headers={**as_alice, **key()})
    assert r.status_code == 201, r.text
    assert (await api.balance(org))["balance"] == "11.00"


@pytest.mark.parametrize("role", [None, "member", "admin"])
async def test_an_organization_key_names_one_of_its_members(
    api: Api, client: AsyncTestClient, engine: AsyncEngine, role: str | None
) -> None:
    org = (await api.account("organization"))["id"]
    carol = (await api.account())["id"]
    if role:
        await set_member(client, org, carol, role)
    before = await snapshot(engine)
    r = await client.post(
        f"/v1/accounts/{org}/keys", json={"reason": "test", "name": "k", "member": carol}, headers=ADMIN
    )
    if role is None:
        assert (r.status_code, r.json()["error"]["code"], r.json()["error"]["param"]) == (400, "not_a_member", "member")
        assert await snapshot(engine) == before
        assert (await client.get(f"/v1/accounts/{org}/keys", headers=ADMIN)).json()["data"] == []
    else:
        assert r.status_code == 201, r.text
        assert r.json()["member"] == carol


async def test_an_organizations_own_token_creates_keys_for_its_members_and_only_them(
    api: Api, client: AsyncTestClient, engine: AsyncEngine
) -> None:
    org = (await api.account("organization"))["id"]
    carol = (await api.account())["id"]
    stranger = (await api.account())["id"]
    await set_member(client, org, carol, "member")
    as_org = await api.token(["account"], account=org)

    r = await client.post(f"/v1/accounts/{org}/keys", json={"name": "carol", "member": carol}, headers=as_org)
    assert r.status_code == 201, r.text  # the member's own account is not the organization's to see
    assert (r.json()["account"], r.json()["member"]) == (org, carol)
    before = await snapshot(engine)
    for other in (stranger, "acct_nope"):  # a non-member and an unknown account are answered alike
        r = await client.post(f"/v1/accounts/{org}/keys", json={"name": "k", "member": other}, headers=as_org)
        assert (r.status_code, r.json()["error"]["code"], r.json()["error"]["param"]) == (400, "not_a_member", "member")
    assert await snapshot(engine) == before
