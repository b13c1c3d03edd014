"""``creditledger worker``: run one ledger worker (a Faust worker process).

Several workers share the partitions through their consumer group; give each
its own ``--name`` so each has its own state folder.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from types import FrameType
from typing import Any

from contracts.records import CHARGE_TOPIC, GRANT_TOPIC, LEDGER_TOPIC, REJECTED_TOPIC
from kernel.errors import EXIT_CONFIG, CreditLedgerError
from kernel.settings import Settings
from streams import topic_admin
from streams.access import check_access
from streams.topics import settings_topics

log = logging.getLogger("creditledger.worker")

QUICK_DEATH_S = 10.0  # a child that dies this soon after its start counts towards giving up
QUICK_DEATHS_MAX = 20
BACKOFF_MAX_S = 30.0

# Faust's names for log levels -> the logging module's.
LOG_LEVELS = {
    "crit": logging.CRITICAL,
    "error": logging.ERROR,
    "warn": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
}


def run_worker(settings: Settings, name: str, loglevel: str, store: str | None,
               metrics_port: int = 0) -> int:  # fmt: skip
    import faust
    import uvloop

    from agents.app import build_ledger_app
    from agents.ledger_agent import register_ledger_agent
    from agents.metrics import LedgerMetrics
    from kernel.observe import serve_metrics, with_runtime_collectors

    # A login, CA or ACL that cannot work stops the start here, naming the setting.
    check_access(settings, read=[CHARGE_TOPIC, GRANT_TOPIC, LEDGER_TOPIC],
                 write=[LEDGER_TOPIC, REJECTED_TOPIC], groups=[settings.ledger.app_id])  # fmt: skip
    # Topics first: applying is safe on every start and refuses on drift.
    spec = settings_topics(settings)
    topic_admin.apply(
        topic_admin.make_admin(settings), spec, settings.kafka.request_timeout_ms / 1000
    )
    uvloop.install()  # measured: ~15% more commands/s than the default loop
    ledger_app = build_ledger_app(settings, worker_name=name, store=store)
    metrics = LedgerMetrics()
    if metrics_port:
        serve_metrics(settings.metrics.host, metrics_port,
                      with_runtime_collectors(metrics.registry))  # fmt: skip
    register_ledger_agent(ledger_app, settings, worker_name=name, metrics=metrics,
                          snapshots=fold_snapshots(settings, name, metrics))  # fmt: skip
    worker = faust.Worker(ledger_app.app, loglevel=loglevel)
    logging.getLogger("agents").setLevel(LOG_LEVELS[loglevel])
    worker.execute_from_commandline()
    return 0


def fold_snapshots(settings: Settings, name: str, metrics: Any) -> Any:
    """The worker's snapshots (``ledger.snapshot_every_entries`` > 0), their tables migrated.
    Postgres being down does not stop the fold: it only loses snapshots (and, at a restart
    without local state, the time they save)."""
    from agents.snapshots import FoldSnapshots
    from projections.migrate import migrate

    if settings.ledger.snapshot_every_entries <= 0:
        return None
    try:
        migrate(settings)
    except CreditLedgerError as exc:
        log.warning("snapshots: Postgres not ready (%s); the worker starts without them until "
                    "it is", exc)  # fmt: skip
    return FoldSnapshots(settings, name, metrics)


def supervise_worker(child_args: list[str]) -> int:
    """Run ``creditledger <child_args>`` (the fold, ``--no-supervise``) and restart it with
    backoff whenever it exits by itself; SIGTERM/SIGINT stop it and then this process.

    The fold exits uncommitted whenever a batch cannot be made durable (Kafka restarting,
    say): that is its recovery by design, since a worker that waited past its session
    could overlap the worker that took its partitions over. The restart is this loop's."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    pause, quick_deaths = 1.0, 0
    while True:
        started = time.monotonic()
        child = subprocess.Popen([sys.executable, "-m", "creditledger.cli", *child_args])
        code = child.wait()
        if stopping:
            return 0 if code in (0, -signal.SIGTERM, -signal.SIGINT) else code
        if code == EXIT_CONFIG:
            log.critical("the ledger worker cannot start as configured (see its error above); "
                         "not restarting it")  # fmt: skip
            return code
        quick = time.monotonic() - started < QUICK_DEATH_S
        quick_deaths = quick_deaths + 1 if quick else 0
        if quick_deaths >= QUICK_DEATHS_MAX:
            log.critical(
                "the ledger worker died %d times in a row within %.0f s of its start "
                "(last exit code %s); giving up",
                quick_deaths,
                QUICK_DEATH_S,
                code,
            )
            return code or 1
        pause = min(pause * 2, BACKOFF_MAX_S) if quick else 1.0
        log.error("the ledger worker exited by itself (code %s); restarting it in %.0f s",
                  code, pause)  # fmt: skip
        deadline = time.monotonic() + pause
        while not stopping and time.monotonic() < deadline:
            time.sleep(0.1)
        if stopping:
            return 0
