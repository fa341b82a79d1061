"""Customers' API keys at the gateway: credit limits with resets, usage per period, disable and expiry."""
