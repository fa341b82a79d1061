"""Auto top-up: below the threshold, one off-session PaymentIntent per trigger, however many charges cross
it and however many job runs race; three declines disable it; the credits come through the webhook."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
import stripe
from litestar.testing import AsyncTestClient
from sqlalchemy import text

from billing import clock
from billing.purchases.auto_topup import run_auto_topups
from billing.purchases.service import mark_for_review
from billing.settings import Settings
from billing.stripe_client import make_stripe
from tests.conftest import ADMIN, Api
from tests.gateway.conftest import Gateway
from tests.purchases.conftest import future_epoch
from tests.stripe_helpers import UNREACHABLE, event, signed_headers

PRICES = {"prompt": "0", "completion": "0", "cache_read": "0", "request": "0.30"}


async def saved_card(sdk: stripe.StripeClient, number: str) -> tuple[str, str]:
    """A Stripe customer with a card saved for off-session use (what a SetupIntent leaves behind)."""
    customer = await sdk.v1.customers.create_async()
    card = {"number": number, "exp_month": 12, "exp_year": 2030, "cvc": "123"}
    method = await sdk.v1.payment_methods.create_async({"type": "card", "card": card})  # type: ignore[typeddict-item]
    await sdk.v1.payment_methods.attach_async(method.id, {"customer": customer.id})
    return customer.id, method.id


async def intents_of(sdk: stripe.StripeClient, customer: str) -> list[Any]:
    page = await sdk.v1.payment_intents.list_async({"limit": 100})
    return [pi async for pi in page.auto_paging_iter() if pi.customer == customer]


async def setup(
    api: Api, client: AsyncTestClient, sdk: stripe.StripeClient, number: str, grant: str, amount: str = "20.00"
) -> dict[str, Any]:
    account = (await api.account())["id"]
    await api.grant(account, grant)
    customer, method = await saved_card(sdk, number)
    r = await client.put(
        f"/v1/accounts/{account}/auto_topup",
        json={
            "threshold": "5.00",
            "amount": amount,
            "stripe_customer": customer,
            "payment_method": method,
            "monthly_cap": "100.00",
            "cooldown_seconds": 60,
            "reason": "set up by phone",
        },
        headers=ADMIN,
    )
    assert r.status_code == 200, r.text
    return {"account": account, "customer": customer, "method": method, "settings": r.json()}


async def below_threshold(api: Api, client: AsyncTestClient, settings: Settings) -> tuple[Any, dict[str, Any]]:
    """A Stripe client, and an account at 1.00 with auto top-up on a good card (threshold 5.00)."""
    sdk = make_stripe(settings)
    assert sdk is not None
    return sdk, await setup(api, client, sdk, "4242424242424242", "1.00")


async def test_concurrent_charges_crossing_the_threshold_make_exactly_one_payment_intent(
    api: Api, client: AsyncTestClient, gw: Gateway, client_ctx: Any, settings: Settings
) -> None:
    sdk = make_stripe(settings)
    assert sdk is not None
    acct = await setup(api, client, sdk, "4242424242424242", "10.00")
    account = acct["account"]
    assert acct["settings"]["enabled"] is True

    # 20 charges of 0.30 at once take the balance from 10.00 to 4.00, below the 5.00 threshold.
    await asyncio.gather(
        *(
            gw.charge(account=account, usage={"prompt_tokens": 1}, prices=PRICES, finish_reason="stop")
            for _ in range(20)
        )
    )
    assert (await api.balance(account))["balance"] == "4.00"

    # Four job runs race (as concurrent workers would): exactly one attempt, one PaymentIntent.
    runs = await asyncio.gather(*(run_auto_topups(client_ctx, sdk) for _ in range(4)))
    assert sum(r.attempted for r in runs) == 1
    intents = await intents_of(sdk, acct["customer"])
    assert len(intents) == 1
    pi = intents[0]
    assert pi.status == "succeeded" and pi.payment_method == acct["method"]
    async with client_ctx.db.connect() as conn:
        attempts = (
            await conn.execute(
                text(
                    "SELECT a.status, a.payment_intent FROM auto_topup_attempts a JOIN accounts c ON c.id = a.account_id"
                    " WHERE c.public_id = :p"
                ),
                {"p": account},
            )
        ).all()
    assert [(a.status, a.payment_intent) for a in attempts] == [("pending", pi.id)]

    # While it is in flight, another run attempts nothing more.
    assert (await run_auto_topups(client_ctx, sdk)).attempted == 0

    # The webhook credits it through the normal fulfilment path; the next run marks the attempt succeeded.
    payload = event("payment_intent.succeeded", pi.to_dict())
    r = await client.post("/v1/stripe/webhooks", content=payload, headers=signed_headers(payload))
    assert r.status_code == 200, r.text
    assert (await api.balance(account))["balance"] == "24.00"
    run = await run_auto_topups(client_ctx, sdk, now=clock.now() + timedelta(hours=1))
    assert run.succeeded >= 1
    async with client_ctx.db.connect() as conn:
        status = await conn.scalar(
            text(
                "SELECT a.status FROM auto_topup_attempts a JOIN accounts c ON c.id = a.account_id"
                " WHERE c.public_id = :p"
            ),
            {"p": account},
        )
    assert status == "succeeded"
    assert len(await intents_of(sdk, acct["customer"])) == 1  # above the threshold again: nothing new


async def test_three_declines_disable_auto_topup(
    api: Api, client: AsyncTestClient, client_ctx: Any, settings: Settings
) -> None:
    sdk = make_stripe(settings)
    assert sdk is not None
    # This card attaches but every charge on it is declined (localstripe: 4000000000000341).
    acct = await setup(api, client, sdk, "4000000000000341", "1.00")
    account = acct["account"]
    now = clock.now()
    for i in range(3):
        run = await run_auto_topups(client_ctx, sdk, now=now)
        assert run.attempted == 1 and run.declined == 1, (i, run)
        # Backed off: an immediate re-run attempts nothing.
        assert (await run_auto_topups(client_ctx, sdk, now=now + timedelta(seconds=1))).attempted == 0
        now += timedelta(seconds=60 * 2 ** (i + 1) + 1)
    r = await client.get(f"/v1/accounts/{account}/auto_topup", headers=ADMIN)
    assert r.status_code == 200, r.text
    state = r.json()
    assert state["enabled"] is False and state["declines"] == 3
    assert state["disabled_reason"].startswith("3 declines in a row; last: card_declined")
    assert (await run_auto_topups(client_ctx, sdk, now=now + timedelta(days=1))).attempted == 0
    assert len(await intents_of(sdk, acct["customer"])) == 3
    assert (await api.balance(account))["balance"] == "1.00"


async def test_an_abandoned_attempt_does_not_block_auto_topup_forever(
    api: Api, client: AsyncTestClient, client_ctx: Any, settings: Settings
) -> None:
    sdk, acct = await below_threshold(api, client, settings)
    now = clock.now()
    async with client_ctx.db.begin() as conn:
        # A run that died after claiming, before Stripe answered: pending, no PaymentIntent.
        await conn.execute(
            text(
                "INSERT INTO auto_topup_attempts (account_id, status, amount, created_at)"
                " SELECT id, 'pending', 20, :at FROM accounts WHERE public_id = :p"
            ),
            {"p": acct["account"], "at": now - timedelta(minutes=5)},
        )
    assert (await run_auto_topups(client_ctx, sdk, now=now)).attempted == 0  # still in flight
    run = await run_auto_topups(client_ctx, sdk, now=now + timedelta(minutes=6))
    assert run.failed == 1 and run.attempted == 1
    assert len(await intents_of(sdk, acct["customer"])) == 1


async def attempts_of(ctx: Any, account: str) -> list[Any]:
    async with ctx.db.connect() as conn:
        return (
            await conn.execute(
                text(
                    "SELECT a.id, a.status, a.payment_intent, p.status AS purchase_status, p.payment_intent AS purchase_pi"
                    " FROM auto_topup_attempts a JOIN accounts c ON c.id = a.account_id"
                    " LEFT JOIN purchases p ON p.id = a.purchase_id WHERE c.public_id = :p ORDER BY a.id"
                ),
                {"p": account},
            )
        ).all()


async def test_the_emulator_answers_a_repeated_idempotency_key_with_the_first_answer(settings: Settings) -> None:
    sdk = make_stripe(settings)
    assert sdk is not None
    customer, method = await saved_card(sdk, "4242424242424242")
    params: Any = {"amount": 500, "currency": "usd", "customer": customer, "payment_method": method,
                   "off_session": True, "confirm": True}  # fmt: skip
    key = {"idempotency_key": f"test-{customer}"}
    first, again = [await sdk.v1.payment_intents.create_async(params, key) for _ in range(2)]
    assert again.id == first.id and first.status == "succeeded"
    other = await sdk.v1.payment_intents.create_async(params, {"idempotency_key": f"test-{customer}-2"})
    assert other.id != first.id
    assert sorted(pi.id for pi in await intents_of(sdk, customer)) == sorted([first.id, other.id])


async def test_a_run_that_died_after_stripe_charged_is_finished_with_the_same_payment_intent(
    api: Api, client: AsyncTestClient, client_ctx: Any, settings: Settings
) -> None:
    sdk, acct = await below_threshold(api, client, settings)
    now = clock.now()
    assert (await run_auto_topups(client_ctx, sdk, now=now)).attempted == 1
    (pi,) = await intents_of(sdk, acct["customer"])
    (attempt,) = await attempts_of(client_ctx, acct["account"])
    async with client_ctx.db.begin() as conn:
        # What a run that died after Stripe charged the card, before it saved the answer, leaves behind.
        await conn.execute(
            text("UPDATE auto_topup_attempts SET payment_intent = NULL WHERE id = :id"), {"id": attempt.id}
        )
        await conn.execute(
            text("UPDATE purchases SET payment_intent = NULL WHERE id = (SELECT purchase_id FROM auto_topup_attempts"
                 " WHERE id = :id)"),
            {"id": attempt.id},
        )  # fmt: skip

    # (Runs see every account's attempts: the checks below are this account's own.)
    await run_auto_topups(client_ctx, sdk, now=now + timedelta(minutes=1))  # it may still be in flight
    assert [a.payment_intent for a in await attempts_of(client_ctx, acct["account"])] == [None]
    assert (await run_auto_topups(client_ctx, sdk, now=now + timedelta(minutes=11))).resumed >= 1
    assert [(a.status, a.payment_intent, a.purchase_status, a.purchase_pi) for a in await attempts_of(
        client_ctx, acct["account"])] == [("pending", pi.id, "pending", pi.id)]  # fmt: skip
    assert [p.id for p in await intents_of(sdk, acct["customer"])] == [pi.id]  # charged once, not twice

    payload = event("payment_intent.succeeded", pi.to_dict())
    r = await client.post("/v1/stripe/webhooks", content=payload, headers=signed_headers(payload))
    assert r.status_code == 200, r.text
    assert (await api.balance(acct["account"]))["balance"] == "21.00"
    assert (await run_auto_topups(client_ctx, sdk, now=now + timedelta(minutes=12))).succeeded == 1


async def test_an_unanswered_stripe_call_leaves_the_attempt_pending_and_is_asked_again(
    api: Api, client: AsyncTestClient, client_ctx: Any, settings: Settings
) -> None:
    sdk, acct = await below_threshold(api, client, settings)
    now = clock.now()
    run = await run_auto_topups(client_ctx, UNREACHABLE, now=now)
    assert run.unanswered >= 1
    assert [
        (a.status, a.payment_intent, a.purchase_status) for a in await attempts_of(client_ctx, acct["account"])
    ] == [("pending", None, "pending")]
    # No second attempt while the first one's outcome is unknown, however long the cooldown has run.
    await run_auto_topups(client_ctx, sdk, now=now + timedelta(minutes=5))
    assert len(await attempts_of(client_ctx, acct["account"])) == 1
    assert await intents_of(sdk, acct["customer"]) == []

    assert (await run_auto_topups(client_ctx, sdk, now=now + timedelta(minutes=11))).resumed >= 1
    (pi,) = await intents_of(sdk, acct["customer"])
    assert [(a.status, a.payment_intent) for a in await attempts_of(client_ctx, acct["account"])] == [
        ("pending", pi.id)
    ]


async def test_an_attempt_older_than_stripes_idempotency_window_is_given_up(
    api: Api, client: AsyncTestClient, client_ctx: Any, settings: Settings
) -> None:
    _, acct = await below_threshold(api, client, settings)
    now = clock.now()
    assert (await run_auto_topups(client_ctx, UNREACHABLE, now=now)).unanswered >= 1
    # Stripe no longer knows the key: asking again could charge a second time. Failed; should Stripe have
    # made that payment, its webhook still credits the purchase. The balance still below the threshold, a
    # new attempt starts with a key of its own.
    await run_auto_topups(client_ctx, UNREACHABLE, now=now + timedelta(hours=24))
    assert [(a.status, a.purchase_status) for a in await attempts_of(client_ctx, acct["account"])] == [
        ("failed", "failed"),
        ("pending", "pending"),
    ]


async def test_a_purchase_in_review_holds_auto_topup_and_says_so(
    api: Api, client: AsyncTestClient, client_ctx: Any, settings: Settings
) -> None:
    sdk, acct = await below_threshold(api, client, settings)
    assert acct["settings"]["pending_attempt"] is None
    now = clock.now()
    assert (await run_auto_topups(client_ctx, sdk, now=now)).attempted == 1
    (pi,) = await intents_of(sdk, acct["customer"])
    (attempt,) = await attempts_of(client_ctx, acct["account"])
    async with client_ctx.db.begin() as conn:
        purchase = await conn.scalar(
            text("SELECT purchase_id FROM auto_topup_attempts WHERE id = :id"), {"id": attempt.id}
        )
        await mark_for_review(conn, purchase, "paid amount differs from the purchase")

    # No second payment while a person has to look at the first, however long it takes ...
    await run_auto_topups(client_ctx, sdk, now=now + timedelta(days=2))
    assert [(a.status, a.payment_intent) for a in await attempts_of(client_ctx, acct["account"])] == [
        ("pending", pi.id)
    ]
    assert [p.id for p in await intents_of(sdk, acct["customer"])] == [pi.id]
    # ... and the account's auto top-up says what it waits for.
    r = await client.get(f"/v1/accounts/{acct['account']}/auto_topup", headers=ADMIN)
    assert r.status_code == 200, r.text
    pending = r.json()["pending_attempt"]
    assert pending["purchase_status"] == "needs_review" and pending["payment_intent"] == pi.id
    assert pending["review_reason"] == "paid amount differs from the purchase"
    assert pending["purchase"].startswith("pur_")


async def test_an_amount_a_newer_pricing_refuses_disables_that_auto_topup_and_the_others_still_run(
    api: Api, client: AsyncTestClient, client_ctx: Any, settings: Settings
) -> None:
    """Saved under the pricing of its day, the amount may be refused by a newer version: retrying cannot
    help, so that account's auto top-up is disabled saying why, with no attempt left in flight."""
    sdk = make_stripe(settings)
    assert sdk is not None
    small = await setup(api, client, sdk, "4242424242424242", "1.00", amount="20.00")  # handled first
    big = await setup(api, client, sdk, "4242424242424242", "1.00", amount="60.00")
    start = future_epoch()  # finance raises the minimum purchase to 50.00
    version = {"effective_from": start.isoformat(), "min_purchase": "50", "reason": "finance: larger purchases"}
    assert (await client.post("/v1/pricing_versions", json=version, headers=ADMIN)).status_code == 201
    run = await run_auto_topups(client_ctx, sdk, now=start + timedelta(hours=1))
    assert run.attempted >= 1 and run.disabled >= 1
    assert len(await intents_of(sdk, big["customer"])) == 1
    assert await intents_of(sdk, small["customer"]) == []
    assert await attempts_of(client_ctx, small["account"]) == []  # nothing left "in flight"
    state = (await client.get(f"/v1/accounts/{small['account']}/auto_topup", headers=ADMIN)).json()
    assert state["enabled"] is False and state["pending_attempt"] is None
    assert state["disabled_reason"] == (
        "the pricing in force refuses 20.00 USD (purchase_below_minimum): The smallest purchase is 50.00 USD."
    )
    await run_auto_topups(client_ctx, sdk, now=start + timedelta(days=1))
    assert await intents_of(sdk, small["customer"]) == []


