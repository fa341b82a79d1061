"""`billing worker`: one process consuming the job queue with `--threads` worker threads (Dramatiq's
Worker, in-process; scale out by running more processes). SIGTERM or Ctrl-C stops taking messages and
waits up to `SHUTDOWN_TIMEOUT_MS` for running jobs; what is left is requeued. A worker killed outright
(SIGKILL, a lost node) leaves its message unacknowledged; Dramatiq's queue maintenance redelivers it to
another worker once this one's heartbeat is older than 60 s — the jobs are idempotent, so that is safe.
"""

from __future__ import annotations

import logging
import signal
import threading

import dramatiq

from billing.settings import Settings

log = logging.getLogger(__name__)

# Below the deployment's termination grace period (deploy/k8s/worker.yaml: 60 s).
SHUTDOWN_TIMEOUT_MS = 50_000


def run(settings: Settings, threads: int | None = None) -> int:
    from workers import actors  # declares the actors on the broker

    broker = actors.broker
    broker.emit_after("process_boot")  # starts the time-limit watchdog
    worker = dramatiq.Worker(broker, worker_threads=threads or settings.worker_threads, worker_timeout=1000)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    worker.start()
    log.info("worker ready: %d thread(s), actors %s", worker.worker_threads, sorted(broker.get_declared_actors()))
    stop.wait()
    log.info("worker stopping")
    worker.stop(timeout=SHUTDOWN_TIMEOUT_MS)
    broker.close()
    return 0
