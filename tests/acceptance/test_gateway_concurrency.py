"""The hot path under real concurrent HTTP requests against the production server."""

import asyncio
import json
import socket
import uuid
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.acceptance.conftest import funded_with_gateway, serving
from tests.conftest import ADMIN


async def test_200_concurrent_holds_of_a_cent_against_a_dollar_admit_exactly_100(live_url: str) -> None:
    async with httpx.AsyncClient(base_url=live_url, headers=ADMIN, timeout=60) as http:
        account, gw = await funded_with_gateway(http, "1.00")
        responses = await asyncio.gather(
            *[
                http.post("/v1/holds", json={"account": account, "request_id": f"r{i}", "amount": "0.01"}, headers=gw)
                for i in range(200)
            ]
        )
        statuses = [r.status_code for r in responses]
        assert statuses.count(201) == 100 and statuses.count(402) == 100
        balance = (await http.get(f"/v1/accounts/{account}/balance")).json()
        assert (balance["held"], balance["available"]) == ("1.00", "0.00")


async def test_concurrent_charges_and_holds_never_overspend_or_deadlock(live_url: str, engine: AsyncEngine) -> None:
    async with httpx.AsyncClient(base_url=live_url, headers=ADMIN, timeout=60) as http:
        account, gw = await funded_with_gateway(http, "5.00")

        async def charge(i: int) -> httpx.Response:
            body = {"account": account, "generation_id": f"g-{account}-{i}", "cost": "0.07"}
            return await http.post("/v1/charges", json=body, headers=gw)

        async def hold_capture(i: int) -> httpx.Response:
            r = await http.post(
                "/v1/holds", json={"account": account, "request_id": f"h{i}", "amount": "0.10"}, headers=gw
            )
            if r.status_code != 201:
                return r
            body = {"generation_id": f"hg-{account}-{i}", "cost": "0.05"}
            return await http.post(f"/v1/holds/{r.json()['id']}/capture", json=body, headers=gw)

        results = await asyncio.gather(*[charge(i) if i % 2 else hold_capture(i) for i in range(150)])
        assert {r.status_code for r in results} <= {200, 201, 402}
        balance = (await http.get(f"/v1/accounts/{account}/balance")).json()
    charged = sum(1 for i, r in enumerate(results) if r.status_code == 201 and i % 2)
    captured = sum(1 for i, r in enumerate(results) if r.status_code == 200 and not i % 2)
    spent_cents = charged * 7 + captured * 5
    assert spent_cents <= 500  # never more than the credits; every admitted spend was fully covered
    assert balance["balance"] == f"{(500 - spent_cents) // 100}.{(500 - spent_cents) % 100:02d}"
    assert balance["held"] == "0.00"
    async with engine.connect() as conn:
        rows = await conn.scalar(
            text(
                "SELECT count(*) FROM generations g JOIN accounts a ON a.id = g.account_id"
                " WHERE a.public_id = :a AND g.status = 'charged'"
            ),
            {"a": account},
        )
    assert rows == charged + captured