async def test_one_accounts_failure_never_stops_the_run_for_the_others(
    api: Api, client: AsyncTestClient, client_ctx: Any, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from billing.purchases import fees

    sdk = make_stripe(settings)
    assert sdk is not None
    broken = await setup(api, client, sdk, "4242424242424242", "1.00", amount="21.00")  # handled first
    fine = await setup(api, client, sdk, "4242424242424242", "1.00", amount="22.00")
    real = fees.quote

    def quote(pricing: Any, method: Any, amount: Decimal, volume: Decimal) -> Any:
        if amount == Decimal("21"):
            raise RuntimeError("database went away")
        return real(pricing, method, amount, volume)

    monkeypatch.setattr(fees, "quote", quote)
    run = await run_auto_topups(client_ctx, sdk, now=clock.now() + timedelta(hours=1))
    assert run.failed >= 1
    assert await intents_of(sdk, broken["customer"]) == []
    assert len(await intents_of(sdk, fine["customer"])) == 1


def settings_for(customer: str, method: str) -> dict[str, Any]:
    return {"threshold": "5.00", "amount": "20.00", "stripe_customer": customer, "payment_method": method}


async def test_an_account_token_cannot_top_up_with_the_card_another_account_saved(
    api: Api, client: AsyncTestClient, client_ctx: Any, settings: Settings
) -> None:
    """SPEC §7: a token never moves another account's money. A Stripe customer belongs to one account: another
    account's auto top-up naming it is refused (409), nothing is saved, and no run charges that card for it."""
    sdk = make_stripe(settings)
    assert sdk is not None
    victim = (await api.account())["id"]
    attacker = (await api.account())["id"]
    await api.grant(victim, "50.00")  # well above its threshold: its own auto top-up never runs
    as_victim = await api.token(["account"], account=victim)
    as_attacker = await api.token(["account"], account=attacker)
    customer, method = await saved_card(sdk, "4242424242424242")
    r = await client.put(f"/v1/accounts/{victim}/auto_topup", json=settings_for(customer, method), headers=as_victim)
    assert r.status_code == 200, r.text

    r = await client.put(
        f"/v1/accounts/{attacker}/auto_topup", json=settings_for(customer, method), headers=as_attacker
    )
    assert r.status_code == 409 and r.json()["error"]["code"] == "stripe_customer_of_another_account", r.text
    assert (await client.get(f"/v1/accounts/{attacker}/auto_topup", headers=as_attacker)).status_code == 404
    await run_auto_topups(client_ctx, sdk)
    charged_for_attacker = [pi for pi in await intents_of(sdk, customer) if pi.metadata["account"] == attacker]
    assert charged_for_attacker == [], f"{len(charged_for_attacker)} PaymentIntent(s) on the victim's card"


async def test_a_payment_method_not_attached_to_the_customer_is_refused(
    api: Api, client: AsyncTestClient, settings: Settings
) -> None:
    """Stripe must say the card is the customer's: another customer's card, or one Stripe does not know, is a
    400 and nothing is saved."""
    sdk = make_stripe(settings)
    assert sdk is not None
    account = (await api.account())["id"]
    own, _ = await saved_card(sdk, "4242424242424242")
    _, someone_elses = await saved_card(sdk, "4242424242424242")
    for method, code in ((someone_elses, "payment_method_not_attached"), ("pm_unknown", "no_such_payment_method")):
        body = {**settings_for(own, method), "reason": "set up by phone"}
        r = await client.put(f"/v1/accounts/{account}/auto_topup", json=body, headers=ADMIN)
        assert r.status_code == 400 and r.json()["error"]["code"] == code, r.text
    assert (await client.get(f"/v1/accounts/{account}/auto_topup", headers=ADMIN)).status_code == 404
