"""API keys: limits with resets at 00:00 UTC (weeks Monday–Sunday), BYOK in limit, disable, expiry, orgs."""

from datetime import UTC, datetime, timedelta
from typing import Any

from litestar.testing import AsyncTestClient
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import ADMIN, BEYOND_YEAR_9999_UTC, Api, snapshot
from tests.gateway.conftest import Gateway, funded


async def new_key(client: AsyncTestClient, account: str, **body: Any) -> dict[str, Any]:
    r = await client.post(f"/v1/accounts/{account}/keys", json={"reason": "test", "name": "k", **body}, headers=ADMIN)
    assert r.status_code == 201, r.text
    return r.json()


async def read_key(client: AsyncTestClient, key: str) -> dict[str, Any]:
    r = await client.get(f"/v1/keys/{key}", headers=ADMIN)
    assert r.status_code == 200, r.text
    return r.json()


async def test_weekly_limit_resets_monday_midnight_utc(
    api: Api, gw: Gateway, client: AsyncTestClient, clock_at
) -> None:  # type: ignore[no-untyped-def]
    acct = await funded(api, "100.00")
    key = (await new_key(client, acct, limit="1.00", limit_reset="weekly"))["id"]
    sunday_late = datetime(2026, 11, 29, 23, 59, 59, tzinfo=UTC)  # a Sunday
    clock_at(sunday_late - timedelta(days=2))  # Friday
    await gw.charge(key=key, cost="0.60")
    clock_at(sunday_late)
    r = await gw.charge(expect=402, key=key, cost="0.50")
    assert r.json()["error"]["limit_source"] == "key_limit" and r.json()["error"]["available"] == "0.40"
    view = await read_key(client, key)
    assert (view["usage_weekly"], view["limit_remaining"], view["usage"]) == ("0.60", "0.40", "0.60")
    clock_at(sunday_late + timedelta(seconds=1))  # Monday 00:00:00 UTC
    view = await read_key(client, key)
    assert (view["usage_weekly"], view["limit_remaining"], view["usage"]) == ("0.00", "1.00", "0.60")
    await gw.charge(key=key, cost="0.50")
    assert (await read_key(client, key))["usage_weekly"] == "0.50"


async def test_daily_and_monthly_periods(api: Api, gw: Gateway, client: AsyncTestClient, clock_at) -> None:  # type: ignore[no-untyped-def]
    acct = await funded(api, "100.00")
    key = (await new_key(client, acct, limit="5.00", limit_reset="daily"))["id"]
    clock_at(datetime(2026, 12, 31, 12, 0, tzinfo=UTC))
    await gw.charge(key=key, cost="2.00")
    clock_at(datetime(2027, 1, 1, 0, 0, tzinfo=UTC))
    await gw.charge(key=key, cost="1.00")
    view = await read_key(client, key)
    assert (view["usage_daily"], view["usage_monthly"], view["usage_weekly"], view["usage"]) == (
        "1.00", "1.00", "3.00", "3.00",
    )  # fmt: skip
    assert view["limit_remaining"] == "4.00"


async def test_key_limit_counts_open_holds(api: Api, gw: Gateway, client: AsyncTestClient) -> None:
    acct = await funded(api, "100.00")
    key = (await new_key(client, acct, limit="1.00"))["id"]
    hold = (await gw.hold(key=key, amount="0.70")).json()
    assert (await read_key(client, key))["limit_remaining"] == "0.30"
    r = await gw.hold(expect=402, key=key, amount="0.40")
    assert r.json()["error"]["limit_source"] == "key_limit"
    await gw.capture(hold["id"], cost="0.20")
    assert (await read_key(client, key))["limit_remaining"] == "0.80"


