"""Make the broker match ``topics.yaml``: create what is missing, refuse on drift.

Drift is never "fixed" here. Changing a partition count re-maps users to
partitions (breaking per-account order), and shortening a retention deletes
data; both deserve a human decision, so ``apply`` stops with the exact
differences and changes nothing at all.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from confluent_kafka import KafkaError, KafkaException, TopicCollection
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # re-exported, untyped
    AdminClient,
    ConfigResource,
    NewTopic,
)

from kernel.errors import StackError, TopicDriftError
from kernel.settings import Settings
from streams.kafka_clients import security_config
from streams.topics import TopicSpec, TopicsSpec, normalise_config_value


@dataclass(frozen=True)
class TopicState:
    name: str
    partitions: int
    replication_factor: int
    config: dict[str, str]


@dataclass(frozen=True)
class TopicPlan:
    name: str
    action: str  # create | ok | drift
    differences: tuple[str, ...] = ()


def make_admin(settings: Settings) -> AdminClient:
    return AdminClient(
        {
            **security_config(settings),
            "bootstrap.servers": settings.kafka.bootstrap_servers,
            "client.id": f"{settings.kafka.client_id}-admin",
            "socket.timeout.ms": settings.kafka.request_timeout_ms,
        }
    )


def describe(admin: AdminClient, names: list[str], timeout_s: float) -> dict[str, TopicState]:
    """The current state of those of ``names`` that exist."""
    try:
        metadata = admin.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        raise StackError(f"Kafka does not answer: {exc}; is the stack up?") from exc
    present = [name for name in names if name in metadata.topics]
    if not present:
        return {}
    futures = admin.describe_configs(
        [ConfigResource(ConfigResource.Type.TOPIC, name) for name in present],
        request_timeout=timeout_s,
    )
    states: dict[str, TopicState] = {}
    for resource, future in futures.items():
        try:
            entries = future.result(timeout=timeout_s)
        except KafkaException as exc:
            # In a cluster the broker answering DescribeConfigs may not have heard of a
            # topic that another one just listed: it is not visible yet, and `apply`
            # waits for it as for a topic missing from the metadata.
            if exc.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise
            continue
        topic = metadata.topics[resource.name]
        replicas = {len(p.replicas) for p in topic.partitions.values()} or {0}
        states[resource.name] = TopicState(
            name=resource.name,
            partitions=len(topic.partitions),
            replication_factor=min(replicas),
            config={key: entry.value for key, entry in entries.items()},
        )
    return states


def differences(spec: TopicSpec, state: TopicState) -> tuple[str, ...]:
    found: list[str] = []
    if state.partitions != spec.partitions:
        found.append(
            f"partitions: broker has {state.partitions}, topics.yaml says {spec.partitions} "
            f"(never changed automatically: it would move users to other partitions)"
        )
    if state.replication_factor != spec.replication_factor:
        found.append(
            f"replication_factor: broker has {state.replication_factor}, "
            f"topics.yaml says {spec.replication_factor}"
        )
    for key, wanted in spec.config.items():
        actual = state.config.get(key)
        if actual is None or normalise_config_value(key, actual) != wanted:
            found.append(f"{key}: broker has {actual!r}, topics.yaml says {wanted!r}")
    return tuple(found)


def plan(admin: AdminClient, spec: TopicsSpec, timeout_s: float) -> list[TopicPlan]:
    states = describe(admin, list(spec.topics), timeout_s)
    plans: list[TopicPlan] = []
    for name, topic in spec.topics.items():
        state = states.get(name)
        if state is None:
            plans.append(TopicPlan(name, "create"))
            continue
        diff = differences(topic, state)
        plans.append(TopicPlan(name, "drift" if diff else "ok", diff))
    return plans


def apply(admin: AdminClient, spec: TopicsSpec, timeout_s: float) -> list[TopicPlan]:
    """Create missing topics; raise :class:`TopicDriftError` (changing nothing) on drift."""
    plans = plan(admin, spec, timeout_s)
    drifted = [p for p in plans if p.action == "drift"]
    if drifted:
        lines = [f"  {p.name}: {d}" for p in drifted for d in p.differences]
        raise TopicDriftError(
            "existing topics differ from the spec; nothing was changed:\n" + "\n".join(lines)
        )
    to_create = [spec[p.name] for p in plans if p.action == "create"]
    if to_create:
        futures = admin.create_topics(
            [
                NewTopic(t.name, t.partitions, t.replication_factor, config=dict(t.config))
                for t in to_create
            ],
            request_timeout=timeout_s,
        )
        for name, future in futures.items():
            try:
                future.result(timeout=timeout_s)
            except KafkaException as exc:
                # Another `apply` may have created it a moment ago; the re-check
                # below decides whether that is fine or drift.
                if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":
                    raise StackError(f"creating topic {name} failed: {exc}") from exc
        # The broker's metadata may show a new topic a moment after creating it: wait until
        # every created topic is visible, so that nobody after `apply` sees it missing.
        deadline = time.monotonic() + timeout_s
        recheck = {p.name: p for p in plan(admin, spec, timeout_s)}
        while any(p.action == "create" for p in recheck.values()):
            if time.monotonic() > deadline:
                raise StackError(f"topics created but not visible after {timeout_s:.0f} s")
            time.sleep(0.1)
            recheck = {p.name: p for p in plan(admin, spec, timeout_s)}
        still_wrong = [p for p in recheck.values() if p.action == "drift"]
        if still_wrong:
            lines = [f"  {p.name}: {d}" for p in still_wrong for d in p.differences]
            raise TopicDriftError("topics created concurrently differ:\n" + "\n".join(lines))
    return [TopicPlan(p.name, "created" if p.action == "create" else "ok") for p in plans]


def delete(admin: AdminClient, names: list[str], timeout_s: float) -> None:
    """Delete topics (scratch topics of demos, tests and benchmarks)."""
    existing = set(admin.list_topics(timeout=timeout_s).topics)
    doomed = [name for name in names if name in existing]
    if doomed:
        for future in admin.delete_topics(doomed, request_timeout=timeout_s).values():
            future.result(timeout=timeout_s)


def topic_id(admin: AdminClient, name: str, timeout_s: float) -> str:
    """The topic's id: a topic deleted and created again under the same name gets a new one,
    so what was derived from the old log (a state snapshot) is never taken for the new."""
    try:
        future = admin.describe_topics(TopicCollection([name]), request_timeout=timeout_s)[name]
        return str(future.result(timeout=timeout_s).topic_id)
    except KafkaException as exc:
        raise StackError(f"cannot describe topic {name}: {exc}") from exc
