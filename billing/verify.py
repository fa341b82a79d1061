"""Ledger verification (SPEC §4, §9): the invariants, checked in SQL over everything. Reports, never edits.

- every journal entry has ≥ 2 postings summing to zero, and all postings together sum to zero;
- every cached balance equals the sum of its account's postings, and its last running balance;
- every running balance in an account's history equals the sum of its postings up to there, and every
  customer posting has one;
- every lot's `remaining` equals the sum of the postings naming it, and a posting names only a lot of its own
  account (also a foreign key, `fk_postings_lot_id_account_id_lots`);
- lots plus debt make the balance: no lot-less credit, only debt.
- every captured hold has exactly one generation; no other hold (open, released, expired) has one;
- `open_holds` holds exactly the open holds, each as it is in `holds` (what admissions count as held).
- every cached `purchased` equals the credits of the paid lots its account's purchases and paid grants created.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

CHECKS: dict[str, str] = {
    "unbalanced_entries": """
        SELECT e.id FROM journal_entries e LEFT JOIN postings p ON p.entry_id = e.id
        GROUP BY e.id HAVING count(p.id) < 2 OR coalesce(sum(p.amount), 0) <> 0 LIMIT 20""",
    "ledger_not_zero_sum": "SELECT sum(amount) FROM postings HAVING sum(amount) <> 0",
    "cached_balance_mismatch": """
        SELECT b.account_id FROM balances b
        LEFT JOIN (SELECT account_id, sum(amount) AS total FROM postings GROUP BY account_id) p
               ON p.account_id = b.account_id
        WHERE b.balance <> coalesce(p.total, 0) LIMIT 20""",
    "running_balance_mismatch": """
        SELECT b.account_id FROM balances b
        JOIN LATERAL (SELECT balance_after FROM postings WHERE account_id = b.account_id
                      ORDER BY id DESC LIMIT 1) last ON true
        WHERE last.balance_after <> b.balance LIMIT 20""",
    # Every running balance in a customer's history (what the history endpoint shows), not only the last:
    # each posting's `balance_after` is the sum of the account's postings up to it (posting ids follow
    # the order they were written in, under the account's lock).
    "history_balance_mismatch": """
        SELECT DISTINCT account_id FROM (
            SELECT account_id, balance_after, sum(amount) OVER (PARTITION BY account_id ORDER BY id) AS running
            FROM postings WHERE account_id IN (SELECT account_id FROM balances)) p
        WHERE balance_after IS NOT NULL AND balance_after <> running LIMIT 20""",
    # ... which the check above (and `positive_lotless_credit`) would skip for a customer posting without one.
    "missing_running_balance": """
        SELECT DISTINCT p.account_id FROM postings p JOIN balances b ON b.account_id = p.account_id
        WHERE p.balance_after IS NULL LIMIT 20""",
    "lot_remaining_mismatch": """
        SELECT l.id FROM lots l
        LEFT JOIN (SELECT lot_id, sum(amount) AS total FROM postings WHERE lot_id IS NOT NULL GROUP BY lot_id) p
               ON p.lot_id = l.id
        WHERE l.remaining <> coalesce(p.total, 0) LIMIT 20""",
    # A posting drawing on another account's lot leaves both accounts' caches equal to their postings while
    # one's lots no longer make its balance; the database refuses it too (migration 0017), checked here for
    # a ledger written before that.
    "posting_on_another_accounts_lot": """
        SELECT p.id FROM postings p JOIN lots l ON l.id = p.lot_id WHERE l.account_id <> p.account_id LIMIT 20""",
    "positive_lotless_credit": """
        SELECT account_id FROM postings WHERE lot_id IS NULL AND balance_after IS NOT NULL
        GROUP BY account_id HAVING sum(amount) > 0 LIMIT 20""",
    "postings_without_balance_row": """
        SELECT DISTINCT p.account_id FROM postings p JOIN accounts a ON a.id = p.account_id
        WHERE a.kind <> 'platform' AND NOT EXISTS (SELECT 1 FROM balances b WHERE b.account_id = p.account_id)
        LIMIT 20""",
    # A hold has one status, so "captured and released" cannot be stored; what can go wrong is the
    # generation: a capture writes exactly one, a release or an expiry none.
    "captured_hold_generations": """
        SELECT h.id FROM holds h LEFT JOIN generations g ON g.hold_id = h.id
        WHERE h.status = 'captured' GROUP BY h.id HAVING count(g.id) <> 1 LIMIT 20""",
    "uncaptured_hold_with_generation": """
        SELECT DISTINCT h.id FROM holds h JOIN generations g ON g.hold_id = h.id
        WHERE h.status <> 'captured' LIMIT 20""",
    # Kept by triggers on `holds` (migration 0019); admissions and balances read `held` from it.
    "open_holds_mismatch": """
        SELECT coalesce(h.id, o.hold_id) FROM (SELECT * FROM holds WHERE status = 'open') h
        FULL JOIN open_holds o ON o.hold_id = h.id
        WHERE h.id IS NULL OR o.hold_id IS NULL
           OR (h.account_id, h.key_id, h.amount, h.created_at, h.expires_at)
              IS DISTINCT FROM (o.account_id, o.key_id, o.amount, o.created_at, o.expires_at) LIMIT 20""",
    # Kept by the journal (`Entry.purchased_delta`, migration 0022); the free-model quota reads it.
    "purchased_mismatch": """
        SELECT b.account_id FROM balances b
        LEFT JOIN (SELECT l.account_id, sum(l.amount) AS total FROM lots l JOIN journal_entries e ON e.id = l.entry_id
                   WHERE l.category = 'paid' AND e.kind IN ('purchase', 'grant') GROUP BY l.account_id) p
               ON p.account_id = b.account_id
        WHERE b.purchased <> coalesce(p.total, 0) LIMIT 20""",
}


async def verify_ledger(conn: AsyncConnection) -> dict[str, list[object]]:
    """Each violated invariant, with up to 20 offending ids. Empty means the ledger is consistent."""
    problems: dict[str, list[object]] = {}
    for name, sql in CHECKS.items():
        rows = (await conn.execute(text(sql))).scalars().all()
        if rows:
            problems[name] = list(rows)
    return problems
