"""``creditledger stack up|down|status``: the real services on loopback, no Docker.

Each service is either *managed* (started and stopped here, its PID recorded)
or *external* (its URL came from ``KAFKA_BOOTSTRAP_SERVERS``, ``DATABASE_URL``
or ``REDIS_URL``): then nothing is started, and ``up`` only checks it answers.
``up`` is idempotent: a service already running is left alone.
"""

from __future__ import annotations

import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from kernel.errors import StackError
from kernel.settings import Settings
from stack import secure
from stack.kafka import KafkaService, cluster_nodes, cluster_root, node_dirs
from stack.postgres import PostgresService
from stack.processes import ServiceDir, wait_until
from stack.redis import RedisService

# Someone else's service is either there or not; it is not booting because of us.
EXTERNAL_TIMEOUT_S = 15


class Service(Protocol):
    name: str
    dir: ServiceDir

    @property
    def address(self) -> str: ...

    def start(self) -> int | None: ...

    def ready(self) -> bool: ...


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    address: str
    state: str  # started | running | external | stopped | down
    pid: int | None
    seconds: float
    log: str


def services(settings: Settings) -> list[tuple[Service, bool]]:
    """Every service with whether it is external, in start order."""
    kafka: list[tuple[Service, bool]] = [
        (KafkaService(settings, node), settings.kafka.external) for node in cluster_nodes(settings)
    ]
    return [
        (PostgresService(settings), settings.postgres.external),
        (RedisService(settings), settings.redis.external),
        *kafka,
    ]


def _known(settings: Settings) -> list[tuple[Service, bool]]:
    """``services``, with the Kafka that is running when it differs from the settings (a
    cluster started with ``--brokers 3``, or a secured one, then a plain ``down`` or
    ``status``)."""
    running = [d for d in node_dirs(settings) if d.dir.running_pid() is not None]
    if not running or settings.kafka.external:
        return services(settings)
    secure = running[0].secure
    count = 1
    if running[0].clustered:
        count = len(list(cluster_root(settings, secure).glob("node-*")))
    stack = settings.stack.model_copy(update={"kafka_brokers": count, "kafka_secure": secure})
    return services(settings.model_copy(update={"stack": stack}))


def up(settings: Settings) -> list[ServiceStatus]:
    """Start what is missing and wait until every service answers."""
    started_at: dict[str, tuple[int | None, float]] = {}
    # Start everything first, then wait: the three boot in parallel.
    for service, external in services(settings):
        if external:
            continue
        t0 = time.monotonic()
        started_at[service.name] = (service.start(), t0)
    report: list[ServiceStatus] = []
    timeout = settings.stack.start_timeout_s
    for service, external in services(settings):
        if external:
            t0 = time.monotonic()
            if not wait_until(service.ready, EXTERNAL_TIMEOUT_S):
                raise StackError(
                    f"external {service.name} at {service.address} does not answer within "
                    f"{EXTERNAL_TIMEOUT_S} s; check the URL in the environment or start it"
                )
            report.append(
                ServiceStatus(
                    service.name, service.address, "external", None, time.monotonic() - t0, "-"
                )
            )
            continue
        pid, t0 = started_at[service.name]
        watched = pid if pid is not None else service.dir.running_pid()
        service.dir.wait_ready(service.ready, timeout, pid=watched)
        if isinstance(service, PostgresService):
            service.bootstrap()
        report.append(
            ServiceStatus(
                service.name,
                service.address,
                "started" if pid is not None else "running",
                watched,
                time.monotonic() - t0,
                str(service.dir.log_file),
            )
        )
    if settings.stack.kafka_secure and not settings.kafka.external:
        # Idempotent: creating an ACL that exists changes nothing.
        secure.apply_acls(settings)
    return report


def down(settings: Settings, wipe: bool = False,
         only: set[str] | None = None) -> list[ServiceStatus]:  # fmt: skip
    """Stop the processes this launcher started (only those, or only the ``only`` ones, e.g.
    to see how the rest copes); optionally delete their data."""
    chosen = [(service, external) for service, external in reversed(_known(settings))
              if only is None or service.name in only
              or (service.name.startswith("kafka") and "kafka" in only)]  # fmt: skip
    # Kafka's nodes stop together: one by one, the last would wait for a quorum that left.
    kafka = [s for s, external in chosen if isinstance(s, KafkaService) and not external]
    with ThreadPoolExecutor(max_workers=max(1, len(kafka))) as pool:
        stopped = dict(zip([s.name for s in kafka],
                           pool.map(lambda s: _stop(settings, s), kafka), strict=True))  # fmt: skip
    report: list[ServiceStatus] = []
    for service, external in chosen:
        if external:
            report.append(ServiceStatus(service.name, service.address, "external", None, 0, "-"))
            continue
        report.append(stopped.get(service.name) or _stop(settings, service))
    if wipe and only is None:
        for folder in wiped_dirs(settings):
            shutil.rmtree(folder, ignore_errors=True)
    return report


def _stop(settings: Settings, service: Service) -> ServiceStatus:
    t0 = time.monotonic()
    # SIGINT is Postgres's "fast shutdown"; the others stop cleanly on SIGTERM.
    first = signal.SIGINT if isinstance(service, PostgresService) else signal.SIGTERM
    pid = service.dir.running_pid()
    stopped = service.dir.stop(settings.stack.stop_timeout_s, first_signal=first)
    return ServiceStatus(service.name, service.address, "stopped" if stopped else "down", pid,
                         time.monotonic() - t0, str(service.dir.log_file))  # fmt: skip


def wiped_dirs(settings: Settings) -> list[Path]:
    """What ``down --wipe`` deletes: the state dir (every service's data) and, when Kafka is
    ours, the ledger workers' local state. That state folds the topics being deleted; kept,
    the next worker would find its offsets ahead of the empty topics and refuse to start."""
    folders = [settings.stack.state_dir]
    if not settings.kafka.external:
        folders.append(settings.ledger.data_dir)
    return folders


def status(settings: Settings) -> list[ServiceStatus]:
    report: list[ServiceStatus] = []
    for service, external in _known(settings):
        t0 = time.monotonic()
        answering = service.ready()
        if external:
            state = "external" if answering else "external (not answering)"
            pid = None
        else:
            pid = service.dir.running_pid()
            state = "running" if pid and answering else ("starting" if pid else "down")
        report.append(
            ServiceStatus(
                service.name,
                service.address,
                state,
                pid,
                time.monotonic() - t0,
                "-" if external else str(service.dir.log_file),
            )
        )
    return report
