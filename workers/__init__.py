"""Background work: Dramatiq actors (`workers.actors`) on the Redis broker (`workers.broker`), the periodic
scheduler (`workers.scheduler`) and the dead-letter tools (`workers.dead_letters`).

Actors are thin adapters over service functions in `billing/jobs/`; `billing worker`, `billing scheduler`
and `billing dead-letters` run them (README, "Workers").
"""
