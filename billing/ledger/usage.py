"""The gateway's rules as pure functions: what a generation costs, whether a request may spend, key limit
periods, the BYOK fee, and the usage entry. No I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal

from billing.ledger import outcomes
from billing.ledger.lots import consume, reserved_by
from billing.ledger.model import Customer, Entry, EntryKind, Hold, LotBalance, Platform, Posting
from billing.ledger.money import QUANTUM, ZERO, format_money
from billing.ledger.outcomes import Refused

# No single generation may cost more than this: a larger figure is a bug upstream, not a real request.
MAX_REQUEST_COST = Decimal("10000")
MAX_TOKENS = 100_000_000


@dataclass(frozen=True, slots=True)
class Prices:
    """USD per unit, exact decimals (per token, per request, per web-search result)."""

    prompt: Decimal = ZERO
    completion: Decimal = ZERO
    cache_read: Decimal = ZERO
    cache_write: Decimal = ZERO
    reasoning: Decimal = ZERO
    request: Decimal = ZERO
    web_search: Decimal = ZERO


@dataclass(frozen=True, slots=True)
class TokenUsage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    web_search_results: int = 0


@dataclass(frozen=True, slots=True)
class Cost:
    total: Decimal
    cache_discount: Decimal
    insured: bool  # zero completion insurance waived the token cost


def zero_completion(usage: TokenUsage, finish_reason: str | None) -> bool:
    """Zero completion insurance (SPEC §5): no output tokens and a blank or error finish reason."""
    return usage.completion_tokens == 0 and (not (finish_reason or "").strip() or finish_reason == "error")


def cost_of(usage: TokenUsage, prices: Prices, finish_reason: str | None) -> Cost:
    """Exact cost: tokens × per-token prices (12-decimal prices × integers stay exact), plus per-request
    and web-search charges. Cached prompt tokens are priced at the cache-read price; `cache_discount` is
    what caching saved against the prompt price. Insured generations pay only the extra services.
    """
    insured = zero_completion(usage, finish_reason)
    tokens = ZERO
    if not insured:
        tokens = (
            usage.prompt_tokens * prices.prompt
            + usage.completion_tokens * prices.completion
            + usage.cache_read_tokens * prices.cache_read
            + usage.cache_write_tokens * prices.cache_write
            + usage.reasoning_tokens * prices.reasoning
        )
    extras = prices.request + usage.web_search_results * prices.web_search
    discount = ZERO if insured else usage.cache_read_tokens * (prices.prompt - prices.cache_read)
    return Cost(total=tokens + extras, cache_discount=discount, insured=insured)


# --- key limits ----------------------------------------------------------------------------------


def period_starts(now: datetime) -> tuple[date, date, date]:
    """UTC day, week (Monday–Sunday) and calendar month containing `now`; each resets at 00:00 UTC."""
    day = now.astimezone(UTC).date()
    return day, day - timedelta(days=day.weekday()), day.replace(day=1)


@dataclass(frozen=True, slots=True)
class KeyUsage:
    """A key's counters as stored: each period counter is valid only for the period that starts on its date."""

    usage_total: Decimal = ZERO
    byok_total: Decimal = ZERO
    day_start: date | None = None
    usage_day: Decimal = ZERO
    byok_day: Decimal = ZERO
    week_start: date | None = None
    usage_week: Decimal = ZERO
    byok_week: Decimal = ZERO
    month_start: date | None = None
    usage_month: Decimal = ZERO
    byok_month: Decimal = ZERO

    def current(self, now: datetime) -> KeyUsage:
        """The counters as of `now`: a counter from an earlier period reads as zero."""
        day, week, month = period_starts(now)
        same_day, same_week, same_month = self.day_start == day, self.week_start == week, self.month_start == month
        return KeyUsage(
            self.usage_total,
            self.byok_total,
            day,
            self.usage_day if same_day else ZERO,
            self.byok_day if same_day else ZERO,
            week,
            self.usage_week if same_week else ZERO,
            self.byok_week if same_week else ZERO,
            month,
            self.usage_month if same_month else ZERO,
            self.byok_month if same_month else ZERO,
        )

    def plus(self, now: datetime, usage: Decimal, byok: Decimal) -> KeyUsage:
        c = self.current(now)
        return KeyUsage(
            c.usage_total + usage,
            c.byok_total + byok,
            c.day_start,
            c.usage_day + usage,
            c.byok_day + byok,
            c.week_start,
            c.usage_week + usage,
            c.byok_week + byok,
            c.month_start,
            c.usage_month + usage,
            c.byok_month + byok,
        )


