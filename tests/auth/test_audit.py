"""SPEC §7: "Staff actions are audit-logged with actor and reason" — one `audit_log` row (actor, action,
account, entry, reason), written by `billing.auth.audit.audit` in the action's own transaction. Grants,
adjustments, tokens and memberships are tested where they live; these are the staff actions that change
money or who may spend it elsewhere, and the reason staff must give for them."""

from typing import Any

from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from billing.settings import Settings
from billing.stripe_client import make_stripe
from tests.conftest import ADMIN, Api, key
from tests.gateway.test_auto_topup import saved_card
from tests.purchases.conftest import buy, future_epoch, pay


async def last_audit_id(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(text("SELECT coalesce(max(id), 0) FROM audit_log")) or 0)


async def audit_since(engine: AsyncEngine, after: int) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT l.actor, l.action, a.public_id AS account, l.reason, l.details FROM audit_log l"
                " LEFT JOIN accounts a ON a.id = l.account_id WHERE l.id > :after ORDER BY l.id"
            ),
            {"after": after},
        )
        return [dict(r._mapping) for r in rows]


async def test_support_lifting_a_key_limit_and_re_enabling_it_is_audited(
    api: Api, client: AsyncTestClient, engine: AsyncEngine
) -> None:
    acct = (await api.account())["id"]
    r = await client.post(
        f"/v1/accounts/{acct}/keys", json={"reason": "test", "name": "k", "limit": "1.00"}, headers=ADMIN
    )
    k = r.json()["id"]
    assert (
        await client.patch(f"/v1/keys/{k}", json={"reason": "test", "disabled": True}, headers=ADMIN)
    ).status_code == 200
    support = await api.token(["support"])
    before = await last_audit_id(engine)
    r = await client.patch(f"/v1/keys/{k}", json={"reason": "test", "limit": None, "disabled": False}, headers=support)
    assert r.status_code == 200 and r.json()["limit"] is None and r.json()["disabled"] is False, r.text
    trail = await audit_since(engine, before)
    assert [(t["account"], t["actor"].startswith("t (tok_")) for t in trail] == [(acct, True)], trail


async def test_support_creating_and_deleting_a_key_is_audited(
    api: Api, client: AsyncTestClient, engine: AsyncEngine
) -> None:
    acct = (await api.account())["id"]
    support = await api.token(["support"])
    before = await last_audit_id(engine)
    r = await client.post(
        f"/v1/accounts/{acct}/keys", json={"reason": "test", "name": "k", "limit": "1.00"}, headers=support
    )
    assert r.status_code == 201, r.text
    gone = await client.delete(f"/v1/keys/{r.json()['id']}", params={"reason": "test"}, headers=support)
    assert gone.status_code == 200, gone.text
    trail = await audit_since(engine, before)
    assert [(t["action"], t["account"], t["details"]["key"]) for t in trail] == [
        ("key.create", acct, r.json()["id"]),
        ("key.delete", acct, r.json()["id"]),
    ], trail


async def test_staff_key_changes_carry_the_reason_given(api: Api, client: AsyncTestClient, engine: AsyncEngine) -> None:
    """A key created, changed or deleted by staff is audit-logged with the reason given (a DELETE's in its
    query); a reason alone changes nothing on the key, and a reason out of bounds is a 400 that deletes nothing."""
    acct = (await api.account())["id"]
    support = await api.token(["support"])
    before = await last_audit_id(engine)
    body = {"name": "k", "limit": "1.00", "reason": "ticket 7: customer asked for a capped key"}
    r = await client.post(f"/v1/accounts/{acct}/keys", json=body, headers=support)
    assert r.status_code == 201, r.text
    k = r.json()["id"]
    change = {"limit": "2.00", "reason": "ticket 7: raised"}
    r = await client.patch(f"/v1/keys/{k}", json=change, headers=support)
    assert r.status_code == 200 and r.json()["limit"] == "2.00", r.text
    unchanged = await client.patch(f"/v1/keys/{k}", json={"reason": "nothing to change"}, headers=support)
    assert unchanged.status_code == 200 and unchanged.json() == r.json()
    for bad in ("", "x" * 1001):
        refused = await client.delete(f"/v1/keys/{k}", params={"reason": bad}, headers=support)
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_reason", refused.text
    assert (await client.get(f"/v1/keys/{k}", headers=support)).status_code == 200  # not deleted
    gone = await client.delete(f"/v1/keys/{k}", params={"reason": "ticket 8: key leaked"}, headers=support)
    assert gone.status_code == 200 and gone.json()["disabled"] is True, gone.text
    trail = await audit_since(engine, before)
    assert [(t["action"], t["account"], t["reason"]) for t in trail] == [
        ("key.create", acct, "ticket 7: customer asked for a capped key"),
        ("key.update", acct, "ticket 7: raised"),
        ("key.delete", acct, "ticket 8: key leaked"),
    ], trail


