"""`topics apply` against the real broker: create, no-op, refuse drift without changing anything."""

from __future__ import annotations

import pytest
from confluent_kafka.admin import AdminClient

from kernel.errors import TopicDriftError
from streams import topic_admin
from streams.topics import TopicSpec, TopicsSpec
from testbed.topics import ScratchTopics

TIMEOUT_S = 30


def _spec(*topics: TopicSpec) -> TopicsSpec:
    return TopicsSpec(topics={t.name: t for t in topics}, co_partitioned={})


def test_project_topics_apply_twice_is_a_no_op(
    admin: AdminClient, project_topics: TopicsSpec
) -> None:
    before = topic_admin.describe(admin, list(project_topics.topics), TIMEOUT_S)
    report = topic_admin.apply(admin, project_topics, TIMEOUT_S)
    after = topic_admin.describe(admin, list(project_topics.topics), TIMEOUT_S)
    assert {p.action for p in report} == {"ok"}
    assert before == after


def test_create_then_ok_with_settings_applied(admin: AdminClient, scratch: ScratchTopics) -> None:
    commands = TopicSpec(scratch.name("commands"), 4, 1, {"cleanup.policy": "delete",
                         "retention.ms": "86400000"})  # fmt: skip
    snapshots = TopicSpec(scratch.name("snapshots"), 2, 1, {"cleanup.policy": "compact"})
    spec = _spec(commands, snapshots)

    first = topic_admin.apply(admin, spec, TIMEOUT_S)
    second = topic_admin.apply(admin, spec, TIMEOUT_S)

    assert [p.action for p in first] == ["created", "created"]
    assert [p.action for p in second] == ["ok", "ok"]
    state = topic_admin.describe(admin, [commands.name, snapshots.name], TIMEOUT_S)
    assert state[commands.name].partitions == 4
    assert state[commands.name].config["retention.ms"] == "86400000"
    assert state[snapshots.name].partitions == 2
    assert state[snapshots.name].config["cleanup.policy"] == "compact"


def test_drift_is_refused_precisely_and_nothing_changes(
    admin: AdminClient, scratch: ScratchTopics
) -> None:
    existing = TopicSpec(scratch.name("drift"), 3, 1, {"retention.ms": "86400000"})
    topic_admin.apply(admin, _spec(existing), TIMEOUT_S)
    missing = TopicSpec(scratch.name("never-created"), 1, 1, {})
    drifted = TopicSpec(existing.name, 6, 1, {"retention.ms": "3600000"})

    with pytest.raises(TopicDriftError) as caught:
        topic_admin.apply(admin, _spec(drifted, missing), TIMEOUT_S)

    message = str(caught.value)
    assert f"{existing.name}: partitions: broker has 3, topics.yaml says 6" in message
    assert f"{existing.name}: retention.ms: broker has '86400000', topics.yaml says '3600000'" in (
        message
    )
    state = topic_admin.describe(admin, [existing.name, missing.name], TIMEOUT_S)
    assert state[existing.name].partitions == 3
    assert state[existing.name].config["retention.ms"] == "86400000"
    assert missing.name not in state, "apply must not create anything when it refuses"


def test_plan_reports_drift_without_raising(admin: AdminClient, scratch: ScratchTopics) -> None:
    existing = TopicSpec(scratch.name("plan"), 2, 1, {})
    topic_admin.apply(admin, _spec(existing), TIMEOUT_S)
    plans = topic_admin.plan(admin, _spec(TopicSpec(existing.name, 5, 1, {})), TIMEOUT_S)
    assert [p.action for p in plans] == ["drift"]
    assert "partitions: broker has 2" in plans[0].differences[0]
