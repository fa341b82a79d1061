"""Group commit: one batch of concurrent charges (or holds), written by one set-based statement in one
transaction, leaves exactly what the same requests one by one would have left."""

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import msgspec
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from billing.auth.principal import Principal
from billing.errors import ApiError
from billing.gateway import schemas as s
from billing.gateway.batch import BACKLOG, Batcher, ChargeBatcher, Queued, new_future
from billing.gateway.hold_batch import CaptureBatcher, HoldBatcher
from billing.jobs.expiry import expire_credits
from billing.verify import verify_ledger
from tests.conftest import ADMIN, Api
from tests.gateway.conftest import Gateway, funded

GATEWAY = Principal("tok_batch", "batch test", frozenset({"gateway"}))


def _answer(outcome: tuple[int, Any, bool] | BaseException) -> tuple[int, Any, bool]:
    """(status, body, replayed), an ApiError included; anything else raised is a failure."""
    if isinstance(outcome, ApiError):
        return outcome.status, outcome.body(), False
    assert not isinstance(outcome, BaseException), outcome
    return outcome


def _charge(**body: Any) -> s.CreateCharge:
    body.setdefault("generation_id", f"gen-{uuid.uuid4().hex}")
    return msgspec.convert(body, s.CreateCharge)


async def test_one_batch_of_mixed_charges_writes_what_single_charges_would(
    api: Api, client: AsyncTestClient, client_ctx: Any, engine: AsyncEngine, clock_at: Any
) -> None:
    clock_at(datetime(2026, 11, 20, 12, tzinfo=UTC))
    two_lots = await funded(api, "0.50")
    await api.grant(two_lots, "0.50")  # two lots of 0.50: the charges below cross from one into the other
    keyed = await funded(api, "10.00")
    key = (
        await client.post(
            f"/v1/accounts/{keyed}/keys", json={"reason": "test", "name": "k", "limit": "0.50"}, headers=ADMIN
        )
    ).json()
    byok = await funded(api, "100.00")
    repeated = _charge(account=two_lots, cost="0.30")
    charges = [
        repeated,
        _charge(account=two_lots, cost="0.40"),
        _charge(account=two_lots, cost="0.50"),  # 0.30 left: refused, credits
        repeated,  # the same generation again, inside the same batch: charged once
        _charge(account=two_lots, cost="0.30"),  # exactly what is left
        _charge(key=key["id"], cost="0.20"),
        _charge(key=key["id"], cost="0.20"),
        _charge(key=key["id"], cost="0.20"),  # 0.10 left under the key's limit: refused, key_limit
        *(_charge(account=byok, is_byok=True, byok_list_cost=cost) for cost in ("9000.00", "9000.00", "6990.00")),
        _charge(account=byok, is_byok=True, byok_list_cost="20.00"),  # straddles the $25,000 allowance
        _charge(account="acct_does_not_exist", cost="0.01"),
    ]
    assert (await ChargeBatcher(client_ctx).charge(GATEWAY, charges[0]))[0] == 201  # a batch of one, alone
    batcher = ChargeBatcher(client_ctx)  # the rest arrive together: one batch
    outcomes = [
        _answer(o)
        for o in await asyncio.gather(*(batcher.charge(GATEWAY, c) for c in charges[1:]), return_exceptions=True)
    ]

    statuses = [o[0] for o in outcomes]
    assert statuses == [201, 402, 201, 201, 201, 201, 402, 201, 201, 201, 201, 404]
    assert outcomes[1][1]["error"]["limit_source"] == "credits"
    assert outcomes[6][1]["error"]["limit_source"] == "key_limit"
    assert outcomes[2][2] is True  # the repeated generation was answered from its record
    assert outcomes[10][1].byok_fee == "0.50"  # 5% of the 10 above the allowance

    assert (await api.balance(two_lots))["balance"] == "0.00"
    assert (await api.balance(keyed))["balance"] == "9.60"
    assert (await api.balance(byok))["balance"] == "99.50"
    view = (await client.get(f"/v1/keys/{key['id']}", headers=ADMIN)).json()
    assert (view["usage"], view["usage_daily"], view["limit_remaining"]) == ("0.40", "0.40", "0.10")

    written = [o[1].entry for o in outcomes if o[0] == 201 and not o[2] and o[1].entry]
    async with engine.connect() as conn:
        ids = [int(e.removeprefix("je_")) for e in written]
        # every entry of the batch was written by one transaction
        assert await conn.scalar(
            text("SELECT count(DISTINCT xmin::text) FROM journal_entries WHERE id = ANY(:ids)"), {"ids": ids}
        ) == 1  # fmt: skip
        postings = (
            await conn.execute(
                text(
                    "SELECT p.amount, p.balance_after, p.lot_id FROM postings p JOIN accounts a ON a.id = p.account_id"
                    " WHERE a.public_id = :a AND p.entry_id = ANY(:ids) ORDER BY p.id"
                ),
                {"a": two_lots, "ids": ids},
            )
        ).all()
        lots = (
            await conn.execute(
                text(
                    "SELECT l.remaining FROM lots l JOIN accounts a ON a.id = l.account_id WHERE a.public_id = :a"
                    " ORDER BY l.id"
                ),
                {"a": two_lots},
            )
        ).scalars().all()  # fmt: skip
        month = (
            await conn.execute(
                text(
                    "SELECT m.list_usage, m.requests, m.fees FROM byok_months m JOIN accounts a ON a.id = m.account_id"
                    " WHERE a.public_id = :a"
                ),
                {"a": byok},
            )
        ).one()
        generations = await conn.scalar(
            text("SELECT count(*) FROM generations WHERE generation_id = :g"), {"g": repeated.generation_id}
        )
        assert await verify_ledger(conn) == {}
    # the first charge (0.30, alone) took the first lot down to 0.20; the batch's 0.40 takes that 0.20 and
    # 0.20 of the second lot; its last 0.30 empties the second; running balances follow posting order
    assert [(p.amount, p.balance_after) for p in postings] == [
        (Decimal("-0.2"), Decimal("0.5")),
        (Decimal("-0.2"), Decimal("0.3")),
        (Decimal("-0.3"), Decimal("0.0")),
    ]
    assert postings[0].lot_id != postings[1].lot_id and postings[1].lot_id == postings[2].lot_id
    assert lots == [Decimal("0"), Decimal("0")]
    assert month == (Decimal("25010"), 4, Decimal("0.5"))
    assert generations == 1


