"""Where the launcher's Kafka nodes listen and how they are configured (no process)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kernel.errors import StackError
from kernel.settings import Settings
from stack.kafka import _server_properties, cluster_nodes


def _settings(brokers: int, bootstrap: str = "127.0.0.1:19092") -> Settings:
    return Settings.model_validate(
        {"kafka": {"bootstrap_servers": bootstrap}, "stack": {"kafka_brokers": brokers}}
    )


def test_one_node_by_default_on_the_bootstrap_address() -> None:
    (node,) = cluster_nodes(Settings())
    assert (node.node_id, node.address, node.controller_port) == (1, "127.0.0.1:19092", 19093)


def test_a_cluster_steps_ports_from_one_address_or_takes_one_per_node() -> None:
    stepped = cluster_nodes(_settings(3))
    assert [(n.port, n.controller_port) for n in stepped] == [
        (19092, 19093), (19192, 19193), (19292, 19293)]  # fmt: skip
    listed = cluster_nodes(_settings(3, "127.0.0.1:1,127.0.0.1:2,127.0.0.1:3"))
    assert [n.port for n in listed] == [1, 2, 3]
    with pytest.raises(StackError, match=r"lists 2 addresses but stack\.kafka_brokers is 3"):
        cluster_nodes(_settings(3, "127.0.0.1:1,127.0.0.1:2"))


def _properties(settings: Settings, node: int) -> dict[str, str]:
    text = _server_properties(settings, cluster_nodes(settings)[node - 1], Path("/data"))
    return dict(line.split("=", 1) for line in text.splitlines())


def test_cluster_nodes_share_the_quorum_and_replicate_internal_topics() -> None:
    settings = _settings(3)
    second = _properties(settings, 2)
    assert second["node.id"] == "2"
    assert second["controller.quorum.voters"] == (
        "1@127.0.0.1:19093,2@127.0.0.1:19193,3@127.0.0.1:19293")  # fmt: skip
    assert second["listeners"].startswith("PLAINTEXT://127.0.0.1:19192,")
    for key in ("offsets.topic.replication.factor", "default.replication.factor",
                "transaction.state.log.replication.factor"):  # fmt: skip
        assert second[key] == "3", key
    assert second["min.insync.replicas"] == "2"
    assert second["unclean.leader.election.enable"] == "false"
    single = _properties(Settings(), 1)
    assert (single["offsets.topic.replication.factor"], single["min.insync.replicas"]) == ("1", "1")


def test_a_cluster_id_never_starts_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    """The format tool read `-t -Xyz...` as an option without its value: 1 start in 64
    failed that way (seen in CI)."""
    import uuid

    from stack import kafka

    dash_first = uuid.UUID(bytes=b"\xf8" + bytes(15))  # base64 '-' is 62: 0b111110xx
    ids = iter([dash_first, dash_first, uuid.UUID(int=1)])
    monkeypatch.setattr(uuid, "uuid4", lambda: next(ids))
    cluster_id = kafka.new_cluster_id()
    assert not cluster_id.startswith("-")
    assert cluster_id == "AAAAAAAAAAAAAAAAAAAAAQ"
