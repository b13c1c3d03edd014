"""Apache Kafka in KRaft mode (one combined broker + controller) from Maven jars.

The jars are resolved by Maven from ``stack/kafka/pom.xml`` into a cache outside
the repository (``stack.cache_dir``), once per Kafka version; the second start
downloads nothing. Storage is formatted with Kafka's own ``StorageTool``.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import uuid
from pathlib import Path

from kernel.errors import StackError
from kernel.settings import Settings
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


def bootstrap_address(settings: Settings) -> tuple[str, int]:
    first = settings.kafka.bootstrap_servers.split(",")[0].strip()
    host, _, port = first.rpartition(":")
    if not host or not port.isdigit():
        raise StackError(f"kafka.bootstrap_servers must be host:port, got {first!r}")
    return host, int(port)


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


def _server_properties(settings: Settings, data_dir: Path) -> str:
    host, port = bootstrap_address(settings)
    controller = settings.stack.kafka_controller_port
    lines = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@{host}:{controller}",
        "listeners": f"PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller}",
        "advertised.listeners": f"PLAINTEXT://{host}:{port}",
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "inter.broker.listener.name": "PLAINTEXT",
        "log.dirs": str(data_dir),
        # Topics are created from topics.yaml only; a typo must not invent a topic.
        "auto.create.topics.enable": "false",
        "num.partitions": "1",
        # One node: every internal topic has one replica, so that consumer
        # groups, idempotent producers and transactions work.
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "default.replication.factor": "1",
        "min.insync.replicas": "1",
        # Tests and demos start consumer groups often; do not wait 3 s each time.
        "group.initial.rebalance.delay.ms": "0",
    }
    return "".join(f"{key}={value}\n" for key, value in lines.items())


class KafkaService:
    name = "kafka"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.dir = ServiceDir(self.name, settings.stack.state_dir / self.name)

    @property
    def address(self) -> str:
        return self.settings.kafka.bootstrap_servers

    def _java(self) -> str:
        java = shutil.which("java")
        if java is None:
            raise StackError(
                "Java 17+ is needed for Kafka: apt-get install openjdk-17-jre-headless"
            )
        return java

    def start(self) -> int | None:
        """Start the broker unless ours is running; return the PID started, or None."""
        if self.dir.running_pid() is not None:
            return None
        host, port = bootstrap_address(self.settings)
        for busy in (port, self.settings.stack.kafka_controller_port):
            refuse_taken_port(host, busy, "KAFKA_BOOTSTRAP_SERVERS")
        libs, _ = ensure_jars(self.settings)
        java = self._java()
        root = self.dir.root
        data_dir = root / "data"
        root.mkdir(parents=True, exist_ok=True)
        config = root / "server.properties"
        config.write_text(_server_properties(self.settings, data_dir))
        log4j = root / "log4j2.yaml"
        log4j.write_text(LOG4J2_YAML)
        classpath = f"{libs}/*"
        if not (data_dir / "meta.properties").exists():
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
            fmt = subprocess.run(
                [java, "-cp", classpath, f"-Dlog4j2.configurationFile={log4j}",
                 "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(config)],
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
        from confluent_kafka.admin import AdminClient

        host, port = bootstrap_address(self.settings)
        if not port_open(host, port):
            return False
        admin = AdminClient({"bootstrap.servers": self.address, "log_level": 0})
        try:
            metadata = admin.list_topics(timeout=2)
        except Exception:  # not ready yet: the broker answers only once registered
            return False
        return bool(metadata.brokers)
