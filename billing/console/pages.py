"""The support console's pages: plain HTML, every value escaped, no script. What they show comes from the
same service functions as the API; what they post goes to them too."""

from __future__ import annotations

import html
import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any
from urllib.parse import quote

LEDGER_PAGE = 20
_STYLE = """body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1100px;padding:0 16px;color:#222}
h1{font-size:20px}h2{font-size:16px;margin-top:28px}table{border-collapse:collapse;width:100%}
td,th{border-bottom:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums}.flash{padding:8px;border-radius:4px;margin:12px 0}
.ok{background:#e6f4ea}.err{background:#fde7e9}form.inline{display:inline}input,select{margin-right:6px}
header{display:flex;justify-content:space-between;align-items:center;border-bottom:1px solid #ccc}"""


def e(value: Any) -> str:
    """Escaped for HTML text and attribute values; None shows as nothing."""
    if value is None:
        return ""
    if isinstance(value, datetime):
        value = value.isoformat(timespec="seconds").replace("+00:00", "Z")
    return html.escape(str(value), quote=True)


def page(title: str, body: str, *, who: str | None = None, flash: tuple[str, str] | None = None) -> str:
    logout = (
        f'<form class="inline" method="post" action="/console/logout"><span>{e(who)}</span> '
        '<button type="submit">Sign out</button></form>'
        if who
        else ""
    )
    note = f'<div class="flash {e(flash[0])}">{e(flash[1])}</div>' if flash else ""
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{e(title)} · billing console</title>'
        f'<meta name="referrer" content="same-origin"><style>{_STYLE}</style></head><body>'
        f'<header><h1><a href="/console/accounts">billing console</a></h1>{logout}</header>'
        f"<h1>{e(title)}</h1>{note}{body}</body></html>"
    )


def table(headings: Sequence[str], rows: Iterable[Sequence[Any]], numeric: frozenset[int] = frozenset()) -> str:
    head = "".join(f"<th>{e(h)}</th>" for h in headings)
    lines = [
        "<tr>" + "".join(f"<td{' class=n' if i in numeric else ''}>{cell}</td>" for i, cell in enumerate(row)) + "</tr>"
        for row in rows
    ]
    return f"<table><tr>{head}</tr>{''.join(lines) or '<tr><td>none</td></tr>'}</table>"


def form(action: str, fields: str, button: str) -> str:
    """A form posting to `action` with a fresh idempotency key: submitting it twice (a double click, a
    reload) moves money once."""
    return (
        f'<form method="post" action="{e(action)}">{fields}'
        f'<input type="hidden" name="idempotency_key" value="{uuid.uuid4().hex}">'
        f'<button type="submit">{e(button)}</button></form>'
    )


def login(error: str | None = None) -> str:
    body = (
        '<form method="post" action="/console/login"><label>Staff token (support or admin) '
        '<input type="password" name="token" autocomplete="off" required></label> '
        '<button type="submit">Sign in</button></form>'
    )
    return page("Sign in", body, flash=("err", error) if error else None)


def search(who: str, query: str | None = None, error: str | None = None) -> str:
    body = (
        '<form method="get" action="/console/accounts"><label>Account id (acct_…), external id, purchase (pur_…), '
        "Stripe payment (pi_…, cs_…), key (key_…) or generation id "
        f'<input name="q" value="{e(query)}" size="40" required autofocus></label> '
        '<button type="submit">Open</button></form>'
    )
    return page("Find an account", body, who=who, flash=("err", error) if error else None)


def account(who: str, a: Any, lots: Any, ledger: Any, purchases: Any, activity: Any, tickets: Any,
            flash: tuple[str, str] | None) -> str:  # fmt: skip
    acct = a.id
    base = f"/console/accounts/{quote(acct)}"
    b = a.balance
    summary = table(
        ["account", "external id", "kind", "balance", "held", "available", "total credits", "total usage"],
        [[e(acct), e(a.external_id), e(a.kind) + (" · flagged for review" if a.flagged_for_review else ""),
          e(b.balance), e(b.held), e(b.available), e(b.total_credits), e(b.total_usage)]],
        frozenset({3, 4, 5, 6, 7}),
    )  # fmt: skip
    moves = (
        "<h2>Move credits (audit-logged with your token and the reason)</h2>"
        + form(
            f"{base}/adjustments",
            '<input name="amount" placeholder="amount, e.g. 5.00 or -2.50" required>'
            '<select name="category"><option>compensation</option><option>promotional</option>'
            "<option>paid</option></select>"
            '<input name="reason" placeholder="reason" size="40" required>',
            "Adjust balance",
        )
        + form(
            f"{base}/tickets",
            '<input name="payment_intent" placeholder="pi_… or cs_… of the payment" size="34" required>'
            '<input name="note" placeholder="note (optional)" size="40">',
            "Open a missing-credit ticket",
        )
    )
    lot_rows = [[e(x.id), e(x.category), e(x.amount), e(x.remaining), e(x.expires_at),
                 "expired" if x.expired else ""] for x in lots.data]  # fmt: skip
    ledger_rows = [[e(x.posted_at), e(x.id), e(x.kind), e(x.amount), e(x.balance_after), e(x.description),
                    e(x.reason)] for x in ledger.data]  # fmt: skip
    purchase_rows = []
    for p in purchases.data:
        refund = ""
        if p.status == "succeeded" and p.method == "card":
            refund = form(
                f"/console/purchases/{quote(p.id)}/refunds?account={quote(acct)}",
                '<input name="amount" placeholder="all that is left" size="12">'
                '<input name="reason" placeholder="reason" size="24" required>',
                "Refund",
            )
        left = p.lot.remaining if p.lot else ""
        purchase_rows.append([e(p.created_at), e(p.id), e(p.method), e(p.status), e(p.credits), e(p.fee),
                              e(left), e(p.refunded), refund])  # fmt: skip
    generation_rows = [[e(g.created_at), e(g.id), e(g.key), e(g.model), e(g.total_cost), e(g.tokens_prompt),
                        e(g.tokens_completion), "BYOK " + e(g.byok_fee) if g.is_byok else ""]
                       for g in activity.data]  # fmt: skip
    ticket_rows = [[e(t.created_at), e(t.id), e(t.status), e(t.resolution), e(t.payment_intent), e(t.created_by)]
                   for t in tickets.data]  # fmt: skip
    body = (
        summary
        + moves
        + "<h2>Lots with credits left</h2>"
        + table(["lot", "category", "amount", "left", "expires", ""], lot_rows, frozenset({2, 3}))
        + f'<h2>Ledger · <a href="{base}">latest</a>'
        + (f' · <a href="{base}?ledger_after={quote(ledger.data[-1].id)}">older</a>' if ledger.has_more else "")
        + "</h2>"
        + table(
            ["posted", "entry", "kind", "amount", "balance after", "description", "reason"],
            ledger_rows,
            frozenset({3, 4}),
        )
        + "<h2>Purchases (latest 10)</h2>"
        + table(
            ["created", "purchase", "method", "status", "credits", "fee", "left", "refunded", ""],
            purchase_rows,
            frozenset({4, 5, 6, 7}),
        )
        + f'<h2>Activity (latest 20) · <a href="{base}/activity.csv">last 30 days as CSV</a></h2>'
        + table(
            ["created", "generation", "key", "model", "cost", "prompt", "completion", ""],
            generation_rows,
            frozenset({4, 5, 6}),
        )
        + "<h2>Support tickets</h2>"
        + table(["opened", "ticket", "status", "resolution", "payment", "by"], ticket_rows)
    )
    return page(f"Account {acct}", body, who=who, flash=flash)
