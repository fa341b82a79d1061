"""The support console (SPEC §2): a staff member signs in with a support token, finds an account, reads its
history, adjusts its balance, refunds a purchase and opens a missing-credit ticket — each through the API's
own service function, audit-logged with the staff member's token and reason."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import unquote

import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import ADMIN, Api
from tests.purchases.conftest import buy, pay
from tests.stripe_helpers import pay_at_emulator


@pytest.fixture
async def console(client: AsyncTestClient) -> AsyncIterator[AsyncTestClient]:
    """The session's client with an empty cookie jar, emptied again afterwards (the console's cookie is
    scoped to /console, and no other test goes there)."""
    client.cookies.clear()
    yield client
    client.cookies.clear()


async def sign_in(console: AsyncTestClient, api: Api, scopes: list[str] | None = None) -> Any:
    secret = (await api.token(scopes or ["support"]))["Authorization"].removeprefix("Bearer ")
    return await console.post("/console/login", data={"token": secret}, follow_redirects=False)


async def submit(console: AsyncTestClient, page: str, action: str, **fields: str) -> Any:
    """Fill in and send the form of `page` that posts to `action`, with its own hidden idempotency key."""
    form = re.search(rf'<form method="post" action="{re.escape(action)}">(.*?)</form>', page, re.S)
    assert form is not None, f"no form posting to {action}"
    key = re.search(r'name="idempotency_key" value="([0-9a-f]+)"', form.group(1))
    assert key is not None
    action = action.replace("&amp;", "&")
    return await console.post(
        action, data={"idempotency_key": key.group(1), **fields}, follow_redirects=False,
        headers={"Origin": "http://testserver.local"},
    )  # fmt: skip


async def audit(engine: AsyncEngine, account: str) -> list[tuple[str, str, str | None]]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT l.action, l.actor, l.reason FROM audit_log l JOIN accounts a ON a.id = l.account_id"
                " WHERE a.public_id = :a ORDER BY l.id"
            ),
            {"a": account},
        )
        return [(r[0], r[1], r[2]) for r in rows]


async def test_only_a_support_or_admin_token_signs_in_and_the_cookie_is_the_consoles_alone(
    api: Api, console: AsyncTestClient
) -> None:
    assert (await console.get("/console/accounts", follow_redirects=False)).headers["location"] == "/console"
    login = await console.get("/console")
    assert login.status_code == 200 and 'name="token"' in login.text

    gateway = await sign_in(console, api, ["gateway"])
    unknown = await console.post("/console/login", data={"token": "not-a-token"}, follow_redirects=False)
    for refused in (gateway, unknown):
        assert refused.status_code == 401 and "not a support token" in refused.text
        assert "billing_console" not in refused.headers.get("set-cookie", "")

    secret = (await api.token(["support"]))["Authorization"].removeprefix("Bearer ")
    planted = await console.post(
        "/console/login", data={"token": secret}, headers={"Origin": "https://elsewhere.example"},
        follow_redirects=False,
    )  # fmt: skip
    assert planted.status_code == 403 and "set-cookie" not in planted.headers
    signed = await sign_in(console, api)
    assert signed.status_code == 303 and signed.headers["location"] == "/console/accounts"
    cookie = signed.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/console" in cookie
    assert (await console.get("/console/accounts")).status_code == 200

    out = await console.post("/console/logout", follow_redirects=False)
    assert out.status_code == 303
    assert (await console.get("/console/accounts", follow_redirects=False)).headers["location"] == "/console"


async def test_finding_an_account_and_reading_it_with_everything_escaped(
    api: Api, console: AsyncTestClient, client: AsyncTestClient
) -> None:
    external = f"<script>alert(1)</script>{uuid.uuid4().hex}"
    r = await client.post("/v1/accounts", json={"external_id": external}, headers=ADMIN)
    account = r.json()["id"]
    await api.grant(account, "7.00", reason="welcome <b>bonus</b>")
    await sign_in(console, api)

    found = await console.get("/console/accounts", params={"q": external}, follow_redirects=False)
    assert found.status_code == 303 and unquote(found.headers["location"]) == f"/console/accounts/{account}"
    page = (await console.get(found.headers["location"])).text
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "welcome &lt;b&gt;bonus&lt;/b&gt;" in page and "7.00" in page
    missing = await console.get("/console/accounts", params={"q": "acct_nobody"})
    assert missing.status_code == 404 and "No account &#x27;acct_nobody&#x27;. (account_not_found)" in missing.text


async def test_an_adjustment_from_the_console_is_the_apis_audited_once_and_refused_when_wrong(
    api: Api, console: AsyncTestClient, engine: AsyncEngine
) -> None:
    account = (await api.account())["id"]
    await api.grant(account, "5.00")
    await sign_in(console, api)
    page = (await console.get(f"/console/accounts/{account}")).text
    action = f"/console/accounts/{account}/adjustments"

    done = await submit(console, page, action, amount="-1.25", reason="duplicate grant", category="compensation")
    assert done.status_code == 303 and "Done: entry je_" in unquote(done.headers["location"])
    again = await submit(console, page, action, amount="-1.25", reason="duplicate grant", category="compensation")
    assert "nothing was done twice" in unquote(again.headers["location"])  # the same form, sent twice
    assert (await api.balance(account))["balance"] == "3.75"
    [*_, (what, actor, reason)] = await audit(engine, account)
    assert (what, reason) == ("adjustment", "duplicate grant") and actor.startswith("t (")

    reused = await submit(console, page, action, amount="-2.00", reason="another", category="compensation")
    assert reused.status_code == 409 and "idempotency_key_reused" in reused.text  # a sent form is spent
    page = (await console.get(f"/console/accounts/{account}")).text
    bad = await submit(console, page, action, amount="ten dollars", reason="oops", category="compensation")
    assert bad.status_code == 400 and "flash err" in bad.text and "amount" in bad.text
    foreign = await console.post(
        action, data={"idempotency_key": uuid.uuid4().hex, "amount": "100.00", "reason": "x"},
        headers={"Origin": "https://elsewhere.example"}, follow_redirects=False,
    )  # fmt: skip
    assert foreign.status_code == 403
    console.cookies.clear()
    signed_out = await submit(console, page, action, amount="100.00", reason="x", category="compensation")
    assert signed_out.status_code == 401
    assert (await api.balance(account))["balance"] == "3.75"  # none of the three moved money


async def test_a_refund_and_a_missing_credit_ticket_from_the_console(
    api: Api, console: AsyncTestClient, client: AsyncTestClient, support_stripe: str
) -> None:
    account = (await api.account())["id"]
    paid = (await buy(client, account, "10.00"))["purchase"]
    await pay_at_emulator(support_stripe, paid["payment_intent"])
    await pay(client, paid)
    lost = (await buy(client, account, "6.00"))["purchase"]
    await pay_at_emulator(support_stripe, lost["payment_intent"])  # paid; its webhook never came
    assert (await api.balance(account))["balance"] == "10.00"
    await sign_in(console, api)
    page = (await console.get(f"/console/accounts/{account}")).text

    ticket = await submit(console, page, f"/console/accounts/{account}/tickets", payment_intent=lost["payment_intent"])
    assert ticket.status_code == 303 and ": credited" in unquote(ticket.headers["location"])
    refund = await submit(
        console, page, f"/console/purchases/{paid['id']}/refunds?account={account}", amount="4.00", reason="asked"
    )
    assert refund.status_code == 303 and "refund ref_" in unquote(refund.headers["location"]), refund.text
    assert (await api.balance(account))["balance"] == "12.00"  # 10 + 6 credited - 4 refunded

    csv = await console.get(f"/console/accounts/{account}/activity.csv")
    assert csv.status_code == 200 and csv.text.startswith("created_at,id,")


async def test_the_ledger_pages_back_through_an_accounts_whole_history(api: Api, console: AsyncTestClient) -> None:
    account = (await api.account())["id"]
    for n in range(1, 24):
        await api.grant(account, f"{n}.00", reason=f"grant number {n:02d}")
    await sign_in(console, api)
    latest = (await console.get(f"/console/accounts/{account}")).text
    assert "grant number 23" in latest and "grant number 04" in latest and "grant number 03" not in latest
    older = re.search(r'<a href="([^"]+\?ledger_after=[^"]+)">older</a>', latest)
    assert older is not None
    rest = (await console.get(older.group(1).replace("&amp;", "&"))).text
    assert all(f"grant number {n:02d}" in rest for n in (1, 2, 3)) and "grant number 04" not in rest
    assert ">older</a>" not in rest  # the first grant is the oldest entry


async def test_an_account_is_found_by_what_its_customer_quotes(
    api: Api, console: AsyncTestClient, client: AsyncTestClient, support_stripe: str
) -> None:
    """A customer writing in quotes a purchase, a Stripe receipt, a key or a generation, not an account id: each
    leads to the account it belongs to, and one that names nothing is a 404 on the search page."""
    account = (await api.account())["id"]
    other = (await api.account())["id"]
    await api.grant(account, "5.00")
    purchase = (await buy(client, account, "10.00"))["purchase"]
    key = await client.post(f"/v1/accounts/{account}/keys", json={"name": "k", "reason": "setup"}, headers=ADMIN)
    gateway = await api.token(["gateway"])
    generation = f"gen-{uuid.uuid4().hex}"
    charged = await client.post(
        "/v1/charges", json={"account": account, "generation_id": generation, "cost": "0.10"}, headers=gateway
    )
    assert charged.status_code == 201, charged.text
    await sign_in(console, api)
    for reference in (account, purchase["id"], purchase["payment_intent"], key.json()["id"], generation):
        found = await console.get("/console/accounts", params={"q": f" {reference} "}, follow_redirects=False)
        assert found.status_code == 303, (reference, found.text)
        assert unquote(found.headers["location"]) == f"/console/accounts/{account}", reference
    found = await console.get("/console/accounts", params={"q": other}, follow_redirects=False)
    assert unquote(found.headers["location"]) == f"/console/accounts/{other}"
    missing = await console.get("/console/accounts", params={"q": "pi_nothing_like_it"})
    assert missing.status_code == 404 and "pi_nothing_like_it" in missing.text
