"""The service's notion of 'now' for rules (expiry, windows, resets).

Tests move it with `set_offset`; posting timestamps come from PostgreSQL's clock.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

_offset = timedelta(0)


def now() -> datetime:
    return datetime.now(UTC) + _offset


def set_offset(offset: timedelta) -> None:
    global _offset
    _offset = offset
