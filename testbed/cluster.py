"""A three-node Kafka cluster (or one secured node) next to the local stack, and what a
broker-failure test or benchmark needs of it: which node leads a partition, SIGKILL a
node, start it again, count under-replicated partitions, and a clock of when ledger
entries arrived.

The cluster has its own ports (29092, 29192, 29292; controllers 29093, ...) and state
folder, and shares Postgres and Redis with the local stack, so the single-broker suite
and the cluster run side by side.
"""

from __future__ import annotations

import bisect
import itertools
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import OFFSET_END, TopicPartition
from confluent_kafka.admin import AdminClient

from contracts.records import LEDGER_TOPIC
from kernel.errors import StackError
from kernel.settings import Settings
from stack import launcher, secure
from stack.kafka import KafkaService, cluster_nodes
from stack.processes import is_alive, signal_group
from streams import topic_admin
from streams.kafka_clients import make_consumer
from streams.topics import settings_topics

BROKERS = 3
FIRST_PORT = 29092


def _beside(base: Settings, state_dir: Path, kafka: dict[str, object],
            stack: dict[str, object]) -> Settings:  # fmt: skip
    """``base`` (the local stack) with a Kafka of its own, started by the launcher in
    ``state_dir``; Postgres and Redis stay the stack's (external to this launcher)."""
    return base.model_copy(update={
        "kafka": base.kafka.model_copy(update={"external": False, **kafka}),
        "stack": base.stack.model_copy(update={"state_dir": state_dir, "kafka_heap_mb": 512,
                                               **stack}),
        "ledger": base.ledger.model_copy(update={"data_dir": state_dir / "worker"}),
        "postgres": base.postgres.model_copy(update={"external": True}),
        "redis": base.redis.model_copy(update={"external": True}),
    })  # fmt: skip


def cluster_settings(base: Settings, state_dir: Path, brokers: int = BROKERS) -> Settings:
    """A ``brokers``-node cluster whose topics use the production profile."""
    addresses = ",".join(f"127.0.0.1:{FIRST_PORT + 100 * n}" for n in range(brokers))
    return _beside(base, state_dir,
                   {"bootstrap_servers": addresses, "topics_profile": "production"},
                   {"kafka_brokers": brokers, "kafka_controller_port": FIRST_PORT + 1})  # fmt: skip


SECURE_PORT = 29592


def secure_settings(base: Settings, state_dir: Path) -> Settings:
    """One secured node (``stack up --secure``) on its own ports; until ``Cluster.up``
    has made its users, nothing can connect as a role."""
    return _beside(base, state_dir, {"bootstrap_servers": f"127.0.0.1:{SECURE_PORT}"},
                   {"kafka_brokers": 1, "kafka_secure": True,
                    "kafka_controller_port": SECURE_PORT + 1})  # fmt: skip


@dataclass(frozen=True)
class PartitionState:
    topic: str
    partition: int
    leader: int
    replicas: tuple[int, ...]
    in_sync: tuple[int, ...]


class Cluster:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.nodes = {n.node_id: KafkaService(settings, n) for n in cluster_nodes(settings)}
        self._admin: AdminClient | None = None

    @property
    def admin(self) -> AdminClient:
        """Made on first use: before ``up`` it would only log refused connections."""
        if self._admin is None:
            self._admin = topic_admin.make_admin(self.settings)
        return self._admin

    def up(self) -> None:
        """Start every node not running, wait until all answer; apply the topics."""
        launcher.up(self.settings)
        if self.settings.stack.kafka_secure:  # from now on as the admin role
            self.settings = secure.role_settings(self.settings, secure.ADMIN)
        topic_admin.apply(self.admin, settings_topics(self.settings), timeout_s=60)

    def down(self) -> None:
        launcher.down(self.settings, wipe=True)

    def partitions(self, topic: str | None = None) -> list[PartitionState]:
        metadata = self.admin.list_topics(topic, timeout=10)
        return [PartitionState(name, p.id, p.leader, tuple(p.replicas), tuple(p.isrs))
                for name, t in metadata.topics.items() if not name.startswith("__")
                for p in t.partitions.values()]  # fmt: skip

    def leader(self, topic: str, partition: int) -> int:
        (state,) = [p for p in self.partitions(topic) if p.partition == partition]
        return state.leader

    def under_replicated(self) -> list[PartitionState]:
        return [p for p in self.partitions() if len(p.in_sync) < len(p.replicas)]

    def kill(self, node_id: int) -> None:
        """SIGKILL the node's JVM: no controlled shutdown, no flush."""
        pid = self.nodes[node_id].dir.running_pid()
        if pid is None:
            raise StackError(f"kafka node {node_id} is not running")
        signal_group(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while is_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)

    def restart(self) -> None:
        """Start the nodes that are down (their data kept) and wait until they answer."""
        launcher.up(self.settings)

    def wait_fully_replicated(self, timeout_s: float = 180) -> float:
        """Wait until no partition is under-replicated; return the seconds it took."""
        t0 = time.monotonic()
        while True:
            try:
                behind = self.under_replicated()
            except Exception as exc:  # the metadata request itself may time out meanwhile
                behind = [PartitionState(str(exc), -1, -1, (), ())]
            if not behind:
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout_s:
                raise AssertionError(f"under-replicated after {timeout_s} s: {behind[:5]}")
            time.sleep(0.5)


class LedgerClock:
    """When each new ledger entry arrived (read as it is appended): the pauses a failure
    caused are the long gaps between arrivals."""

    def __init__(self, settings: Settings, partitions: int) -> None:
        self.consumer = make_consumer(settings, f"clock-{uuid.uuid4().hex[:8]}",
                                      **{"isolation.level": "read_uncommitted"})  # fmt: skip
        self.consumer.assign([TopicPartition(LEDGER_TOPIC, p, OFFSET_END)
                              for p in range(partitions)])  # fmt: skip
        self.arrivals: list[float] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LedgerClock:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stopped.set()
        self.thread.join(30)
        self.consumer.close()

    def _run(self) -> None:
        while not self.stopped.is_set():
            for message in self.consumer.consume(500, timeout=0.2):
                if message.error() is None:
                    self.arrivals.append(time.monotonic())

    def longest_gap(self, start: float, end: float) -> float:
        """The longest time without a new entry that overlaps [start, end]."""
        times = sorted(self.arrivals)
        first = max(bisect.bisect_left(times, start) - 1, 0)
        last = bisect.bisect_right(times, end)
        window = times[first : last + 1]
        if len(window) < 2:
            return end - start
        return max(b - a for a, b in itertools.pairwise(window))

    def wait_for_entries(self, after: float, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while sum(1 for t in self.arrivals if t > after) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"fewer than {count} new ledger entries in {timeout_s} s")
            time.sleep(0.2)