async def test_one_batch_admits_byok_charges_against_a_key_limit_that_includes_byok(
    api: Api, client: AsyncTestClient, client_ctx: Any
) -> None:
    """A key that includes BYOK in its limit: in one batch each BYOK charge needs room for its list-price cost
    (and fee) under the limit as the batch's earlier charges left it, as when charged on its own."""
    account = await funded(api, "10.00")
    key = (
        await client.post(
            f"/v1/accounts/{account}/keys",
            json={"name": "k", "limit": "1.00", "include_byok_in_limit": True, "reason": "test"},
            headers=ADMIN,
        )
    ).json()["id"]  # fmt: skip
    charges = [
        _charge(key=key, is_byok=True, byok_list_cost="0.60"),
        _charge(key=key, is_byok=True, byok_list_cost="0.60"),  # 0.40 left: refused, key_limit
        _charge(key=key, cost="0.30"),
        _charge(key=key, is_byok=True, byok_list_cost="0.20"),  # 0.10 left: refused
        _charge(key=key, is_byok=True, byok_list_cost="0.10"),  # exactly what is left
    ]
    batcher = ChargeBatcher(client_ctx)
    outcomes = [
        _answer(o) for o in await asyncio.gather(*(batcher.charge(GATEWAY, c) for c in charges), return_exceptions=True)
    ]

    assert [o[0] for o in outcomes] == [201, 402, 201, 402, 201]
    assert [(outcomes[i][1]["error"]["limit_source"], outcomes[i][1]["error"]["available"]) for i in (1, 3)] == [
        ("key_limit", "0.40"),
        ("key_limit", "0.10"),
    ]
    view = (await client.get(f"/v1/keys/{key}", headers=ADMIN)).json()
    assert (view["byok_usage"], view["usage"], view["limit_remaining"]) == ("0.70", "0.30", "0.00")
    assert (await api.balance(account))["balance"] == "9.70"


