"""Dramatiq actors and their scheduler (reconciler, expiry, auto top-up): added by the worker issue."""
