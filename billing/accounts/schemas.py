"""The accounts API contract."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

from billing.schemas import ID_PATTERN, MoneyStr, Reason

ExternalId = Annotated[
    str, msgspec.Meta(min_length=1, max_length=200, pattern=ID_PATTERN, description="Your id for it.")
]


class CreateAccount(msgspec.Struct, forbid_unknown_fields=True):
    external_id: ExternalId
    kind: Literal["user", "organization"] = "user"
    name: Annotated[str, msgspec.Meta(max_length=200)] | None = None
    enterprise: bool = False
    metadata: dict[Annotated[str, msgspec.Meta(max_length=40)], Annotated[str, msgspec.Meta(max_length=500)]] = {}


class CreateGrant(msgspec.Struct, forbid_unknown_fields=True):
    amount: MoneyStr
    reason: Reason
    category: Literal["paid", "promotional", "compensation"] = "promotional"
    expires_at: datetime | None = None


class CreateAdjustment(msgspec.Struct, forbid_unknown_fields=True):
    amount: Annotated[str, msgspec.Meta(description="Signed decimal string: negative removes credits.")]
    reason: Reason
    category: Literal["paid", "promotional", "compensation"] = "compensation"
    expires_at: datetime | None = None


class Balance(msgspec.Struct):
    account: str
    balance: str
    held: str
    available: str
    total_credits: str
    total_usage: str
    object: str = "balance"


class BalanceAsOf(msgspec.Struct):
    account: str
    balance: str
    as_of: datetime
    object: str = "balance_as_of"


class TrialBalanceLine(msgspec.Struct):
    account: str  # a platform account's code, or `customer_credits` for every customer's credits account
    name: str
    type: str  # asset, liability, revenue, expense or equity
    accounts: int  # ledger accounts summed in the line: 1 for a platform account, the customers with postings
    debits: str
    credits: str
    balance: str  # on the type's normal side: debits − credits for assets and expenses, else credits − debits


class TrialBalance(msgspec.Struct):
    as_of: datetime
    lines: list[TrialBalanceLine]
    total_debits: str
    total_credits: str
    balanced: bool  # total debits equal total credits, as every entry sums to zero
    object: str = "trial_balance"


class Account(msgspec.Struct):
    id: str
    external_id: str
    kind: str
    name: str | None
    metadata: dict[str, str]
    enterprise: bool
    flagged_for_review: bool  # a dispute on the account that was not won
    created_at: datetime
    balance: Balance
    object: str = "account"


class LedgerLine(msgspec.Struct):
    """One journal entry as seen from one account: its net amount there and the running balance."""

    id: str
    kind: str
    amount: str
    balance_after: str
    posted_at: datetime
    description: str
    reason: str | None
    object: str = "ledger_entry"


class Lot(msgspec.Struct):
    id: str
    account: str
    category: str
    amount: str
    remaining: str
    used: str
    expires_at: datetime
    expired: bool
    created_at: datetime
    entry: str
    object: str = "lot"


class PostingOut(msgspec.Struct):
    account: str
    amount: str
    lot: str | None


class JournalEntry(msgspec.Struct):
    id: str
    kind: str
    account: str | None
    posted_at: datetime
    description: str
    reason: str | None
    actor: str | None
    reverses: str | None
    postings: list[PostingOut]
    object: str = "journal_entry"


class MoneyMove(msgspec.Struct):
    """What a grant or adjustment answers: the entry, the lot it created (if any), the balance after."""

    entry: JournalEntry
    lot: Lot | None
    balance: Balance
    object: str = "money_move"
