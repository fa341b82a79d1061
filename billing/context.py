"""What every service function is handed: the engine, the journal store and the settings."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine

from billing.db.journal import Journal
from billing.settings import Settings


@dataclass(frozen=True, slots=True)
class Context:
    db: AsyncEngine
    journal: Journal
    settings: Settings
