"""`describe` in a cluster: the broker that answers DescribeConfigs may lag the one that
listed the topics (a CI run of the broker-failure test failed so, right after a create)."""

from __future__ import annotations

from concurrent.futures import Future
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from streams import topic_admin


class LaggingAdmin:
    """Lists ``known`` topics; DescribeConfigs fails with ``error`` for ``lagging``."""

    def __init__(self, known: list[str], lagging: set[str], error: int) -> None:
        self.known, self.lagging, self.error = known, lagging, error

    def list_topics(self, timeout: float) -> Any:
        partition = SimpleNamespace(replicas=[1])
        return SimpleNamespace(topics={name: SimpleNamespace(partitions={0: partition})
                                       for name in self.known})  # fmt: skip

    def describe_configs(self, resources: list[Any], request_timeout: float) -> Any:
        futures: dict[Any, Future[Any]] = {}
        for resource in resources:
            future: Future[Any] = Future()
            if resource.name in self.lagging:
                future.set_exception(KafkaException(KafkaError(self.error)))
            else:
                future.set_result({})
            futures[resource] = future
        return futures


def test_a_topic_the_configs_broker_does_not_know_yet_is_not_visible_yet() -> None:
    admin = LaggingAdmin(["a", "b"], {"b"}, KafkaError.UNKNOWN_TOPIC_OR_PART)
    states = topic_admin.describe(admin, ["a", "b"], timeout_s=1)  # type: ignore[arg-type]
    assert set(states) == {"a"}
    assert states["a"].partitions == 1


def test_other_describe_errors_still_raise() -> None:
    admin = LaggingAdmin(["a"], {"a"}, KafkaError.TOPIC_AUTHORIZATION_FAILED)
    with pytest.raises(KafkaException):
        topic_admin.describe(admin, ["a"], timeout_s=1)  # type: ignore[arg-type]
