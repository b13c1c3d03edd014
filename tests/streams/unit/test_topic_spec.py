"""Parsing and validating topics.yaml (no Kafka)."""

from __future__ import annotations

import pytest

from kernel.errors import TopicSpecError
from kernel.settings import PROJECT_ROOT
from streams.topics import load_topics, normalise_config_value, parse_topics

DESIGN_TOPICS = {
    "credit.charge.requested",
    "credit.grant.requested",
    "credit.ledger.entries",
    "credit.commands.rejected",
}


def test_project_spec_declares_the_design_topics() -> None:
    spec = load_topics(PROJECT_ROOT / "topics.yaml")
    assert set(spec.topics) >= DESIGN_TOPICS


def test_project_spec_co_partitions_commands_and_ledger() -> None:
    spec = load_topics(PROJECT_ROOT / "topics.yaml")
    group = spec.co_partitioned["ledger"]
    assert set(group) == {"credit.charge.requested", "credit.grant.requested",
                          "credit.ledger.entries"}  # fmt: skip
    assert len({spec[name].partitions for name in group}) == 1


def test_project_spec_retention_policy() -> None:
    spec = load_topics(PROJECT_ROOT / "topics.yaml")
    assert spec["credit.ledger.entries"].config["retention.ms"] == "-1"
    for name in ("credit.charge.requested", "credit.grant.requested", "credit.commands.rejected"):
        assert int(spec[name].config["retention.ms"]) > 0, name


def test_compaction_is_parsed() -> None:
    spec = parse_topics(
        "topics:\n  snap:\n    partitions: 3\n    replication_factor: 1\n"
        "    config:\n      cleanup.policy: delete, compact\n"
    )
    assert spec["snap"].config["cleanup.policy"] == "compact,delete"
    assert spec["snap"].compacted


VALID = "topics:\n  a:\n    partitions: 3\n    replication_factor: 1\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("topics: [", "not valid YAML"),
        ("nothing: here", "expected a mapping with a 'topics'"),
        ("topics:\n  a:\n    replication_factor: 1\n", "topic a: partitions is required"),
        (
            "topics:\n  a:\n    partitions: 0\n    replication_factor: 1\n",
            "partitions must be >= 1",
        ),
        ("topics:\n  a:\n    partitions: '3'\n    replication_factor: 1\n", "must be an integer"),
        ("topics:\n  'a b':\n    partitions: 1\n    replication_factor: 1\n", "names use letters"),
        (VALID.replace("partitions", "partitons"), "unknown field"),
        (VALID + "    config:\n      cleanup.policy: forever\n", "cleanup.policy must be"),
        (VALID + "    config:\n      retention.ms: 7d\n", "retention.ms must be a whole number"),
        (VALID + "    config:\n      retention.msec: 1\n", "unknown config 'retention.msec'"),
        (VALID + "co_partitioned:\n  g: [a, b]\n", "b not declared"),
        (VALID + "extra: 1\n", "unknown top-level key"),
    ],
)
def test_bad_specs_name_the_topic_and_field(text: str, message: str) -> None:
    with pytest.raises(TopicSpecError, match=message):
        parse_topics(text)


def test_co_partitioned_topics_must_agree() -> None:
    text = (
        "co_partitioned:\n  ledger: [a, b]\n"
        "topics:\n"
        "  a:\n    partitions: 6\n    replication_factor: 1\n"
        "  b:\n    partitions: 4\n    replication_factor: 1\n"
    )
    with pytest.raises(TopicSpecError, match=r"partition counts differ \(a=6, b=4\)"):
        parse_topics(text)


def test_broker_values_normalise_like_spec_values() -> None:
    assert normalise_config_value("cleanup.policy", "delete,compact") == "compact,delete"
    assert normalise_config_value("retention.ms", -1) == "-1"


def test_production_profile_replicates_every_topic_three_times() -> None:
    local = load_topics(PROJECT_ROOT / "topics.yaml")
    production = load_topics(PROJECT_ROOT / "topics.yaml", "production")
    assert set(production.topics) == set(local.topics)
    for name, topic in production.topics.items():
        assert local[name].replication_factor == 1, name
        assert (topic.replication_factor, topic.config["min.insync.replicas"]) == (3, "2"), name
        assert topic.partitions == local[name].partitions, name


@pytest.mark.parametrize(
    ("profiles", "profile", "message"),
    [
        ("profiles:\n  prod:\n    replication_factor: 3\n", "staging",
         "no topic profile 'staging'"),
        ("profiles:\n  prod:\n    partitions: 3\n", "prod", "set only"),
        ("profiles:\n  prod:\n    replication_factor: 2\n    min.insync.replicas: 3\n", "prod",
         "min.insync.replicas 3 exceeds replication_factor 2"),
    ],
)  # fmt: skip
def test_bad_profiles_are_refused(profiles: str, profile: str, message: str) -> None:
    with pytest.raises(TopicSpecError, match=message):
        parse_topics(VALID + profiles, profile=profile)
