"""Uniquely named scratch topics for one test or run, deleted afterwards."""

from __future__ import annotations

from confluent_kafka.admin import AdminClient

from streams import topic_admin
from streams.topics import TopicSpec, TopicsSpec


class ScratchTopics:
    """Creates uniquely named topics for one test and deletes them afterwards."""

    def __init__(self, admin: AdminClient, unique: str) -> None:
        self.admin = admin
        self.unique = unique
        self.names: list[str] = []

    def name(self, label: str) -> str:
        name = f"test.{label}.{self.unique}"
        self.names.append(name)
        return name

    def create(self, label: str, partitions: int, **config: str) -> str:
        name = self.name(label)
        spec = TopicsSpec(
            topics={name: TopicSpec(name, partitions, 1, dict(config))}, co_partitioned={}
        )
        topic_admin.apply(self.admin, spec, timeout_s=30)
        return name

    def cleanup(self) -> None:
        topic_admin.delete(self.admin, self.names, timeout_s=30)