@dataclass(frozen=True, slots=True)
class KeyLimit:
    limit: Decimal | None
    reset: str | None  # 'daily' | 'weekly' | 'monthly' | None (never)
    include_byok: bool
    usage: KeyUsage

    def spent(self, now: datetime) -> Decimal:
        """What counts against the limit in the current reset period."""
        c = self.usage.current(now)
        usage, byok = {
            "daily": (c.usage_day, c.byok_day),
            "weekly": (c.usage_week, c.byok_week),
            "monthly": (c.usage_month, c.byok_month),
        }.get(self.reset or "", (c.usage_total, c.byok_total))
        return usage + (byok if self.include_byok else ZERO)

    def remaining(self, now: datetime, held: Decimal) -> Decimal | None:
        if self.limit is None:
            return None
        return max(self.limit - self.spent(now) - held, ZERO)


def spendable(balance: Decimal, lots: Sequence[LotBalance], now: datetime, holds: Sequence[Hold] = ()) -> Decimal:
    """The balance without what can never be spent (`unspendable`)."""
    return balance - unspendable(lots, now, holds)


def unspendable(lots: Sequence[LotBalance], now: datetime, holds: Sequence[Hold] = ()) -> Decimal:
    """What is left of expired lots, not yet moved to breakage, that no open hold reserves: usage consumes live
    lots only, so admitting against it would only create debt. What the open `holds` (not expired) reserve of
    an expired lot is still theirs — a capture pays its hold from the lots live when the hold was created
    (`consume`) — and it is counted once, as held, not a second time here."""
    expired = [lot for lot in lots if lot.expires_at <= now]
    if not expired:
        return ZERO
    reserved = reserved_by(lots, holds) if holds else {}
    return sum((max(lot.remaining - reserved.get(lot.id, ZERO), ZERO) for lot in expired), ZERO)


def admit(
    amount: Decimal,
    *,
    balance: Decimal,
    held: Decimal,
    key: KeyLimit | None,
    key_held: Decimal,
    now: datetime,
    byok: Decimal = ZERO,
) -> None:
    """May a request reserve or spend `amount` of credits? (SPEC §5 Refusals, Per-key limits.) Refused with
    402 when it takes credits and the balance is ≤ 0 or available credits cannot cover it, or when the key's
    limit cannot cover what the request counts there: `amount`, plus `byok` — a BYOK generation's list-price
    cost, paid upstream — when the key includes BYOK in its limit (credits cover the fee alone). `limit_source`
    says which and `available` is the most that would fit. `balance` is the spendable balance (see `spendable`).
    """
    available = max(balance - held, ZERO)
    key_room = key.remaining(now, key_held) if key is not None else None
    fits = available if key_room is None else min(available, key_room)
    if amount > 0 and (balance <= 0 or available < amount):
        raise Refused(
            outcomes.INSUFFICIENT_CREDITS,
            f"Available credits ({format_money(available)} USD) cannot cover {format_money(amount)} USD.",
            limit_source="credits",
            available=format_money(fits),
        )
    counted = amount + (byok if key is not None and key.include_byok else ZERO)
    if key_room is not None and key_room < counted:
        raise Refused(
            outcomes.INSUFFICIENT_CREDITS,
            f"The key's limit leaves {format_money(key_room)} USD; cannot cover {format_money(counted)} USD.",
            limit_source="key_limit",
            available=format_money(fits),
        )


# --- BYOK ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ByokPolicy:
    """Versioned fee rule. `allowance_usd`: the first N USD of list-price BYOK usage a month are free
    (`enterprise_allowance_usd` for enterprise accounts, where the policy gives one). `free_requests`: the
    first N BYOK requests a month are free (the older policy). Beyond: `rate` × list cost.
    """

    id: int
    kind: str
    rate: Decimal
    allowance_usd: Decimal | None = None
    enterprise_allowance_usd: Decimal | None = None
    free_requests: int | None = None


