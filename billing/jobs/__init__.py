"""Background jobs as service functions (Cosmic Python): each owns its transactions and returns what it
did. The Dramatiq actors in `workers/` and the `billing expire` / `billing verify` commands are thin
adapters over these same functions.

Every job is safe to run twice or concurrently; what makes it so is a database fact (a row lock, a
status checked under it), never timing.
"""
