"""Persistence: tables, engine, the journal store, migrations."""
