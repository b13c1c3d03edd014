"""Apache Kafka in KRaft mode from Maven jars: one node, or a cluster of combined
broker + controller nodes (``stack.kafka_brokers``), each with its own ports and folder.

The jars are resolved by Maven from ``stack/kafka/pom.xml`` into a cache outside
the repository (``stack.cache_dir``), once per Kafka version; the second start
downloads nothing. Storage is formatted with Kafka's own ``StorageTool``.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

from kernel.errors import StackError
from kernel.settings import Settings
from stack import secure
from stack.processes import ServiceDir, port_open, refuse_taken_port

POM = Path(__file__).resolve().parent / "kafka" / "pom.xml"

LOG4J2_YAML = """\
Configuration:
  Appenders:
    Console:
      name: STDOUT
      PatternLayout:
        pattern: "[%d] %p %m (%c)%n"
  Loggers:
    Logger:
      - name: kafka.request.logger
        level: WARN
      - name: org.apache.kafka.controller
        level: INFO
    Root:
      level: INFO
      AppenderRef:
        - ref: STDOUT
"""


# Node n of a cluster listens NODE_PORT_STEP * (n - 1) above node 1's ports, unless
# kafka.bootstrap_servers lists one address per node.
NODE_PORT_STEP = 100


@dataclass(frozen=True)
class KafkaNode:
    """Where one node of the local cluster listens (combined broker and controller)."""

    node_id: int
    host: str
    port: int
    controller_port: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def _host_port(entry: str) -> tuple[str, int]:
    host, _, port = entry.strip().rpartition(":")
    if not host or not port.isdigit():
        raise StackError(f"kafka.bootstrap_servers must be host:port[,host:port], got {entry!r}")
    return host, int(port)


def cluster_nodes(settings: Settings) -> list[KafkaNode]:
    """The nodes ``stack.kafka_brokers`` asks for, addressed from ``kafka.bootstrap_servers``."""
    count = settings.stack.kafka_brokers
    entries = [_host_port(e) for e in settings.kafka.bootstrap_servers.split(",") if e.strip()]
    controller = settings.stack.kafka_controller_port
    if len(entries) == 1:
        host, port = entries[0]
        entries = [(host, port + NODE_PORT_STEP * i) for i in range(count)]
    if len(entries) != count:
        raise StackError(
            f"kafka.bootstrap_servers lists {len(entries)} addresses but stack.kafka_brokers is "
            f"{count}: list one (node n then listens {NODE_PORT_STEP}*(n-1) above it) or one "
            "per node"
        )
    return [KafkaNode(i + 1, host, port, controller + NODE_PORT_STEP * i)
            for i, (host, port) in enumerate(entries)]  # fmt: skip


def bootstrap_address(settings: Settings) -> tuple[str, int]:
    return _host_port(settings.kafka.bootstrap_servers.split(",")[0])


def jars_dir(settings: Settings) -> Path:
    cache = settings.stack.cache_dir.expanduser()
    return cache / f"kafka-{settings.stack.kafka_version}" / "libs"


def ensure_jars(settings: Settings) -> tuple[Path, bool]:
    """Resolve Kafka's runtime jars into the cache; return (dir, downloaded_now)."""
    libs = jars_dir(settings)
    complete = libs / ".complete"
    if complete.exists():
        return libs, False
    mvn = shutil.which("mvn")
    if mvn is None:
        raise StackError(
            "Maven (mvn) is needed once to fetch the Kafka jars: apt-get install maven"
        )
    staging = libs.with_name("libs.partial")
    shutil.rmtree(staging, ignore_errors=True)
    command = [
        mvn,
        "-B",
        "-q",
        "-f",
        str(POM),
        f"-Dkafka.version={settings.stack.kafka_version}",
        "dependency:copy-dependencies",
        "-DincludeScope=runtime",
        f"-DoutputDirectory={staging}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise StackError(
            f"resolving Kafka {settings.stack.kafka_version} jars with Maven failed "
            f"(exit {result.returncode}):\n{(result.stdout + result.stderr)[-3000:]}"
        )
    if not any(staging.glob("kafka_2.13-*.jar")):
        raise StackError(f"Maven finished but no kafka_2.13 jar is in {staging}")
    shutil.rmtree(libs, ignore_errors=True)
    staging.rename(libs)
    complete.write_text(settings.stack.kafka_version + "\n")
    return libs, True


def _server_properties(settings: Settings, node: KafkaNode, data_dir: Path) -> str:
    nodes = cluster_nodes(settings)
    # Internal topics get every node's copy up to 3; with 3 or more nodes a write needs 2
    # in sync, the same durability the production topic profile asks of ours.
    replicas = min(3, len(nodes))
    in_sync = 2 if replicas >= 3 else 1
    voters = ",".join(f"{n.node_id}@{n.host}:{n.controller_port}" for n in nodes)
    lines = {
        "process.roles": "broker,controller",
        "node.id": str(node.node_id),
        "controller.quorum.voters": voters,
        "listeners": f"PLAINTEXT://{node.address},CONTROLLER://{node.host}:{node.controller_port}",
        "advertised.listeners": f"PLAINTEXT://{node.address}",
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "inter.broker.listener.name": "PLAINTEXT",
        "log.dirs": str(data_dir),
        # Topics are created from topics.yaml only; a typo must not invent a topic.
        "auto.create.topics.enable": "false",
        "num.partitions": "1",
        # Consumer groups, idempotent producers and transactions need their internal
        # topics; one node means one replica of each.
        "offsets.topic.replication.factor": str(replicas),
        "transaction.state.log.replication.factor": str(replicas),
        "transaction.state.log.min.isr": str(in_sync),
        "share.coordinator.state.topic.replication.factor": str(replicas),
        "share.coordinator.state.topic.min.isr": str(in_sync),
        "default.replication.factor": str(replicas),
        "min.insync.replicas": str(in_sync),
        # Durability stated, not inherited: a replica that missed writes never becomes
        # leader (that would drop acknowledged ledger entries).
        "unclean.leader.election.enable": "false",
        # Tests and demos start consumer groups often; do not wait 3 s each time.
        "group.initial.rebalance.delay.ms": "0",
    }
    if settings.stack.kafka_secure:
        material = secure.SecureMaterial(secure.material_dir(settings))
        lines.update(secure.listener_properties(material, node.host, node.port,
                                                node.controller_port))  # fmt: skip
    return "".join(f"{key}={value}\n" for key, value in lines.items())


