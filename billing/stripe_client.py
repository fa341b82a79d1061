"""The official `stripe` SDK, configured from settings (SPEC §8).

`STRIPE_API_KEY` selects the account; `STRIPE_API_BASE` points the SDK elsewhere (the local emulator,
`localstripe`, which `billing dev` and the tests start on 127.0.0.1). Calls go through one `StripeClient`
per process with an async HTTP client, so a Stripe call never blocks the event loop.
"""

from __future__ import annotations

import urllib.parse
import urllib.request

import stripe

from billing.settings import Settings

# What `billing dev` and the tests give the local emulator: it accepts any key that starts with sk_.
LOCAL_API_KEY = "sk_test_localstripe"
LOCAL_WEBHOOK_SECRET = "whsec_localstripe"
CURRENCY = "usd"


def configure_sdk(settings: Settings) -> None:
    """The SDK's module-level defaults, for code that uses `stripe.<Resource>` directly."""
    if settings.stripe_api_key:
        stripe.api_key = settings.stripe_api_key
    if settings.stripe_api_base:
        stripe.api_base = settings.stripe_api_base


def make_stripe(settings: Settings) -> stripe.StripeClient | None:
    """A client for the configured Stripe, or None when no key is set (purchases then answer 503)."""
    if not settings.stripe_api_key:
        return None
    configure_sdk(settings)
    base = {"api": settings.stripe_api_base} if settings.stripe_api_base else None
    return stripe.StripeClient(
        settings.stripe_api_key,
        base_addresses=base,  # type: ignore[arg-type]
        http_client=stripe.HTTPXClient(timeout=30, allow_sync_methods=True),
        max_network_retries=2,
    )


def register_local_webhook(api_base: str, name: str, url: str, secret: str, timeout: float = 10) -> None:
    """Tell localstripe to deliver its signed events to `url` (its own `POST /_config/webhooks/<name>`)."""
    body = urllib.parse.urlencode({"url": url, "secret": secret}).encode()
    request = urllib.request.Request(f"{api_base.rstrip('/')}/_config/webhooks/{name}", data=body, method="POST")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # local: never via a proxy
    with opener.open(request, timeout=timeout) as response:
        if response.status != 200:
            raise RuntimeError(f"localstripe refused the webhook registration: HTTP {response.status}")


def payment_method_params(settings: Settings, method: str) -> dict[str, list[str]]:
    """Restrict a PaymentIntent to the purchase's method (`card` or `crypto`), so the fee charged is the
    fee of the method paid with. Stripe's current API names this `allowed_payment_method_types`; the
    emulator only knows the older `payment_method_types`."""
    if settings.stripe_api_base:
        return {"payment_method_types": [method]}
    return {"allowed_payment_method_types": [method]}