async def test_a_staff_refund_is_audited_with_actor_and_reason(
    api: Api, client: AsyncTestClient, engine: AsyncEngine, localstripe: str
) -> None:
    from tests.stripe_helpers import pay_at_emulator

    acct = (await api.account())["id"]
    p = (await buy(client, acct, "15.00"))["purchase"]
    await pay_at_emulator(localstripe, p["payment_intent"])
    await pay(client, p)
    support = await api.token(["support"])
    before = await last_audit_id(engine)
    r = await client.post(
        f"/v1/purchases/{p['id']}/refunds",
        json={"amount": "4.00", "reason": "ticket 123"},
        headers={**support, **key()},
    )
    assert r.status_code == 201, r.text
    trail = await audit_since(engine, before)
    assert [(t["account"], t["reason"], t["actor"].startswith("t (tok_")) for t in trail] == [
        (acct, "ticket 123", True)
    ], trail


async def test_setting_a_customers_auto_top_up_by_support_is_audited(
    api: Api, client: AsyncTestClient, engine: AsyncEngine, settings: Settings
) -> None:
    sdk = make_stripe(settings)
    assert sdk is not None
    customer, method = await saved_card(sdk, "4242424242424242")
    acct = (await api.account())["id"]
    await api.grant(acct, "10.00")  # above its threshold: no top-up due (the job's tests count every account's)
    support = await api.token(["support"])
    before = await last_audit_id(engine)
    r = await client.put(
        f"/v1/accounts/{acct}/auto_topup",
        json={
            "threshold": "5.00", "amount": "50.00", "stripe_customer": customer, "payment_method": method,
            "reason": "ticket 9: set up by phone",
        },
        headers=support,
    )  # fmt: skip
    assert r.status_code == 200, r.text
    trail = await audit_since(engine, before)
    assert [(t["account"], t["actor"].startswith("t (tok_"), t["reason"]) for t in trail] == [
        (acct, True, "ticket 9: set up by phone")
    ], trail


async def test_an_admins_new_byok_fee_policy_is_audited(api: Api, client: AsyncTestClient, engine: AsyncEngine) -> None:
    admin = await api.token(["admin"])
    before = await last_audit_id(engine)
    r = await client.post(
        "/v1/byok_fee_policies",
        json={
            "kind": "allowance_usd", "rate": "0.06", "allowance_usd": "1000.00",
            "effective_from": future_epoch().isoformat(), "reason": "finance: new rate from next month",
        },
        headers=admin,
    )  # fmt: skip
    assert r.status_code == 201, r.text
    trail = await audit_since(engine, before)
    assert [(t["actor"].startswith("t (tok_"), t["reason"]) for t in trail] == [
        (True, "finance: new rate from next month")
    ], trail


