"""confluent-kafka producers and consumers with every option that matters set explicitly.

The partitioner above all: librdkafka hashes keys with CRC32 by default, while
aiokafka (Faust) and the Java clients use murmur2. If our producers kept the
default, one user's commands could land on another partition than Faust sends
that user's entries to, and per-account order would break. ``murmur2_random``
is murmur2 for keyed messages (random only for key-less ones).
"""

from __future__ import annotations

import uuid
from typing import Any

from aiokafka.partitioner import murmur2
from confluent_kafka import Consumer, Producer, TopicPartition

from kernel.errors import StackError
from kernel.settings import Settings

PARTITIONER = "murmur2_random"


def partition_of(key: str, partitions: int) -> int:
    """The partition murmur2 gives ``key``: what our producers, Faust and Java compute."""
    hashed: int = murmur2(key.encode())
    return (hashed & 0x7FFFFFFF) % partitions


def security_config(settings: Settings) -> dict[str, Any]:
    """librdkafka's security settings from ``settings.kafka``: every client gets them."""
    kafka = settings.kafka
    config: dict[str, Any] = {"security.protocol": kafka.security_protocol}
    if kafka.security_protocol.startswith("SASL_"):
        config.update({"sasl.mechanism": kafka.sasl_mechanism,
                       "sasl.username": kafka.sasl_username,
                       "sasl.password": kafka.sasl_password.get_secret_value()})  # fmt: skip
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        if kafka.ssl_ca_file is not None:
            config["ssl.ca.location"] = str(kafka.ssl_ca_file)
        if kafka.ssl_certificate_file is not None and kafka.ssl_key_file is not None:
            config["ssl.certificate.location"] = str(kafka.ssl_certificate_file)
            config["ssl.key.location"] = str(kafka.ssl_key_file)
        config["ssl.endpoint.identification.algorithm"] = (
            "https" if kafka.ssl_check_hostname else "none")  # fmt: skip
    return config


def producer_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        **security_config(settings),
        "bootstrap.servers": settings.kafka.bootstrap_servers,
        "client.id": f"{settings.kafka.client_id}-producer",
        "partitioner": PARTITIONER,
        # Idempotence: retries can neither duplicate nor reorder within a partition.
        "enable.idempotence": True,
        "acks": "all",
        "max.in.flight.requests.per.connection": 5,
        "linger.ms": settings.kafka.linger_ms,
        "compression.type": "lz4",
        "request.timeout.ms": settings.kafka.request_timeout_ms,
        "delivery.timeout.ms": settings.kafka.delivery_timeout_ms,
    }
    config.update(overrides)
    return config


def make_producer(settings: Settings, **overrides: Any) -> Producer:
    return Producer(producer_config(settings, **overrides))


def consumer_config(settings: Settings, group_id: str, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        **security_config(settings),
        "bootstrap.servers": settings.kafka.bootstrap_servers,
        "client.id": f"{settings.kafka.client_id}-consumer",
        "group.id": group_id,
        # Offsets are committed by the code, after the work they cover is durable.
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        # Never read records of aborted transactions.
        "isolation.level": "read_committed",
        "session.timeout.ms": 30000,
    }
    config.update(overrides)
    return config


def make_consumer(settings: Settings, group_id: str, **overrides: Any) -> Consumer:
    return Consumer(consumer_config(settings, group_id, **overrides))


def watermarks(settings: Settings, topic: str) -> dict[int, tuple[int, int]]:
    """(low, high) offsets of every partition of ``topic`` now (a throw-away group)."""
    consumer = make_consumer(settings, f"{settings.kafka.client_id}-marks-{uuid.uuid4().hex[:8]}")
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if metadata is None or metadata.error is not None:
            raise StackError(f"topic {topic} not found; run `creditledger topics apply`")
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                for p in sorted(metadata.partitions)}  # fmt: skip
    finally:
        consumer.close()
