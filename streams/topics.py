"""The topic spec (``topics.yaml``): parsed and validated, no Kafka involved.

Every problem names the topic and the field, because this file is edited by
hand and a vague error costs an ops person an evening.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from kernel.errors import TopicSpecError
from kernel.settings import Settings, project_path

TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
CLEANUP_POLICIES = {"delete", "compact", "compact,delete"}
# Settings whose value is a number of ms/bytes where -1 means "unbounded".
NUMERIC_CONFIGS = {
    "retention.ms",
    "retention.bytes",
    "segment.ms",
    "segment.bytes",
    "min.compaction.lag.ms",
    "max.compaction.lag.ms",
    "delete.retention.ms",
    "min.insync.replicas",
    "max.message.bytes",
}
KNOWN_CONFIGS = NUMERIC_CONFIGS | {
    "cleanup.policy",
    "compression.type",
    "min.cleanable.dirty.ratio",
}
TOPIC_FIELDS = {"description", "partitions", "replication_factor", "config"}
# The topics as written are the local profile; another profile sets replication for all.
LOCAL_PROFILE = "local"
PROFILE_FIELDS = {"description", "replication_factor", "min.insync.replicas"}


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    replication_factor: int
    config: dict[str, str] = field(default_factory=dict)
    description: str = ""

    @property
    def compacted(self) -> bool:
        return "compact" in self.config.get("cleanup.policy", "delete")


@dataclass(frozen=True)
class TopicsSpec:
    topics: dict[str, TopicSpec]
    co_partitioned: dict[str, tuple[str, ...]]

    def __getitem__(self, name: str) -> TopicSpec:
        return self.topics[name]


def normalise_config_value(key: str, value: object) -> str:
    """The form Kafka reports a value in, so spec and broker compare as strings."""
    text = str(value).strip().lower() if isinstance(value, bool) else str(value).strip()
    if key == "cleanup.policy":
        return ",".join(sorted(part.strip() for part in text.split(",") if part.strip()))
    return text


def _int_field(topic: str, key: str, raw: Any, minimum: int) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise TopicSpecError(f"topic {topic}: {key} must be an integer, got {raw!r}")
    if raw < minimum:
        raise TopicSpecError(f"topic {topic}: {key} must be >= {minimum}, got {raw}")
    return raw


def _parse_config(topic: str, raw: Any) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise TopicSpecError(f"topic {topic}: config must be a mapping, got {type(raw).__name__}")
    config: dict[str, str] = {}
    for key, value in raw.items():
        if key not in KNOWN_CONFIGS:
            known = ", ".join(sorted(KNOWN_CONFIGS))
            raise TopicSpecError(f"topic {topic}: unknown config {key!r} (known: {known})")
        text = normalise_config_value(key, value)
        if key == "cleanup.policy" and text not in CLEANUP_POLICIES:
            raise TopicSpecError(
                f"topic {topic}: cleanup.policy must be delete, compact or compact,delete; "
                f"got {value!r}"
            )
        if key in NUMERIC_CONFIGS and not re.fullmatch(r"-1|\d+", text):
            raise TopicSpecError(
                f"topic {topic}: {key} must be a whole number or -1, got {value!r}"
            )
        config[key] = text
    return config


def _parse_topic(name: str, raw: Any) -> TopicSpec:
    if not TOPIC_NAME.match(name):
        raise TopicSpecError(f"topic {name!r}: names use letters, digits, '.', '_', '-' only")
    if not isinstance(raw, dict):
        raise TopicSpecError(f"topic {name}: expected a mapping of settings")
    unknown = set(raw) - TOPIC_FIELDS
    if unknown:
        raise TopicSpecError(f"topic {name}: unknown field(s) {', '.join(sorted(unknown))}")
    for required in ("partitions", "replication_factor"):
        if required not in raw:
            raise TopicSpecError(f"topic {name}: {required} is required")
    return TopicSpec(
        name=name,
        partitions=_int_field(name, "partitions", raw["partitions"], 1),
        replication_factor=_int_field(name, "replication_factor", raw["replication_factor"], 1),
        config=_parse_config(name, raw.get("config")),
        description=str(raw.get("description", "")),
    )


def _with_profile(topics: dict[str, TopicSpec], profiles: Any, profile: str,
                  source: str) -> dict[str, TopicSpec]:  # fmt: skip
    """The topics with ``profile``'s replication (the local profile: as written)."""
    if not isinstance(profiles, dict):
        raise TopicSpecError(f"{source}: profiles must be a mapping of profile names")
    known = sorted({LOCAL_PROFILE, *profiles})
    if profile not in known:
        raise TopicSpecError(f"{source}: no topic profile {profile!r} (known: {', '.join(known)})")
    raw = profiles.get(profile) or {}
    if not isinstance(raw, dict) or set(raw) - PROFILE_FIELDS:
        raise TopicSpecError(f"profile {profile}: set only {', '.join(sorted(PROFILE_FIELDS))}")
    changed: dict[str, TopicSpec] = {}
    for name, topic in topics.items():
        replicas = topic.replication_factor
        if "replication_factor" in raw:
            replicas = _int_field(f"{name} (profile {profile})", "replication_factor",
                                  raw["replication_factor"], 1)  # fmt: skip
        config = dict(topic.config)
        if "min.insync.replicas" in raw:
            config["min.insync.replicas"] = str(
                _int_field(f"{name} (profile {profile})", "min.insync.replicas",
                           raw["min.insync.replicas"], 1))  # fmt: skip
        in_sync = int(config.get("min.insync.replicas", "1"))
        if in_sync > replicas:
            raise TopicSpecError(
                f"topic {name} (profile {profile}): min.insync.replicas {in_sync} exceeds "
                f"replication_factor {replicas}: no write could ever succeed"
            )
        changed[name] = replace(topic, replication_factor=replicas, config=config)
    return changed