async def test_revoking_a_token_is_audited_with_the_reason_given(
    api: Api, client: AsyncTestClient, engine: AsyncEngine
) -> None:
    acct = (await api.account())["id"]
    r = await client.post("/v1/tokens", json={"name": "dash", "scopes": ["account"], "account": acct}, headers=ADMIN)
    assert r.status_code == 201, r.text
    token = r.json()["id"]
    refused = await client.delete(f"/v1/tokens/{token}", params={"reason": ""}, headers=ADMIN)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_reason", refused.text
    before = await last_audit_id(engine)
    r = await client.delete(f"/v1/tokens/{token}", params={"reason": "ticket 10: token leaked"}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["revoked_at"] is not None, r.text
    trail = await audit_since(engine, before)
    assert [(t["action"], t["account"], t["reason"]) for t in trail] == [
        ("token.revoke", acct, "ticket 10: token leaked")
    ], trail


async def test_staff_changes_without_a_reason_are_refused_and_change_nothing(
    api: Api, client: AsyncTestClient, engine: AsyncEngine, settings: Settings, localstripe: str
) -> None:
    """A support or admin token that changes an account's keys, members, auto top-up or money gives a reason:
    without one, 400 `reason_required`, nothing changed and nothing logged. The account's own token needs none
    (nothing of its own doings is audit-logged), and the platform's fee rules always name one."""
    from tests.stripe_helpers import pay_at_emulator

    acct = (await api.account())["id"]
    org = (await api.account("organization"))["id"]
    user = (await api.account())["id"]
    support = await api.token(["support"])
    admin = await api.token(["admin"])
    own = await api.token(["account"], acct)
    sdk = make_stripe(settings)
    assert sdk is not None
    customer, method = await saved_card(sdk, "4242424242424242")
    p = (await buy(client, acct, "15.00"))["purchase"]
    await pay_at_emulator(localstripe, p["payment_intent"])
    await pay(client, p)
    k = (await client.post(f"/v1/accounts/{acct}/keys", json={"name": "k", "reason": "setup"}, headers=ADMIN)).json()
    before = await last_audit_id(engine)
    topup = {"threshold": "5.00", "amount": "50.00", "stripe_customer": customer, "payment_method": method}
    for staff in (support, admin):
        for method_name, path, body in [
            ("POST", f"/v1/accounts/{acct}/keys", {"name": "no reason"}),
            ("PATCH", f"/v1/keys/{k['id']}", {"limit": "0.01", "disabled": True}),
            ("DELETE", f"/v1/keys/{k['id']}", None),
            ("POST", f"/v1/accounts/{org}/members", {"member": user, "role": "member"}),
            ("PUT", f"/v1/accounts/{acct}/auto_topup", topup),
            ("POST", f"/v1/purchases/{p['id']}/refunds", {"amount": "1.00"}),
        ]:
            r = await client.request(method_name, path, json=body, headers={**staff, **key()})
            assert r.status_code == 400, (method_name, path, r.text)
            assert r.json()["error"]["code"] == "reason_required" and r.json()["error"]["param"] == "reason", r.text
    assert await audit_since(engine, before) == []
    after = (await client.get(f"/v1/keys/{k['id']}", headers=ADMIN)).json()
    assert (after["limit"], after["disabled"]) == (k["limit"], False)
    keys = (await client.get(f"/v1/accounts/{acct}/keys", headers=ADMIN)).json()["data"]
    assert [x["id"] for x in keys] == [k["id"]]
    assert (await client.get(f"/v1/accounts/{org}/members", headers=ADMIN)).json()["data"] == []
    assert (await client.get(f"/v1/accounts/{acct}/auto_topup", headers=ADMIN)).status_code == 404
    assert (await client.get(f"/v1/accounts/{acct}/balance", headers=ADMIN)).json()["balance"] == "15.00"
    for path, body in [
        ("/v1/byok_fee_policies", {"kind": "allowance_usd", "rate": "0.06", "allowance_usd": "1000.00"}),
        ("/v1/pricing_versions", {}),
    ]:
        r = await client.post(path, json={**body, "effective_from": future_epoch().isoformat()}, headers=admin)
        assert r.status_code == 400 and r.json()["error"]["param"] == "reason", r.text
    # The account itself: no reason asked, nothing logged
    mine = await client.post(f"/v1/accounts/{acct}/keys", json={"name": "mine"}, headers=own)
    assert mine.status_code == 201, mine.text
    assert (await client.patch(f"/v1/keys/{mine.json()['id']}", json={"limit": "1.00"}, headers=own)).status_code == 200
    assert (await client.delete(f"/v1/keys/{mine.json()['id']}", headers=own)).status_code == 200
    assert await audit_since(engine, before) == []
