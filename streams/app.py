"""The Faust app of the ledger workers: broker settings, topics, the state table.

Wiring only, no business rules: the agent that folds commands is
``agents.ledger_agent``; this module gives it the app to run in.

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

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faust

from agents.records import CHARGE_TOPIC, GRANT_TOPIC, LEDGER_TOPIC
from agents.state import LedgerStateTable
from creditledger.settings import Settings, project_path
from streams.codec import AvroCodec, load_codec
from streams.topics import load_topics

STATE_TABLE = "ledger-state"


@dataclass
class LedgerApp:
    app: faust.App
    commands: Any  # faust topic over both command topics, raw bytes
    state: LedgerStateTable
    codec: AvroCodec
    partitions: int


def build_ledger_app(settings: Settings, worker_name: str, store: str | None = None,
                     data_dir: Path | None = None) -> LedgerApp:  # fmt: skip
    spec = load_topics(project_path(settings.topics_file))
    partitions = spec[LEDGER_TOPIC].partitions
    codec = load_codec(project_path(settings.schemas.avro_dir))
    ledger = settings.ledger
    data_dir = data_dir or ledger.data_dir / worker_name
    data_dir.mkdir(parents=True, exist_ok=True)  # Faust makes only the last level
    app = faust.App(
        ledger.app_id,
        broker=f"kafka://{settings.kafka.bootstrap_servers}",
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
    commands = app.topic(CHARGE_TOPIC, GRANT_TOPIC, key_type=bytes, value_type=bytes,
                         key_serializer="raw", value_serializer="raw")  # fmt: skip
    # acks=False as Faust gives its own changelogs: no stream consumes this topic,
    # and with acks on, Faust's slow-stream detector reports it as stuck.
    changelog = app.topic(
        LEDGER_TOPIC, key_type=bytes, value_type=bytes, key_serializer="raw",
        value_serializer="raw", partitions=partitions, acks=False,
    )  # fmt: skip
    state = LedgerStateTable(
        app, name=STATE_TABLE, beacon=app.tables.beacon, partitions=partitions,
        changelog_topic=changelog, key_type=bytes, value_type=bytes,
        help="accounts and processed event_ids, folded from credit.ledger.entries",
    )  # fmt: skip
    state.codec = codec
    app.tables.add(state)
    return LedgerApp(app=app, commands=commands, state=state, codec=codec, partitions=partitions)
