"""Quotes, purchases through Stripe (the emulator), pricing versions and purchase history (SPEC §5)."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy.ext.asyncio import AsyncEngine

from billing.stripe_client import LOCAL_API_KEY
from tests.conftest import ADMIN, BEYOND_YEAR_9999_UTC, Api, key
from tests.purchases.conftest import buy, future_epoch, pay
from tests.stripe_helpers import full_snapshot

D = Decimal


async def quote(client: AsyncTestClient, account: str, amount: str, method: str = "card") -> dict[str, Any]:
    r = await client.post(f"/v1/accounts/{account}/quotes", json={"amount": amount, "method": method}, headers=ADMIN)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize(
    ("amount", "method", "fee", "total", "cents"),
    [
        ("5", "card", "0.80", "5.80", 580),
        ("14.55", "card", "0.80", "15.35", 1535),
        ("14.64", "card", "0.81", "15.45", 1545),
        ("15.00", "card", "0.83", "15.83", 1583),
        ("25000", "card", "1375.00", "26375.00", 2637500),
        ("5.10", "crypto", "0.26", "5.36", 536),
        ("25000.00", "crypto", "1250.00", "26250.00", 2625000),
    ],
)
async def test_quote_with_default_pricing(
    api: Api, client: AsyncTestClient, engine: AsyncEngine, amount: str, method: str, fee: str, total: str, cents: int
) -> None:
    acct = (await api.account())["id"]
    before = await full_snapshot(engine)
    q = await quote(client, acct, amount, method)
    assert (q["credits"], q["fee"], q["total"], q["total_cents"]) == (D(amount).__format__(".2f"), fee, total, cents)
    assert q["fee_before_discount"] == fee and q["discount"]["saving"] == "0.00"
    assert q["discount"]["tier"] == {"name": "standard", "min_volume": "0.00", "fee_discount": "0"}
    assert q["discount"]["next_tier"] is None and q["currency"] == "usd"
    assert await full_snapshot(engine) == before  # a quote changes nothing


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"amount": "4.99"}, "purchase_below_minimum"),
        ({"amount": "25000.01"}, "purchase_above_maximum"),
        ({"amount": "10.001"}, "amount_not_whole_cents"),
        ({"amount": "0"}, "amount_must_be_positive"),
        ({"amount": "-10"}, "amount_must_be_positive"),
        ({"amount": "1e3"}, "invalid_money"),
        ({"amount": "NaN"}, "invalid_money"),
        ({"amount": "10.0000000000001"}, "too_precise"),
        ({"amount": "100000000000000"}, "amount_too_large"),
        ({"amount": 10}, "invalid_parameter"),
        ({"amount": "10", "method": "paypal"}, "invalid_parameter"),
        ({"amount": "10", "extra": "x"}, "invalid_parameter"),
        ({}, "invalid_parameter"),
    ],
)
async def test_bad_purchase_is_refused_and_changes_nothing(
    api: Api, client: AsyncTestClient, engine: AsyncEngine, body: dict[str, Any], code: str
) -> None:
    acct = (await api.account())["id"]
    before = await full_snapshot(engine)
    for path in ("quotes", "purchases"):
        r = await client.post(f"/v1/accounts/{acct}/{path}", json=body, headers={**ADMIN, **key()})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == code and r.json()["error"]["type"] == "invalid_request_error"
    r = await client.post(
        f"/v1/accounts/{acct}/purchases", content=b'{"amount": 10.5}', headers={**ADMIN, **key()}
    )  # a JSON float
    assert r.status_code == 400
    assert await full_snapshot(engine) == before


async def test_purchase_creates_a_payment_intent_and_no_credits_yet(
    api: Api, client: AsyncTestClient, engine: AsyncEngine, localstripe: str
) -> None:
    acct = (await api.account())["id"]
    created = await buy(client, acct, "15.00")
    purchase = created["purchase"]
    assert purchase["status"] == "pending" and purchase["account"] == acct
    assert (purchase["credits"], purchase["fee"], purchase["total"]) == ("15.00", "0.83", "15.83")
    assert purchase["pricing_version"].startswith("price_") and purchase["lot"] is None
    assert created["client_secret"].startswith(purchase["payment_intent"] + "_secret_")
    # the PaymentIntent as Stripe (the emulator) has it: amount in cents, our purchase id in the metadata
    pi = httpx.get(f"{localstripe}/v1/payment_intents/{purchase['payment_intent']}", auth=(LOCAL_API_KEY, "")).json()
    assert pi["amount"] == 1583 and pi["currency"] == "usd"
    assert pi["metadata"]["purchase_id"] == purchase["id"]
    assert (await api.balance(acct))["balance"] == "0.00"


async def test_purchase_is_idempotent(api: Api, client: AsyncTestClient, engine: AsyncEngine) -> None:
    acct = (await api.account())["id"]
    headers = {**ADMIN, **key()}
    first = await client.post(f"/v1/accounts/{acct}/purchases", json={"amount": "20"}, headers=headers)
    assert first.status_code == 201
    before = await full_snapshot(engine)
    again = await client.post(f"/v1/accounts/{acct}/purchases", json={"amount": "20"}, headers=headers)
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()
    other = await client.post(f"/v1/accounts/{acct}/purchases", json={"amount": "21"}, headers=headers)
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_reused"
    missing = await client.post(f"/v1/accounts/{acct}/purchases", json={"amount": "20"}, headers=ADMIN)
    assert missing.status_code == 400 and missing.json()["error"]["code"] == "idempotency_key_required"
    assert await full_snapshot(engine) == before


async def test_who_may_buy(api: Api, client: AsyncTestClient) -> None:
    user = (await api.account())["id"]
    other = (await api.account())["id"]
    org = (await api.account(kind="organization"))["id"]
    own = await api.token(["account"], account=user)
    org_token = await api.token(["account"], account=org)
    gateway = await api.token(["gateway"])
    support = await api.token(["support"])
    assert (await buy(client, user, "5", headers=own))["purchase"]["account"] == user
    assert (await buy(client, org, "5", headers=org_token))["purchase"]["account"] == org
    assert (await buy(client, user, "5", headers=support))["purchase"]["account"] == user
    body = {"amount": "5"}
    r = await client.post(f"/v1/accounts/{other}/purchases", json=body, headers={**own, **key()})
    assert r.status_code == 404  # another account's token: as if it did not exist
    r = await client.post(f"/v1/accounts/{org}/purchases", json=body, headers={**own, **key()})
    assert r.status_code == 404  # a user cannot buy for an organization with their own token
    r = await client.post(f"/v1/accounts/{user}/purchases", json=body, headers={**gateway, **key()})
    assert r.status_code == 403
    r = await client.post(f"/v1/accounts/{user}/quotes", json=body, headers=gateway)
    assert r.status_code == 403
    r = await client.get(f"/v1/accounts/{other}/purchases", headers=own)
    assert r.status_code == 404


async def test_history_shows_status_fee_discount_and_what_is_left_of_each_lot(
    api: Api, client: AsyncTestClient
) -> None:
    acct = (await api.account())["id"]
    paid = (await buy(client, acct, "100"))["purchase"]
    pending = (await buy(client, acct, "5", method="crypto"))["purchase"]
    assert (await pay(client, paid))["outcome"] == "credited"
    # spend some of the purchased lot
    r = await client.post(
        f"/v1/accounts/{acct}/adjustments", json={"amount": "-30.25", "reason": "usage"}, headers={**ADMIN, **key()}
    )
    assert r.status_code == 201, r.text
    r = await client.get(f"/v1/accounts/{acct}/purchases", headers=ADMIN)
    assert r.status_code == 200
    page = r.json()
    assert [p["id"] for p in page["data"]] == [pending["id"], paid["id"]]  # newest first
    latest, first = page["data"]
    assert latest["status"] == "pending" and latest["method"] == "crypto" and latest["lot"] is None
    assert first["status"] == "succeeded" and first["fee"] == "5.50" and first["discount_saving"] == "0.00"
    assert first["lot"]["amount"] == "100.00" and first["lot"]["remaining"] == "69.75"
    assert first["paid_at"] is not None and first["entry"].startswith("je_")
    r = await client.get(f"/v1/accounts/{acct}/purchases?limit=1", headers=ADMIN)
    assert r.json()["has_more"] is True and len(r.json()["data"]) == 1
    r = await client.get(f"/v1/accounts/{acct}/purchases?limit=1&starting_after={pending['id']}", headers=ADMIN)
    assert [p["id"] for p in r.json()["data"]] == [paid["id"]] and r.json()["has_more"] is False
    r = await client.get(f"/v1/purchases/{paid['id']}", headers=ADMIN)
    assert r.status_code == 200 and r.json()["lot"]["remaining"] == "69.75"


async def test_pricing_versions_tiers_and_a_purchase_keeps_its_version(
    api: Api, client: AsyncTestClient, clock_at: Any
) -> None:
    start = future_epoch()
    version = {
        "effective_from": start.isoformat(),
        "card_rate": "0.06",
        "card_minimum": "1.00",
        "tiers": [
            {"name": "standard", "min_volume": "0", "fee_discount": "0"},
            {"name": "silver", "min_volume": "500", "fee_discount": "0.1"},
            {"name": "gold", "min_volume": "1000", "fee_discount": "0.5"},
        ],
        "reason": "finance: volume tiers",
    }
    r = await client.post("/v1/pricing_versions", json=version, headers=ADMIN)
    assert r.status_code == 201, r.text
    created = r.json()
    assert [t["name"] for t in created["tiers"]] == ["standard", "silver", "gold"]
    support = await api.token(["support"])
    assert (await client.post("/v1/pricing_versions", json=version, headers=support)).status_code == 403

    clock_at(start + timedelta(days=1))
    acct = (await api.account())["id"]
    q = await quote(client, acct, "100")
    assert q["pricing_version"] == created["id"] and (q["fee"], q["total"]) == ("6.00", "106.00")
    assert q["discount"]["next_tier"] == {
        "name": "silver",
        "min_volume": "500.00",
        "fee_discount": "0.1",
        "volume_needed": "500.00",
    }
    first = (await buy(client, acct, "499.99"))["purchase"]
    assert first["pricing_version"] == created["id"]
    await pay(client, first)
    q = await quote(client, acct, "100")  # 499.99 of trailing volume: one cent short of silver
    assert q["discount"]["tier"]["name"] == "standard" and q["discount"]["next_tier"]["volume_needed"] == "0.01"
    await pay(client, (await buy(client, acct, "5"))["purchase"])
    q = await quote(client, acct, "100")  # 504.99: silver, 10% off the fee
    assert q["discount"]["tier"]["name"] == "silver"
    assert (q["fee_before_discount"], q["fee"], q["discount"]["saving"], q["total"]) == (
        "6.00",
        "5.40",
        "0.60",
        "105.40",
    )
    discounted = (await buy(client, acct, "100"))["purchase"]
    assert (discounted["fee"], discounted["discount_tier"], discounted["discount_saving"]) == ("5.40", "silver", "0.60")

    # a new version later does not reprice a purchase made before it
    later = start + timedelta(days=10)
    r = await client.post(
        "/v1/pricing_versions",
        json={"effective_from": later.isoformat(), "card_rate": "0.07", "reason": "finance: card fees rose"},
        headers=ADMIN,
    )
    assert r.status_code == 201
    clock_at(later + timedelta(days=1))
    assert (await quote(client, acct, "100"))["fee"] == "7.00"
    r = await client.get(f"/v1/purchases/{discounted['id']}", headers=ADMIN)
    assert (r.json()["fee"], r.json()["pricing_version"]) == ("5.40", created["id"])
    # 30 days after the purchases, the window no longer holds them
    clock_at(start + timedelta(days=32))
    assert (await quote(client, acct, "100"))["discount"]["trailing_volume"] == "0.00"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"card_rate": "1.5"}, "invalid_rate"),
        ({"card_rate": "0.0000001"}, "too_precise"),
        ({"card_rate": 0.05}, "invalid_parameter"),
        ({"min_purchase": "10", "max_purchase": "5"}, "invalid_purchase_bounds"),
        ({"card_minimum": "0.805"}, "amount_not_whole_cents"),
        ({"tiers": [{"name": "a", "min_volume": "1", "fee_discount": "0.1"}] * 2}, "duplicate_tier"),
        ({"tiers": [{"name": "a", "min_volume": "-1", "fee_discount": "0.1"}]}, "amount_must_not_be_negative"),
        ({"effective_from": BEYOND_YEAR_9999_UTC}, "invalid_parameter"),
    ],
)
async def test_bad_pricing_version_is_refused(client: AsyncTestClient, body: dict[str, Any], code: str) -> None:
    before = (await client.get("/v1/pricing_versions", headers=ADMIN)).json()
    r = await client.post(
        "/v1/pricing_versions",
        json={"effective_from": future_epoch().isoformat(), "reason": "test", **body},
        headers=ADMIN,
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == code, r.text
    assert (await client.get("/v1/pricing_versions", headers=ADMIN)).json() == before