async def test_one_batch_of_holds_admits_in_arrival_order_against_credits_and_key_limits(
    api: Api, client: AsyncTestClient, client_ctx: Any, engine: AsyncEngine
) -> None:
    account = await funded(api, "1.00")
    keyed = await funded(api, "10.00")
    key = (
        await client.post(
            f"/v1/accounts/{keyed}/keys", json={"reason": "test", "name": "k", "limit": "0.50"}, headers=ADMIN
        )
    ).json()
    repeated = msgspec.convert({"account": account, "request_id": "req-repeated", "amount": "0.40"}, s.CreateHold)
    holds = [
        repeated,
        msgspec.convert({"account": account, "request_id": "req-2", "amount": "0.40"}, s.CreateHold),
        msgspec.convert({"account": account, "request_id": "req-3", "amount": "0.40"}, s.CreateHold),  # 0.20 left
        repeated,  # the same request again, inside the same batch: one hold
        msgspec.convert({"account": account, "request_id": "req-4", "amount": "0.20"}, s.CreateHold),  # exactly
        msgspec.convert({"key": key["id"], "request_id": "req-k1", "amount": "0.30"}, s.CreateHold),
        msgspec.convert({"key": key["id"], "request_id": "req-k2", "amount": "0.30"}, s.CreateHold),  # over limit
        msgspec.convert({"account": "acct_does_not_exist", "request_id": "req-x", "amount": "0.01"}, s.CreateHold),
    ]
    batcher = HoldBatcher(client_ctx)
    outcomes = [
        _answer(o) for o in await asyncio.gather(*(batcher.hold(GATEWAY, h) for h in holds), return_exceptions=True)
    ]

    assert [o[0] for o in outcomes] == [201, 201, 402, 201, 201, 201, 402, 404]
    assert outcomes[2][1]["error"]["limit_source"] == "credits"
    assert outcomes[6][1]["error"]["limit_source"] == "key_limit"
    assert outcomes[3][2] is True and outcomes[3][1].id == outcomes[0][1].id  # the repeat replays the first
    balance = await api.balance(account)
    assert (balance["held"], balance["available"]) == ("1.00", "0.00")
    view = (await client.get(f"/v1/keys/{key['id']}", headers=ADMIN)).json()
    assert view["limit_remaining"] == "0.20"  # an open hold counts against the key's limit
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                text(
                    "SELECT h.request_id, h.status, h.amount, h.xmin::text AS tx FROM holds h"
                    " JOIN accounts a ON a.id = h.account_id WHERE a.public_id IN (:a, :k) ORDER BY h.id"
                ),
                {"a": account, "k": keyed},
            )
        ).all()
    assert [(r.request_id, r.status, r.amount) for r in rows] == [
        ("req-repeated", "open", Decimal("0.4")),
        ("req-2", "open", Decimal("0.4")),
        ("req-3", "refused", Decimal("0.4")),
        ("req-4", "open", Decimal("0.2")),
        ("req-k1", "open", Decimal("0.3")),
        ("req-k2", "refused", Decimal("0.3")),
    ]
    assert len({r.tx for r in rows}) == 1  # one transaction wrote them all


