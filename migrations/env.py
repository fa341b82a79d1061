"""Alembic environment: migrations run synchronously over psycopg 3, inside one transaction."""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import create_engine, pool

from billing.db.models import Base
from billing.settings import sqlalchemy_url

config = context.config
url: str = config.get_main_option("sqlalchemy.url") or os.environ.get("DATABASE_URL") or ""
if not url:
    raise RuntimeError("DATABASE_URL is not set")


def run_migrations_online() -> None:
    engine = create_engine(sqlalchemy_url(url), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=Base.metadata, transaction_per_migration=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run_migrations_online()
