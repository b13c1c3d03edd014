"""compose.yaml describes the same stack as the launcher: same ports, same topics."""

from __future__ import annotations

import re

import yaml

from kernel.settings import PROJECT_ROOT, Settings
from streams.topics import load_topics

COMPOSE = yaml.safe_load((PROJECT_ROOT / "compose.yaml").read_text())


def _host_port(service: str) -> int:
    mapping = COMPOSE["services"][service]["ports"][0]
    host, port, _container = mapping.rsplit(":", 2)
    assert host == "127.0.0.1", f"{service} must publish on loopback only"
    return int(port)


def test_ports_match_the_default_settings() -> None:
    settings = Settings()
    assert f"127.0.0.1:{_host_port('kafka')}" == settings.kafka.bootstrap_servers
    assert f"127.0.0.1:{_host_port('postgres')}/" in settings.postgres_dsn
    assert f"127.0.0.1:{_host_port('redis')}/" in settings.redis_url


def test_kafka_version_matches_the_launcher() -> None:
    assert COMPOSE["services"]["kafka"]["image"] == f"apache/kafka:{Settings().stack.kafka_version}"


def test_topics_match_topics_yaml() -> None:
    script = COMPOSE["services"]["topics"]["command"][0]
    created = {
        m["name"]: (int(m["partitions"]), m["configs"])
        for m in re.finditer(
            r"^create (?P<name>\S+) (?P<partitions>\d+) (?P<configs>.+)$", script, re.MULTILINE
        )
    }
    spec = load_topics(PROJECT_ROOT / "topics.yaml")
    assert set(created) == set(spec.topics)
    for name, (partitions, configs) in created.items():
        assert partitions == spec[name].partitions, name
        wanted = {k: v for k, v in spec[name].config.items() if k in ("cleanup.policy",
                  "retention.ms")}  # fmt: skip
        assert dict(kv.split("=", 1) for kv in configs.split()) == wanted, name