async def test_one_batch_of_captures_charges_each_once_and_closes_its_holds(
    api: Api, gw: Gateway, client: AsyncTestClient, client_ctx: Any, engine: AsyncEngine, clock_at: Any
) -> None:
    clock_at(datetime(2026, 11, 20, 12, tzinfo=UTC))
    account = await funded(api, "1.00")
    keyed = await funded(api, "10.00")
    key = (
        await client.post(
            f"/v1/accounts/{keyed}/keys", json={"reason": "test", "name": "k", "limit": "1.00"}, headers=ADMIN
        )
    ).json()
    h1, h2, h3 = [(await gw.hold(account=account, amount=a)).json()["id"] for a in ("0.40", "0.40", "0.10")]
    short = (await gw.hold(account=account, amount="0.05", timeout_seconds=60)).json()["id"]
    by_key = (await gw.hold(key=key["id"], amount="0.20")).json()["id"]
    clock_at(datetime(2026, 11, 20, 12, 2, tzinfo=UTC))  # `short` expired a minute ago; the others run 10 min

    tag = uuid.uuid4().hex

    def capture(cost: str, generation_id: str) -> s.Capture:
        return msgspec.convert({"generation_id": f"{tag}-{generation_id}", "cost": cost}, s.Capture)

    first = capture("0.50", "gen-c1")  # more than held: charged anyway
    captures = [
        (h1, first),
        (h2, capture("0.30", "gen-c2")),  # less than held: the rest is released
        (h1, first),  # the same capture again, inside the same batch: charged once
        (h3, capture("0.30", "gen-c3")),  # beyond the balance: a capture still charges (into debt)
        (short, capture("0.01", "gen-c4")),  # expired: 409
        (by_key, capture("0.25", "gen-c5")),
        ("hold_999999999", capture("0.01", "gen-c6")),  # unknown: 404
    ]
    batcher = CaptureBatcher(client_ctx)
    outcomes = [
        _answer(o)
        for o in await asyncio.gather(*(batcher.capture(GATEWAY, h, c) for h, c in captures), return_exceptions=True)
    ]

    assert [o[0] for o in outcomes] == [200, 200, 200, 200, 409, 200, 404]
    assert outcomes[4][1]["error"]["code"] == "hold_expired"
    assert outcomes[2][2] is True and outcomes[2][1].generation.id == f"{tag}-gen-c1"  # replayed from the record
    assert [outcomes[i][1].generation.total_cost for i in (0, 1, 3, 5)] == ["0.50", "0.30", "0.30", "0.25"]
    assert {outcomes[i][1].hold.status for i in (0, 1, 3, 5)} == {"captured"}
    balance = await api.balance(account)
    assert (balance["balance"], balance["held"]) == ("-0.10", "0.00")  # `short` expired: no longer held
    view = (await client.get(f"/v1/keys/{key['id']}", headers=ADMIN)).json()
    assert (view["usage"], view["limit_remaining"]) == ("0.25", "0.75")
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                text(
                    "SELECT g.generation_id, h.status, g.xmin::text AS tx FROM generations g"
                    " JOIN holds h ON h.id = g.hold_id WHERE g.generation_id LIKE :tagged ORDER BY g.id"
                ),
                {"tagged": f"{tag}-%"},
            )
        ).all()
        assert await verify_ledger(conn) == {}
    assert [(r.generation_id.removeprefix(f"{tag}-"), r.status) for r in rows] == [
        ("gen-c1", "captured"),
        ("gen-c2", "captured"),
        ("gen-c3", "captured"),
        ("gen-c5", "captured"),
    ]
    assert len({r.tx for r in rows}) == 1  # one transaction captured them all


async def test_a_capture_naming_a_taken_generation_id_is_409_and_its_batch_still_captures_the_rest(
    api: Api, gw: Gateway, client_ctx: Any, engine: AsyncEngine
) -> None:
    """A capture in a batch naming a generation id recorded already — by a charge, or by an earlier capture in
    the same batch — is answered 409 on its own and writes nothing; the batch's other captures commit together."""
    account = await funded(api, "1.00")
    charged = f"gen-{uuid.uuid4().hex}"
    await gw.charge(account=account, generation_id=charged, cost="0.10")
    h1, h2, h3, h4 = [(await gw.hold(account=account, amount="0.10")).json()["id"] for _ in range(4)]
    tag = uuid.uuid4().hex

    def capture(generation_id: str) -> s.Capture:
        return msgspec.convert({"generation_id": generation_id, "cost": "0.10"}, s.Capture)

    captures = [
        (h1, capture(f"{tag}-1")),
        (h2, capture(charged)),  # a charge's generation id
        (h3, capture(f"{tag}-1")),  # the generation id h1's capture takes in this batch
        (h4, capture(f"{tag}-4")),
    ]
    batcher = CaptureBatcher(client_ctx)
    outcomes = [
        _answer(o)
        for o in await asyncio.gather(*(batcher.capture(GATEWAY, h, c) for h, c in captures), return_exceptions=True)
    ]

    assert [o[0] for o in outcomes] == [200, 409, 409, 200]
    assert {outcomes[i][1]["error"]["code"] for i in (1, 2)} == {"idempotency_key_reused"}
    balance = await api.balance(account)
    assert (balance["balance"], balance["held"]) == ("0.70", "0.20")  # h2 and h3 still open
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                text(
                    "SELECT g.generation_id, g.hold_id, g.xmin::text AS tx FROM generations g"
                    " WHERE g.generation_id LIKE :tagged OR g.generation_id = :charged ORDER BY g.id"
                ),
                {"tagged": f"{tag}-%", "charged": charged},
            )
        ).all()
    assert [(r.generation_id, r.hold_id) for r in rows] == [
        (charged, None),
        (f"{tag}-1", int(h1.removeprefix("hold_"))),
        (f"{tag}-4", int(h4.removeprefix("hold_"))),
    ]
    assert rows[1].tx == rows[2].tx  # one transaction captured both: the batch did not fail as a whole


