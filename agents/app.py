"""The ledger workers' app: the command topics, the ledger topic and the state table on it.

Wiring only: the agent that folds commands is ``agents.ledger_agent``; the broker
settings that carry the correctness argument are in ``streams.app``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faust

from agents.state import LedgerStateTable
from contracts.records import CHARGE_TOPIC, GRANT_TOPIC, LEDGER_TOPIC
from kernel.settings import Settings, project_path
from streams.app import faust_app, raw_topic
from streams.codec import AvroCodec, load_codec
from streams.topics import settings_topics

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
    spec = settings_topics(settings)
    partitions = spec[LEDGER_TOPIC].partitions
    codec = load_codec(project_path(settings.schemas.avro_dir))
    app = faust_app(settings, data_dir or settings.ledger.data_dir / worker_name, partitions,
                    store)  # fmt: skip
    commands = raw_topic(app, CHARGE_TOPIC, GRANT_TOPIC)
    # acks=False as Faust gives its own changelogs: no stream consumes this topic,
    # and with acks on, Faust's slow-stream detector reports it as stuck.
    changelog = raw_topic(app, LEDGER_TOPIC, partitions=partitions, acks=False)
    state = LedgerStateTable(
        app, name=STATE_TABLE, beacon=app.tables.beacon, partitions=partitions,
        changelog_topic=changelog, key_type=bytes, value_type=bytes,
        help="accounts and processed event_ids, folded from credit.ledger.entries",
    )  # fmt: skip
    state.codec = codec
    app.tables.add(state)
    return LedgerApp(app=app, commands=commands, state=state, codec=codec, partitions=partitions)