def test_client_disconnect_leaves_all_or_nothing_and_a_retry_finds_it(live_url: str) -> None:
    with httpx.Client(base_url=live_url, headers=ADMIN, timeout=30) as http:
        account = http.post("/v1/accounts", json={"external_id": f"d_{uuid.uuid4().hex}"}).json()["id"]
        http.post(
            f"/v1/accounts/{account}/grants",
            json={"amount": "1.00", "reason": "x"},
            headers={"Idempotency-Key": uuid.uuid4().hex},
        )
        token = http.post("/v1/tokens", json={"name": "gw", "scopes": ["gateway"]}).json()["secret"]
        body = json.dumps({"account": account, "generation_id": f"gd-{account}", "cost": "0.25"}).encode()
        url = urlsplit(live_url)
        for _ in range(5):  # send and hang up without reading the answer, several times
            with socket.create_connection((url.hostname, url.port)) as s:
                s.sendall(
                    b"POST /v1/charges HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    + f"Authorization: Bearer {token}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
        retry = http.post("/v1/charges", content=body, headers={"Authorization": f"Bearer {token}"})
        assert retry.status_code == 201 and retry.json()["total_cost"] == "0.25"
        assert http.get(f"/v1/accounts/{account}/balance").json()["balance"] == "0.75"


async def test_concurrent_charges_on_one_account_admit_exactly_what_fits(live_url: str, engine: AsyncEngine) -> None:
    """Charges arriving together share a transaction (group commit); the rules still hold one by one."""
    async with httpx.AsyncClient(base_url=live_url, headers=ADMIN, timeout=60) as http:
        account, gw = await funded_with_gateway(http, "1.00")
        soon = "2027-01-01T00:00:00Z"
        r = await http.post(
            f"/v1/accounts/{account}/grants",
            json={"amount": "0.50", "reason": "early lot", "expires_at": soon},
            headers={"Idempotency-Key": uuid.uuid4().hex},
        )
        assert r.status_code == 201
        responses = await asyncio.gather(
            *[
                http.post(
                    "/v1/charges",
                    json={"account": account, "generation_id": f"hot-{account}-{i}", "cost": "0.03"},
                    headers=gw,
                )
                for i in range(100)
            ]
        )
        statuses = [r.status_code for r in responses]
        assert statuses.count(201) == 50 and statuses.count(402) == 50  # 50 × 0.03 = 1.50 of 1.50
        lots = (await http.get(f"/v1/accounts/{account}/lots")).json()["data"]
        assert [(lot["expires_at"][:10], lot["remaining"]) for lot in lots] == [
            ("2027-01-01", "0.00"),
            (lots[1]["expires_at"][:10], "0.00"),
        ]
        balance = (await http.get(f"/v1/accounts/{account}/balance")).json()
        assert balance["balance"] == "0.00" and balance["total_usage"] == "1.50"
        ledger = (await http.get(f"/v1/accounts/{account}/ledger", params={"limit": 100})).json()["data"]
    usage = [line for line in ledger if line["kind"] == "usage"]
    assert len(usage) == 50 and usage[0]["balance_after"] == "0.00"
    # Running balances step down by exactly 0.03 from entry to entry: nothing lost or doubled in a batch.
    afters = [line["balance_after"] for line in usage]
    assert afters == [f"{(n * 3) // 100}.{(n * 3) % 100:02d}" for n in range(50)]


async def test_concurrent_charges_respect_a_key_limit(live_url: str) -> None:
    async with httpx.AsyncClient(base_url=live_url, headers=ADMIN, timeout=60) as http:
        account, gw = await funded_with_gateway(http, "100.00")
        body = {"name": "k", "limit": "0.50", "reason": "test"}
        key = (await http.post(f"/v1/accounts/{account}/keys", json=body)).json()["id"]
        responses = await asyncio.gather(
            *[
                http.post("/v1/charges", json={"key": key, "generation_id": f"k-{key}-{i}", "cost": "0.02"}, headers=gw)
                for i in range(40)
            ]
        )
        statuses = [r.status_code for r in responses]
        assert statuses.count(201) == 25 and statuses.count(402) == 15
        assert {r.json()["error"]["limit_source"] for r in responses if r.status_code == 402} == {"key_limit"}
        view = (await http.get(f"/v1/keys/{key}")).json()
        assert (view["usage"], view["limit_remaining"]) == ("0.50", "0.00")


async def test_concurrent_retries_of_one_generation_charge_once(live_url: str, engine: AsyncEngine) -> None:
    async with httpx.AsyncClient(base_url=live_url, headers=ADMIN, timeout=60) as http:
        account, gw = await funded_with_gateway(http, "1.00")
        body = {"account": account, "generation_id": f"dup-{account}", "cost": "0.10"}
        responses = await asyncio.gather(*[http.post("/v1/charges", json=body, headers=gw) for _ in range(30)])
        assert {r.status_code for r in responses} == {201}
        assert len({r.text for r in responses}) == 1
        assert (await http.get(f"/v1/accounts/{account}/balance")).json()["balance"] == "0.90"


async def test_concurrent_byok_charges_pay_exactly_five_percent_of_the_excess(live_url: str) -> None:
    async with httpx.AsyncClient(base_url=live_url, headers=ADMIN, timeout=60) as http:
        account, gw = await funded_with_gateway(http, "1000.00")
        body = {"account": account, "is_byok": True, "byok_list_cost": "2000.00", "upstream_inference_cost": "1900.00"}
        responses = await asyncio.gather(
            *[
                http.post("/v1/charges", json={**body, "generation_id": f"b-{account}-{i}"}, headers=gw)
                for i in range(15)
            ]
        )
        assert {r.status_code for r in responses} == {201}
        fees = sorted((r.json()["byok_fee"] for r in responses), key=Decimal)
        # 15 × 2,000 = 30,000 of list price against a 25,000 allowance: 5% of the 5,000 above it, however
        # the requests interleave — 12 free, one straddling (1,000 above: 50.00), two fully above (100.00).
        assert fees == ["0.00"] * 12 + ["50.00", "100.00", "100.00"]
        balance = (await http.get(f"/v1/accounts/{account}/balance")).json()
        assert balance["balance"] == "750.00" and balance["total_usage"] == "250.00"


async def test_holds_and_charges_through_two_processes_admit_exactly_what_fits(
    live_url: str, database_url: str
) -> None:
    """Each process batches its own requests; what keeps two processes' batches on one account from both
    spending the same credits is the database: the balance row's lock, then a state read after it. (Three
    accounts at once, each sent 240 holds and charges of a cent alternately through the two processes:
    without the lock, at least one of them is overspent nearly every time.)"""
    with serving(database_url) as (_, other_url):
        async with (
            httpx.AsyncClient(base_url=live_url, headers=ADMIN, timeout=60) as http,
            httpx.AsyncClient(base_url=other_url, timeout=60) as other,
        ):
            accounts = [await funded_with_gateway(http, "1.00") for _ in range(3)]

            def call(account: str, gw: dict[str, str], i: int) -> Any:
                client = (http, other)[i % 2]
                if i % 4 < 2:
                    body = {"account": account, "request_id": f"two-{i}", "amount": "0.01"}
                    return client.post("/v1/holds", json=body, headers=gw)
                body = {"account": account, "generation_id": f"two-{account}-{i}", "cost": "0.01"}
                return client.post("/v1/charges", json=body, headers=gw)

            responses = await asyncio.gather(*[call(a, gw, i) for i in range(240) for a, gw in accounts])
            balances = [(await http.get(f"/v1/accounts/{a}/balance")).json() for a, _ in accounts]
    for n, balance in enumerate(balances):
        mine = responses[n :: len(accounts)]  # the account's 240, in the order they were sent
        statuses = [r.status_code for r in mine]
        assert statuses.count(201) == 100 and statuses.count(402) == 140, statuses
        charged = sum(1 for i, r in enumerate(mine) if i % 4 >= 2 and r.status_code == 201)
        assert balance["balance"] == f"{Decimal('1.00') - Decimal('0.01') * charged:.2f}"
        assert (balance["held"], balance["available"]) == (f"{Decimal('0.01') * (100 - charged):.2f}", "0.00")