class Recording(Batcher[Queued]):
    """Records each batch's payers and how many batches were in flight at once; the first batch stays in
    flight until `release` is set."""

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.release = asyncio.Event()
        self.batches: list[list[str]] = []
        self.in_flight = self.most_in_flight = 0
        self.later_batch_s = 0.0  # how long every later batch stays in flight
        self.release_second: asyncio.Event | None = None  # if set, the second batch stays until it is set

    async def _run(self, batch: list[Queued]) -> None:
        self.batches.append([str(item.payer) for item in batch])
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if len(self.batches) == 1:
                await self.release.wait()
            elif len(self.batches) == 2 and self.release_second is not None:
                await self.release_second.wait()
            else:
                await asyncio.sleep(self.later_batch_s)  # every later batch is in flight for a moment too
        finally:
            self.in_flight -= 1
        for item in batch:
            item.future.set_result((200, item.payer, False))


def _submit(batcher: Batcher[Queued], payer: str) -> asyncio.Future[tuple[int, Any, bool]]:
    return batcher.enqueue(Queued(GATEWAY, new_future(), payer))


async def _turns(n: int = 10) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_requests_arriving_during_a_batch_wait_and_go_together_into_the_next(client_ctx: Any) -> None:
    """One batch in flight: whatever arrives meanwhile, for any payer, waits for it and then goes in one
    (short of a backlog: one request fewer than would start a second batch)."""
    batcher = Recording(client_ctx)
    batcher.late_after = 3600.0  # never late here, however slow the machine running the test
    batcher.backlog = 4  # the three other payers below stay one short of it
    first = _submit(batcher, "a")
    await _turns()
    later = [_submit(batcher, p) for p in ("b", "c", "a", "d")]
    await _turns()
    assert batcher.batches == [["a"]]  # nobody went ahead of the batch in flight
    batcher.release.set()
    answers = await asyncio.gather(first, *later)
    assert batcher.batches == [["a"], ["b", "c", "a", "d"]]
    assert [a[1] for a in answers] == ["a", "b", "c", "a", "d"]
    assert batcher.most_in_flight == 1


async def test_a_backlog_of_other_payers_goes_in_a_second_batch(client_ctx: Any) -> None:
    """While a batch is in flight, fewer than `backlog` waiting requests wait for it; the `backlog`-th request
    of other payers starts a second batch with all of them. Requests for the payer in flight never count, and
    once no backlog is left the second batch's drain retires: back to one batch in flight."""
    batcher = Recording(client_ctx)
    batcher.late_after = 3600.0  # never late here: only the backlog rule is at work
    backlog = batcher.backlog = 6
    batcher.release_second = asyncio.Event()
    first = _submit(batcher, "a")
    await _turns()
    same_payer = [_submit(batcher, "a") for _ in range(backlog)]
    others = [_submit(batcher, f"p{i}") for i in range(backlog - 1)]
    await _turns()
    assert batcher.batches == [["a"]]  # backlog - 1 others wait: not yet worth a second transaction
    others.append(_submit(batcher, "p-last"))
    await _turns()
    assert batcher.batches == [["a"], [f"p{i}" for i in range(backlog - 1)] + ["p-last"]]
    assert batcher.most_in_flight == 2
    few = [_submit(batcher, f"q{i}") for i in range(3)]  # arrive while both are in flight: no backlog
    await _turns()
    batcher.release_second.set()
    answered = await asyncio.wait_for(asyncio.gather(*others), timeout=10)  # while the first is still in flight
    assert [a[1] for a in answered] == [f"p{i}" for i in range(backlog - 1)] + ["p-last"]
    await _turns()
    assert batcher.running == 1 and len(batcher.batches) == 2  # the second retired; the few wait for the first
    assert not first.done() and not any(f.done() for f in same_payer + few)

    batcher.release.set()
    await asyncio.gather(first, *same_payer, *few)
    assert batcher.batches[2:] == [["a"] * backlog + ["q0", "q1", "q2"]]
    assert batcher.running == 0 and batcher.most_in_flight == 2


