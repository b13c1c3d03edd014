"""The main job of the README's first command.

For step 1 of the project: bring the stack up, apply the topics, and send one
event of every type through real Kafka and back, printing what happened. Later
steps grow this into the full proxy → ledger → projections demo.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from creditledger.settings import Settings, project_path
from creditledger.tables import render_table
from stack import launcher
from streams import topic_admin
from streams.codec import load_codec
from streams.examples import example_events
from streams.roundtrip import round_trip
from streams.topics import TopicSpec, TopicsSpec, load_topics


def run_demo(settings: Settings) -> bool:
    """Run the demo, print as it goes; True when every round trip matched."""
    t0 = time.monotonic()
    print("== 1. stack up (Kafka KRaft, Postgres, Redis on loopback)")
    report = launcher.up(settings)
    print(
        render_table(
            ["service", "state", "address", "log"],
            [(s.name, s.state, s.address, s.log) for s in report],
        )
    )
    print(f"stack ready in {time.monotonic() - t0:.1f} s\n")

    print("== 2. topics apply (topics.yaml)")
    spec = load_topics(project_path(settings.topics_file))
    admin = topic_admin.make_admin(settings)
    applied = topic_admin.apply(admin, spec, settings.kafka.request_timeout_ms / 1000)
    print(
        render_table(
            ["topic", "partitions", "cleanup.policy", "retention.ms", "result"],
            [
                (
                    p.name,
                    spec[p.name].partitions,
                    spec[p.name].config.get("cleanup.policy", "-"),
                    spec[p.name].config.get("retention.ms", "-"),
                    p.action,
                )
                for p in applied
            ],
        )
    )
    print()

    print("== 3. round trip of each event type (Avro single-object encoding, real Kafka,")
    print("      through a throw-away topic so that no sample reaches the real ones)")
    codec = load_codec(project_path(settings.schemas.avro_dir))
    stamp = datetime.now(UTC).replace(microsecond=0)
    events = example_events(user_id="demo-user", at=stamp, suffix=stamp.strftime("%Y%m%d%H%M%S"))
    scratch = f"demo.roundtrip.{stamp.strftime('%Y%m%d%H%M%S')}"
    scratch_spec = TopicsSpec({scratch: TopicSpec(scratch, 1, 1, {"retention.ms": "3600000"})}, {})
    topic_admin.apply(admin, scratch_spec, settings.kafka.request_timeout_ms / 1000)
    try:
        results = round_trip(settings, codec, events, topic=scratch)
    finally:
        topic_admin.delete(admin, [scratch], settings.kafka.request_timeout_ms / 1000)
    print(
        render_table(
            ["event type", "key", "partition", "offset", "bytes", "ms", "decoded == sent"],
            [
                (
                    r.event_type,
                    r.key,
                    r.partition,
                    r.offset,
                    r.size_bytes,
                    f"{r.milliseconds:.1f}",
                    "yes" if r.equal else "NO",
                )
                for r in results
            ],
        )
    )
    print("(ms: produce, acks=all, until read back and decoded; the first send also pays for")
    print(" the idempotent producer's start-up: connection and producer id)")
    ok = all(r.equal for r in results)
    print(f"\ndemo {'passed' if ok else 'FAILED'} in {time.monotonic() - t0:.1f} s")
    print("the stack keeps running; stop it with: .venv/bin/creditledger stack down")
    return ok
