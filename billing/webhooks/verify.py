"""Stripe webhook signatures (`Stripe-Signature: t=…,v1=…`), checked by the official SDK on the raw body.

A bad signature, a malformed header or a timestamp outside the tolerance (replays) is a 400 and nothing
is changed. A verified event is kept and handled without any NUL character in its strings: PostgreSQL
cannot store one, and text a cardholder typed must not keep a paid dollar from becoming credits.
"""

from __future__ import annotations

from typing import Any

import msgspec
import stripe

from billing.errors import INVALID_REQUEST, ApiError

# Stripe's own default: an event signed more than five minutes ago is refused as a possible replay.
TOLERANCE_SECONDS = 300


def verified_event(payload: bytes, signature: str | None, secret: str) -> dict[str, Any]:
    if not signature:
        raise ApiError(400, INVALID_REQUEST, "missing_signature", "Send the `Stripe-Signature` header.")
    try:
        stripe.Webhook.construct_event(payload, signature, secret, tolerance=TOLERANCE_SECONDS)
    except stripe.SignatureVerificationError as exc:
        stale = "tolerance" in str(exc).lower()
        code = "signature_too_old" if stale else "invalid_signature"
        raise ApiError(400, INVALID_REQUEST, code, f"Stripe signature rejected: {exc.user_message or exc}") from exc
    except ValueError as exc:
        raise ApiError(400, INVALID_REQUEST, "malformed_json", "The event is not valid JSON.") from exc
    event = without_nul(msgspec.json.decode(payload))
    if not isinstance(event, dict) or not isinstance(event.get("id"), str) or not isinstance(event.get("type"), str):
        raise ApiError(400, INVALID_REQUEST, "invalid_event", "A Stripe event has an `id` and a `type`.")
    data = event.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("object"), dict):
        raise ApiError(400, INVALID_REQUEST, "invalid_event", "A Stripe event has `data.object`.")
    return event


def without_nul(value: Any) -> Any:
    """`value` (decoded JSON) with every NUL character removed from its strings, keys included."""
    if isinstance(value, str):
        return value.replace("\x00", "") if "\x00" in value else value
    if isinstance(value, dict):
        return {without_nul(k): without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_nul(v) for v in value]
    return value