async def test_a_late_batch_lets_other_payers_go_ahead_never_its_own(client_ctx: Any) -> None:
    """A batch in flight for `late_after` is stuck, not busy: the requests waiting for other payers go ahead
    in another batch (here with no further request arriving to notice it), the stuck payer's wait for it,
    and once it is answered the batcher is back to one batch in flight."""
    batcher = Recording(client_ctx)
    batcher.late_after = 0.02
    batcher.backlog = 10**6  # only the lateness rule at work
    first = _submit(batcher, "hot")
    await _turns()
    later = [_submit(batcher, p) for p in ("hot", "other", "hot")]
    other = await asyncio.wait_for(later[1], timeout=10)  # answered while the first batch is still stuck
    assert other[1] == "other"
    assert not first.done() and not later[0].done()
    assert batcher.batches == [["hot"], ["other"]]

    batcher.release.set()
    answers = await asyncio.gather(first, *later)
    assert [a[1] for a in answers] == ["hot", "hot", "other", "hot"]
    assert batcher.batches == [["hot"], ["other"], ["hot", "hot"]]
    assert batcher.running == 0 and not batcher.busy


async def test_batches_started_beside_a_late_one_retire_once_none_is_late(client_ctx: Any) -> None:
    """Requests arrive faster than batches finish (the queue never empties). While the first batch is stuck,
    others run beside it; once it is answered and nothing is late, the batcher is back to one in flight."""
    batcher = Recording(client_ctx)
    batcher.late_after = 0.02
    batcher.later_batch_s = 0.002
    batcher.backlog = 10**6  # only the lateness rule at work
    arrived: list[asyncio.Future[tuple[int, Any, bool]]] = []

    async def arrivals(n: int) -> None:
        for _ in range(n):
            arrived.append(_submit(batcher, f"p{len(arrived) % 3}"))
            await asyncio.sleep(0.0005)

    first = _submit(batcher, "hot")
    await arrivals(200)
    assert not first.done() and any(f.done() for f in arrived)  # others went ahead of the stuck batch
    assert batcher.most_in_flight > 1
    batcher.late_after = 3600.0  # from here nothing is late, however slow the machine
    batcher.release.set()
    await first
    await arrivals(50)  # the extra batches finish what they hold and retire
    batcher.most_in_flight = batcher.in_flight
    await arrivals(200)
    await asyncio.gather(*arrived)
    assert batcher.most_in_flight == 1
    assert batcher.running == 0


async def _lock_balance(conn: AsyncConnection, account: str) -> None:
    """Hold the account's balance row locked on `conn` (as a long support adjustment or a stalled session
    would) until its transaction ends."""
    await conn.execute(
        text(
            "SELECT b.balance FROM balances b JOIN accounts a ON a.id = b.account_id WHERE a.public_id = :p FOR UPDATE"
        ),
        {"p": account},
    )


async def test_holds_and_captures_waiting_behind_a_batch_go_in_the_next_one_backlog_or_not(
    api: Api, gw: Gateway, client_ctx: Any, engine: AsyncEngine
) -> None:
    """Unlike charges, holds and captures start no second batch for a backlog: a hold batch and a capture
    batch in flight are two transactions beside each other already. Requests of other payers that wait
    behind a batch stuck on a row lock go together in the next batch once it is done."""
    stuck_on, *others = [await funded(api, "1.00") for _ in range(7)]
    holds = [(await gw.hold(account=account, amount="0.10")).json()["id"] for account in [stuck_on, *others]]
    tag = uuid.uuid4().hex
    for kind in ("hold", "capture"):
        batcher: HoldBatcher | CaptureBatcher = (
            HoldBatcher(client_ctx) if kind == "hold" else CaptureBatcher(client_ctx)
        )
        batcher.late_after = 3600.0  # never late here: only the backlog rule is at work

        def call(n: int, account: str, batcher: HoldBatcher | CaptureBatcher = batcher) -> Any:
            if isinstance(batcher, HoldBatcher):
                data = {"account": account, "request_id": f"{tag}-{n}", "amount": "0.10"}
                return batcher.hold(GATEWAY, msgspec.convert(data, s.CreateHold))
            capture = msgspec.convert({"generation_id": f"{tag}-{n}", "cost": "0.05"}, s.Capture)
            return batcher.capture(GATEWAY, holds[n], capture)

        async with engine.connect() as holder:
            await _lock_balance(holder, stuck_on)
            stuck = asyncio.ensure_future(call(0, stuck_on))
            await _turns()
            assert batcher.running == 1 and not batcher.pending  # the first batch is in flight, on the lock
            waiting = [asyncio.ensure_future(call(n, account)) for n, account in enumerate(others, start=1)]
            await _turns()
            assert len(batcher.pending) == len(waiting) > BACKLOG  # enough to start a second charge batch
            assert batcher.running == 1, f"a second {kind} batch started for a backlog"
            await holder.rollback()
        answers = await asyncio.wait_for(asyncio.gather(stuck, *waiting), timeout=30)
        assert {a[0] for a in answers} == {201 if kind == "hold" else 200}
    async with engine.connect() as conn:
        written = (
            await conn.execute(
                text(
                    "SELECT 'hold' AS kind, request_id AS id, xmin::text AS tx FROM holds WHERE request_id LIKE :t"
                    " UNION ALL SELECT 'capture', generation_id, xmin::text FROM generations"
                    " WHERE generation_id LIKE :t"
                ),
                {"t": f"{tag}-%"},
            )
        ).all()
    for kind in ("hold", "capture"):
        by_tx = {r.tx for r in written if r.kind == kind and r.id != f"{tag}-0"}
        assert len(by_tx) == 1, f"the {kind}s that waited went in {len(by_tx)} batches"