async def test_byok_counts_toward_limit_only_when_included(api: Api, gw: Gateway, client: AsyncTestClient) -> None:
    acct = await funded(api, "100.00")
    counted = (await new_key(client, acct, limit="1.00", include_byok_in_limit=True))["id"]
    ignored = (await new_key(client, acct, limit="1.00"))["id"]
    for key in (counted, ignored):
        await gw.charge(key=key, is_byok=True, byok_list_cost="0.60", upstream_inference_cost="0.55")
    a, b = await read_key(client, counted), await read_key(client, ignored)
    assert (a["byok_usage"], a["usage"], a["limit_remaining"]) == ("0.60", "0.00", "0.40")
    assert (b["byok_usage"], b["usage"], b["limit_remaining"]) == ("0.60", "0.00", "1.00")


async def test_byok_fees_count_as_the_keys_usage_and_against_its_limit(
    api: Api, gw_path: Gateway, client: AsyncTestClient, clock_at: Any
) -> None:
    """A BYOK fee is credits spent through the key: it counts in the key's `usage*` like a cost, and the key's
    limit caps it (SPEC §5 Per-key limits). The list-price cost counts in `byok_usage*` only."""
    gw = gw_path
    clock_at(datetime(2026, 8, 10, tzinfo=UTC))
    acct = await funded(api, "100.00")
    for cost in ("9000.00", "9000.00", "7000.00"):  # the month's $25,000 allowance used up
        await gw.charge(account=acct, is_byok=True, byok_list_cost=cost)
    key = (await new_key(client, acct, limit="1.00", limit_reset="monthly"))["id"]
    for _ in range(2):
        assert (await gw.charge(key=key, is_byok=True, byok_list_cost="10.00")).json()["byok_fee"] == "0.50"
    view = await read_key(client, key)
    assert (view["usage"], view["usage_monthly"], view["byok_usage"], view["limit_remaining"]) == (
        "1.00", "1.00", "20.00", "0.00",
    )  # fmt: skip
    r = await gw.charge(expect=402, key=key, is_byok=True, byok_list_cost="10.00")
    assert r.json()["error"]["limit_source"] == "key_limit"
    assert (await api.balance(acct))["balance"] == "99.00"


async def test_byok_included_in_a_keys_limit_is_enforced_on_byok_charges(
    api: Api, gw_path: Gateway, client: AsyncTestClient, clock_at: Any
) -> None:
    """include_byok_in_limit (SPEC §5 Per-key limits): a BYOK charge needs room under the key's limit for its
    list-price cost plus its fee, and is refused like any other charge when there is none (402 key_limit, the
    room left as `available`). Credits still cover only the fee: an account with one cent may run a BYOK
    generation inside the allowance."""
    gw = gw_path
    clock_at(datetime(2026, 8, 10, tzinfo=UTC))
    acct = await funded(api, "100.00")
    key = (await new_key(client, acct, limit="1.00", include_byok_in_limit=True))["id"]
    await gw.charge(key=key, is_byok=True, byok_list_cost="0.60")
    r = await gw.charge(expect=402, key=key, is_byok=True, byok_list_cost="0.60")
    assert (r.json()["error"]["limit_source"], r.json()["error"]["available"]) == ("key_limit", "0.40")
    await gw.charge(key=key, is_byok=True, byok_list_cost="0.40")
    view = await read_key(client, key)
    assert (view["byok_usage"], view["usage"], view["limit_remaining"]) == ("1.00", "0.00", "0.00")

    for cost in ("9000.00", "9000.00", "7000.00"):  # the month's $25,000 allowance used up: 5% fees from here
        await gw.charge(account=acct, is_byok=True, byok_list_cost=cost)
    key = (await new_key(client, acct, limit="1.00", include_byok_in_limit=True))["id"]
    r = await gw.charge(expect=402, key=key, is_byok=True, byok_list_cost="0.96")  # 0.96 + 0.048 > 1.00
    assert (r.json()["error"]["limit_source"], r.json()["error"]["available"]) == ("key_limit", "1.00")
    assert (await gw.charge(key=key, is_byok=True, byok_list_cost="0.95")).json()["byok_fee"] == "0.0475"

    poor = await funded(api, "0.01")
    key = (await new_key(client, poor, limit="5.00", include_byok_in_limit=True))["id"]
    assert (await gw.charge(key=key, is_byok=True, byok_list_cost="2.00")).json()["byok_fee"] == "0.00"