def parse_topics(text: str, source: str = "topics.yaml",
                 profile: str = LOCAL_PROFILE) -> TopicsSpec:  # fmt: skip
    """The spec in ``text`` with ``profile``'s replication (``profiles:`` in the file)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise TopicSpecError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("topics"), dict):
        raise TopicSpecError(f"{source}: expected a mapping with a 'topics' mapping")
    unknown = set(data) - {"topics", "co_partitioned", "profiles"}
    if unknown:
        raise TopicSpecError(f"{source}: unknown top-level key(s) {', '.join(sorted(unknown))}")
    topics = {name: _parse_topic(str(name), raw) for name, raw in data["topics"].items()}
    topics = _with_profile(topics, data.get("profiles") or {}, profile, source)
    groups: dict[str, tuple[str, ...]] = {}
    for group, members in (data.get("co_partitioned") or {}).items():
        if not isinstance(members, list) or len(members) < 2:
            raise TopicSpecError(f"co_partitioned.{group}: list at least two topics")
        missing = [m for m in members if m not in topics]
        if missing:
            raise TopicSpecError(
                f"co_partitioned.{group}: {', '.join(missing)} not declared under topics"
            )
        counts = {m: topics[m].partitions for m in members}
        if len(set(counts.values())) != 1:
            listed = ", ".join(f"{m}={n}" for m, n in counts.items())
            raise TopicSpecError(
                f"co_partitioned.{group}: partition counts differ ({listed}); "
                f"co-partitioned topics need the same count"
            )
        groups[str(group)] = tuple(members)
    return TopicsSpec(topics=topics, co_partitioned=groups)


def load_topics(path: Path, profile: str = LOCAL_PROFILE) -> TopicsSpec:
    try:
        text = path.read_text()
    except OSError as exc:
        raise TopicSpecError(f"cannot read topic spec {path}: {exc}") from exc
    return parse_topics(text, source=str(path), profile=profile)


def settings_topics(settings: Settings) -> TopicsSpec:
    """The project's topic spec in the profile the settings name (``kafka.topics_profile``)."""
    return load_topics(project_path(settings.topics_file), settings.kafka.topics_profile)