def byok_fee(
    policy: ByokPolicy, *, list_cost: Decimal, month_list_usage: Decimal, month_requests: int, enterprise: bool
) -> Decimal:
    """The fee on one BYOK request. A request straddling the allowance pays only on the part above it.
    An enterprise account's allowance is the policy's `enterprise_allowance_usd`; under a policy that gives
    none it is the standard `allowance_usd`, never nothing (SPEC §5 BYOK gives enterprise accounts the larger
    allowance, not a smaller one). Rounded half-up to 1e-12 USD (the ledger's resolution), the one rounding
    this rule makes.
    """
    if policy.kind == "free_requests":
        billable = ZERO if month_requests < (policy.free_requests or 0) else list_cost
    else:
        allowance = policy.allowance_usd
        if enterprise and policy.enterprise_allowance_usd is not None:
            allowance = policy.enterprise_allowance_usd
        free_left = max((allowance or ZERO) - month_list_usage, ZERO)
        billable = max(list_cost - free_left, ZERO)
    return (billable * policy.rate).quantize(QUANTUM, rounding=ROUND_HALF_UP)


# --- entries -------------------------------------------------------------------------------------


def usage_entry(
    customer: Customer,
    amount: Decimal,
    *,
    lots: tuple[LotBalance, ...],
    now: datetime,
    hold: Hold | None = None,
    kind: EntryKind = EntryKind.USAGE,
    revenue: Platform = Platform.USAGE_REVENUE,
    description: str = "",
) -> Entry:
    """Spend `amount` of credits: soonest-expiring live lots first; whatever no lot covers is debt (a
    finished generation is paid even when it takes the balance negative). A capture names its `hold`: up
    to the hold's amount is paid from the lots live when the hold was created (`consume`).
    """
    taken, shortfall = consume(lots, amount, now, hold)
    postings = [Posting(customer, -part, lot_id) for lot_id, part in taken]
    if shortfall:
        postings.append(Posting(customer, -shortfall, None))
    postings.append(Posting(revenue, amount))
    return Entry(kind=kind, customer=customer, postings=tuple(postings), usage_delta=amount, description=description)


# --- BYOK reconciliation -------------------------------------------------------------------------


def policy_at(policies: Sequence[tuple[datetime, ByokPolicy]], at: datetime) -> ByokPolicy | None:
    """The policy in force at `at`: the newest with `effective_from` <= `at` (ties: the higher id), as the
    hot path picks it. `policies` in any order; None when none was in force yet."""
    best: tuple[datetime, int] | None = None
    chosen: ByokPolicy | None = None
    for effective_from, policy in policies:
        if effective_from <= at and (best is None or (effective_from, policy.id) > best):
            best, chosen = (effective_from, policy.id), policy
    return chosen


def policy_charged(
    policies: Sequence[tuple[datetime, ByokPolicy]], policy_id: int | None, at: datetime
) -> ByokPolicy | None:
    """The policy a generation charged at `at` was priced by: the one it recorded (`byok_policy_id`), whatever
    was added since with an earlier `effective_from` (SPEC §5: past entries keep the rule that made them); the
    policy in force at `at` only for a generation that recorded none."""
    if policy_id is not None:
        for _, policy in policies:
            if policy.id == policy_id:
                return policy
    return policy_at(policies, at)


def expected_byok_fees(
    generations: Sequence[tuple[Decimal, ByokPolicy | None, bool]], *, enterprise: bool
) -> list[Decimal]:
    """The fee each of an account's charged BYOK generations of one UTC month should have paid, given in
    the order they were charged as (list cost, the policy it was charged by, whether zero completion insurance
    covered it): the same `byok_fee` rule as the hot path, on the month's running list-price usage and count of
    requests. An insured generation pays nothing and counts toward neither (its list cost is given as zero).
    No policy in force: no fee."""
    fees: list[Decimal] = []
    usage = ZERO
    requests = 0
    for list_cost, policy, insured in generations:
        fee = ZERO
        if policy is not None and not insured:
            fee = byok_fee(
                policy, list_cost=list_cost, month_list_usage=usage, month_requests=requests, enterprise=enterprise
            )
        fees.append(fee)
        if not insured:
            usage += list_cost
            requests += 1
    return fees