async def test_disabled_expired_and_deleted_keys_cannot_spend(
    api: Api, gw: Gateway, client: AsyncTestClient, engine: AsyncEngine, clock_at
) -> None:  # type: ignore[no-untyped-def]
    acct = await funded(api, "10.00")
    disabled = (await new_key(client, acct))["id"]
    assert (
        await client.patch(f"/v1/keys/{disabled}", json={"reason": "test", "disabled": True}, headers=ADMIN)
    ).json()["disabled"]
    soon = datetime.now(UTC) + timedelta(hours=1)
    expiring = (await new_key(client, acct, expires_at=soon.isoformat()))["id"]
    deleted = (await new_key(client, acct))["id"]
    r = await client.delete(f"/v1/keys/{deleted}", params={"reason": "test"}, headers=ADMIN)
    assert (r.status_code, r.json()["id"], r.json()["disabled"]) == (200, deleted, True)  # answered as deleted
    assert (await client.get(f"/v1/keys/{deleted}", headers=ADMIN)).status_code == 404
    clock_at(soon + timedelta(seconds=1))
    before = await snapshot(engine)
    assert (await gw.charge(expect=403, key=disabled, cost="0.01")).json()["error"]["code"] == "key_disabled"
    assert (await gw.charge(expect=403, key=expiring, cost="0.01")).json()["error"]["code"] == "key_expired"
    assert (await gw.hold(expect=403, key=disabled, amount="0.01")).json()["error"]["code"] == "key_disabled"
    assert (await gw.charge(expect=404, key=deleted, cost="0.01")).json()["error"]["code"] == "key_not_found"
    assert await snapshot(engine) == before


async def test_key_of_another_account_is_404(api: Api, gw: Gateway, client: AsyncTestClient) -> None:
    mine = await funded(api, "1.00")
    theirs = await funded(api, "1.00")
    their_key = (await new_key(client, theirs))["id"]
    r = await gw.charge(expect=404, account=mine, key=their_key, cost="0.01")
    assert r.json()["error"]["code"] == "key_not_found"
    own = await api.token(["account"], account=mine)
    assert (await client.get(f"/v1/keys/{their_key}", headers=own)).status_code == 404


async def organization_of_two(api: Api, client: AsyncTestClient) -> tuple[str, tuple[str, str], tuple[str, str]]:
    """An organization with $10.00 and two members, each with a key of the organization's: (org, (alice, her
    key), (bob, his key))."""
    org = await funded(api, "10.00", kind="organization")
    members = []
    for _ in range(2):
        member = (await api.account())["id"]
        r = await client.post(
            f"/v1/accounts/{org}/members", json={"reason": "test", "member": member, "role": "member"}, headers=ADMIN
        )
        assert r.status_code == 201, r.text
        members.append((member, (await new_key(client, org, member=member))["id"]))
    return org, members[0], members[1]


async def test_member_keys_spend_from_the_organization_pool(api: Api, gw: Gateway, client: AsyncTestClient) -> None:
    org, (alice, alice_key), (bob, bob_key) = await organization_of_two(api, client)
    a = (await gw.charge(key=alice_key, cost="1.00")).json()
    b = (await gw.charge(key=bob_key, cost="2.50")).json()
    assert (a["account"], a["member"], a["key"]) == (org, alice, alice_key)
    assert (b["account"], b["member"], b["key"]) == (org, bob, bob_key)
    assert (await api.balance(org))["balance"] == "6.50"
    assert (await api.balance(alice))["balance"] == "0.00"
    assert (await read_key(client, bob_key))["usage"] == "2.50"