async def waiting_on_a_lock(engine: AsyncEngine, gone: asyncio.Future[Any] | None = None) -> bool:
    """Whether a session of this test database comes to wait on a lock within 5 s (checked every 10 ms; not
    once `gone`, the call expected to wait, has ended)."""
    async with engine.connect() as watcher:
        for _ in range(500):
            waiting = await watcher.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND datname = current_database()"
                )
            )
            await watcher.rollback()  # (each check in a transaction of its own: pg_stat_activity is a snapshot)
            if waiting or (gone is not None and gone.done()):
                return bool(waiting)
            await asyncio.sleep(0.01)
    return False


async def test_a_charge_stuck_on_a_locked_account_does_not_hold_up_other_accounts(
    api: Api, client_ctx: Any, engine: AsyncEngine
) -> None:
    """Real charges: one account's balance row is held by another transaction (as a long support
    adjustment or a stalled session would); charges on other accounts are answered meanwhile, and the stuck
    one lands once the lock is gone."""
    locked, free = await funded(api, "1.00"), await funded(api, "1.00")
    batcher = ChargeBatcher(client_ctx)
    async with engine.connect() as holder:
        await _lock_balance(holder, locked)
        stuck = asyncio.ensure_future(batcher.charge(GATEWAY, _charge(account=locked, cost="0.10")))
        assert await waiting_on_a_lock(engine), "the charge never waited on the locked row"
        answers = await asyncio.wait_for(
            asyncio.gather(*(batcher.charge(GATEWAY, _charge(account=free, cost="0.10")) for _ in range(3))),
            timeout=30,
        )
        assert [a[0] for a in answers] == [201, 201, 201]
        assert not stuck.done()
        await holder.rollback()
    assert (await stuck)[0] == 201
    assert (await api.balance(free))["balance"] == "0.70"
    assert (await api.balance(locked))["balance"] == "0.90"


async def test_a_batched_capture_pays_from_the_lot_its_hold_reserved_before_it_expired(
    api: Api, gw: Gateway, client_ctx: Any, clock_at: Any
) -> None:
    """As a single capture (SPEC §5 Holds, Expiry): a hold made before its lot expired is captured from
    that lot, and expiry, before or after the capture, takes only what no open hold reserves."""
    expiry = datetime(2026, 11, 20, 12, tzinfo=UTC)
    clock_at(expiry - timedelta(days=10))
    before, after = (await api.account())["id"], (await api.account())["id"]
    for account in (before, after):
        await api.grant(account, "10.00", expires_at=expiry.isoformat())
    clock_at(expiry - timedelta(minutes=1))
    holds = {a: (await gw.hold(account=a, amount="5.00")).json()["id"] for a in (before, after)}
    await expire_credits(client_ctx, now=expiry + timedelta(seconds=30), dry_run=False)  # `before`: expired first
    clock_at(expiry + timedelta(minutes=1))
    tag = uuid.uuid4().hex
    batcher = CaptureBatcher(client_ctx)
    outcomes = await asyncio.gather(
        *(
            batcher.capture(
                GATEWAY, holds[a], msgspec.convert({"generation_id": f"{tag}-{a}", "cost": "5.00"}, s.Capture)
            )
            for a in (before, after)
        )
    )
    assert [_answer(o)[0] for o in outcomes] == [200, 200]
    await expire_credits(client_ctx, now=expiry + timedelta(minutes=2))
    assert [(await api.balance(a))["balance"] for a in (before, after)] == ["0.00", "0.00"]