def _java() -> str:
    java = shutil.which("java")
    if java is None:
        raise StackError("Java 17+ is needed for Kafka: apt-get install openjdk-17-jre-headless")
    return java


def new_cluster_id() -> str:
    """A random Kafka cluster id. Never one that starts with '-' (1 in 64 would): the format
    tool's argument parser takes ``-t -abc...`` for an option without its value, and the
    stack failed to start."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def _cluster_id(settings: Settings) -> str:
    """One id for every node of the cluster, made on the first format and kept."""
    if settings.stack.kafka_brokers == 1:
        return new_cluster_id()
    path = cluster_root(settings) / "cluster.id"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(new_cluster_id() + "\n")
    return path.read_text().strip()


def kafka_home(settings: Settings, secured: bool | None = None) -> Path:
    """Where the Kafka nodes keep their folders: a secured stack apart from a plain one,
    because its nodes are formatted with their users (and a plain node has none)."""
    secured = settings.stack.kafka_secure if secured is None else secured
    return settings.stack.state_dir / "secure" if secured else settings.stack.state_dir


def cluster_root(settings: Settings, secured: bool | None = None) -> Path:
    return kafka_home(settings, secured) / "kafka-cluster"


@dataclass(frozen=True)
class NodeDir:
    dir: ServiceDir
    secure: bool
    clustered: bool


def node_dirs(settings: Settings) -> list[NodeDir]:
    """Every Kafka node folder under the state dir, whatever ``kafka_brokers`` and
    ``kafka_secure`` say now: what ``down`` and ``status`` look at."""
    found: list[NodeDir] = []
    for secured in (False, True):
        home = kafka_home(settings, secured)
        found.append(NodeDir(ServiceDir("kafka", home / "kafka"), secured, False))
        found += [NodeDir(ServiceDir(f"kafka-{d.name.removeprefix('node-')}", d), secured, True)
                  for d in sorted(cluster_root(settings, secured).glob("node-*"))]  # fmt: skip
    return found


class KafkaService:
    """One node of the local Kafka (the only one unless ``stack.kafka_brokers`` > 1)."""

    def __init__(self, settings: Settings, node: KafkaNode | None = None) -> None:
        self.settings = settings
        self.node = node or cluster_nodes(settings)[0]
        if settings.stack.kafka_brokers == 1:
            self.name = "kafka"
            root = kafka_home(settings) / "kafka"
        else:
            self.name = f"kafka-{self.node.node_id}"
            root = cluster_root(settings) / f"node-{self.node.node_id}"
        self.dir = ServiceDir(self.name, root)

    @property
    def address(self) -> str:
        return self.node.address

    def start(self) -> int | None:
        """Start the node unless ours is running; return the PID started, or None."""
        if self.dir.running_pid() is not None:
            return None
        busy = [self.node.port, self.node.controller_port]
        scram: list[str] = []
        if self.settings.stack.kafka_secure:
            busy.append(self.node.port + secure.BROKER_PORT_OFFSET)
            scram = secure.scram_arguments(secure.ensure_material(self.settings))
        for port in busy:
            refuse_taken_port(self.node.host, port, "KAFKA_BOOTSTRAP_SERVERS")
        libs, _ = ensure_jars(self.settings)
        java = _java()
        root = self.dir.root
        data_dir = root / "data"
        root.mkdir(parents=True, exist_ok=True)
        config = root / "server.properties"
        config.write_text(_server_properties(self.settings, self.node, data_dir))
        log4j = root / "log4j2.yaml"
        log4j.write_text(LOG4J2_YAML)
        classpath = f"{libs}/*"
        if not (data_dir / "meta.properties").exists():
            fmt = subprocess.run(
                [java, "-cp", classpath, f"-Dlog4j2.configurationFile={log4j}",
                 "kafka.tools.StorageTool", "format", "-t", _cluster_id(self.settings),
                 "-c", str(config), *scram],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            if fmt.returncode != 0:
                raise StackError(f"Kafka storage format failed:\n{fmt.stdout}{fmt.stderr}")
        heap = f"{self.settings.stack.kafka_heap_mb}m"
        argv = [
            java, f"-Xms{heap}", f"-Xmx{heap}", "-XX:+UseG1GC", "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={log4j}", "-cp", classpath,
            "kafka.Kafka", str(config),
        ]  # fmt: skip
        return self.dir.spawn(argv)

    def ready(self) -> bool:
        """The node answers and has registered itself with the cluster."""
        from confluent_kafka.admin import AdminClient

        if not port_open(self.node.host, self.node.port):
            return False
        if self.settings.stack.kafka_secure:
            admin = secure.admin_client(self.settings, self.address)
        else:
            admin = AdminClient({"bootstrap.servers": self.address, "log_level": 0})
        try:
            metadata = admin.list_topics(timeout=2)
        except Exception:  # not ready yet: the broker answers only once registered
            return False
        return self.node.node_id in metadata.brokers
