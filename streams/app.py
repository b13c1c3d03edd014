"""The Faust app the ledger workers run in: broker settings that carry the correctness
argument, with no topic, table or business rule of its own (``agents.app`` adds those).

Settings that carry the correctness argument (ARCHITECTURE.md):
- ``processing_guarantee="at_least_once"``: Faust's exactly_once mode is not
  trusted (faust-streaming #517, #323); correctness comes from the design.
- ``stream_wait_empty=True``: on a rebalance Faust waits for the batch in
  flight before it gives the partition away.
- one agent instance (concurrency 1), so one batch in flight per worker.
- ``topic_allow_declare=False``: topics come from ``topics.yaml`` only.
- ``table_standby_replicas=0``: a new owner recovers from the ledger itself.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import faust

from kernel.settings import Settings


def broker_credentials(settings: Settings) -> faust.auth.Credentials | None:
    """``settings.kafka``'s security for Faust's aiokafka clients (the same as every
    confluent-kafka client's, see ``streams.kafka_clients.security_config``)."""
    kafka = settings.kafka
    context = None
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(
            cafile=str(kafka.ssl_ca_file) if kafka.ssl_ca_file else None)  # fmt: skip
        context.check_hostname = kafka.ssl_check_hostname
        if kafka.ssl_certificate_file is not None and kafka.ssl_key_file is not None:
            context.load_cert_chain(str(kafka.ssl_certificate_file), str(kafka.ssl_key_file))
    if kafka.security_protocol.startswith("SASL_"):
        return faust.SASLCredentials(username=kafka.sasl_username,
                                     password=kafka.sasl_password.get_secret_value(),
                                     ssl_context=context,
                                     mechanism=kafka.sasl_mechanism)  # fmt: skip
    if context is not None:
        return faust.SSLCredentials(context)
    return None


def faust_app(settings: Settings, data_dir: Path, partitions: int,
              store: str | None = None) -> faust.App:  # fmt: skip
    """The configured app (``settings.ledger``): at-least-once, no topic declared by Faust."""
    ledger = settings.ledger
    data_dir.mkdir(parents=True, exist_ok=True)  # Faust makes only the last level
    return faust.App(
        ledger.app_id,
        broker=f"kafka://{settings.kafka.bootstrap_servers}",
        broker_credentials=broker_credentials(settings),
        store=store or ledger.store,
        datadir=str(data_dir),
        autodiscover=False,
        web_enabled=False,
        topic_partitions=partitions,
        topic_allow_declare=False,
        topic_disable_leader=True,
        processing_guarantee="at_least_once",
        consumer_auto_offset_reset="earliest",
        stream_wait_empty=True,
        stream_buffer_maxsize=ledger.batch_max * 4,
        broker_max_poll_records=ledger.batch_max,
        broker_session_timeout=ledger.session_timeout_ms / 1000,
        broker_heartbeat_interval=ledger.session_timeout_ms / 3000,
        broker_commit_interval=ledger.commit_interval_ms / 1000,
        table_standby_replicas=0,
        producer_acks=-1,
        producer_linger_ms=5,
    )


def raw_topic(app: faust.App, *names: str, **options: Any) -> Any:
    """A Faust topic of raw bytes (our Avro codec decodes, not Faust's serializers)."""
    return app.topic(*names, key_type=bytes, value_type=bytes, key_serializer="raw",
                     value_serializer="raw", **options)  # fmt: skip