async def test_a_removed_members_keys_no_longer_spend_from_the_organization_pool(
    api: Api, gw_path: Gateway, client: AsyncTestClient, engine: AsyncEngine
) -> None:
    org, (_, alice_key), (bob, bob_key) = await organization_of_two(api, client)
    await gw_path.charge(key=bob_key, cost="1.00")  # while a member: spends from the pool

    r = await client.delete(f"/v1/accounts/{org}/members/{bob}?reason=left the company", headers=ADMIN)
    assert r.status_code == 200, r.text
    assert (await read_key(client, bob_key))["disabled"] is True
    before = await snapshot(engine)
    assert (await gw_path.charge(expect=403, key=bob_key, cost="2.00")).json()["error"]["code"] == "key_disabled"
    assert (await gw_path.hold(expect=403, key=bob_key, amount="2.00")).json()["error"]["code"] == "key_disabled"
    assert await snapshot(engine) == before
    await gw_path.charge(key=alice_key, cost="0.50")  # the remaining member's key still spends
    assert (await api.balance(org))["balance"] == "8.50"
    assert (await read_key(client, alice_key))["disabled"] is False
    r = await client.patch(f"/v1/keys/{bob_key}", json={"reason": "test", "disabled": False}, headers=ADMIN)
    assert r.status_code == 400 and r.json()["error"]["code"] == "not_a_member", r.text  # not while removed
    assert (await read_key(client, bob_key))["disabled"] is True
    r = await client.post(
        f"/v1/accounts/{org}/members", json={"reason": "test", "member": bob, "role": "member"}, headers=ADMIN
    )
    assert r.status_code == 201, r.text
    r = await client.patch(f"/v1/keys/{bob_key}", json={"reason": "test", "disabled": False}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["disabled"] is False, r.text  # a member again: it may


async def test_a_key_expiring_after_the_year_9000_utc_is_refused(api: Api, client: AsyncTestClient) -> None:
    acct = (await api.account())["id"]
    r = await client.post(
        f"/v1/accounts/{acct}/keys",
        json={"name": "k", "expires_at": BEYOND_YEAR_9999_UTC, "reason": "test"},
        headers=ADMIN,
    )
    assert r.status_code == 400, r.text
    assert (r.json()["error"]["code"], r.json()["error"]["param"]) == ("invalid_parameter", "expires_at")
    assert (await client.get(f"/v1/accounts/{acct}/keys", headers=ADMIN)).json()["data"] == []
    view = await new_key(client, acct)
    r = await client.patch(
        f"/v1/keys/{view['id']}", json={"reason": "test", "expires_at": BEYOND_YEAR_9999_UTC}, headers=ADMIN
    )
    assert r.status_code == 400, r.text
    assert (r.json()["error"]["code"], r.json()["error"]["param"]) == ("invalid_parameter", "expires_at")
    assert (await read_key(client, view["id"]))["expires_at"] is None


async def test_key_view_fields_and_bad_limits(api: Api, client: AsyncTestClient) -> None:
    acct = (await api.account())["id"]
    view = await new_key(client, acct, limit="12.5", limit_reset="monthly")
    assert view["object"] == "key" and view["limit"] == "12.50" and view["is_free_tier"] is True
    assert set(view) >= {
        "limit", "limit_remaining", "limit_reset", "include_byok_in_limit", "usage", "usage_daily", "usage_weekly",
        "usage_monthly", "byok_usage", "byok_usage_daily", "byok_usage_weekly", "byok_usage_monthly", "is_free_tier",
    }  # fmt: skip
    for body, code in [({"limit": "-1"}, "limit_must_not_be_negative"), ({"limit": 5}, "invalid_parameter"),
                       ({"limit_reset": "hourly"}, "invalid_parameter")]:  # fmt: skip
        r = await client.post(f"/v1/accounts/{acct}/keys", json={"reason": "test", "name": "x", **body}, headers=ADMIN)
        assert r.status_code == 400 and r.json()["error"]["code"] == code
    await api.grant(acct, "10.00", category="paid")
    assert (await read_key(client, view["id"]))["is_free_tier"] is False
