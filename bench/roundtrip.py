"""Produce + consume round trip of Avro credit.charge.requested events through real Kafka.

    .venv/bin/python -m bench.roundtrip [--events 100000] [--partitions 6]

Uses the project's producer settings (murmur2, idempotent, acks=all, lz4) on a
throw-away topic that is deleted afterwards, so the real command topics stay
clean. Encoding/decoding is included in the rates (it is part of the real
path); the pure codec rates are printed for comparison. Needs the stack up
(`creditledger stack up`).
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from confluent_kafka import KafkaError, TopicPartition
from tqdm import tqdm

from creditledger.tables import render_table
from kernel.settings import load_settings, project_path
from streams import topic_admin
from streams.codec import AvroCodec, load_codec
from streams.examples import example_events
from streams.kafka_clients import make_consumer, make_producer
from streams.topics import TopicSpec, TopicsSpec

EVENT_TYPE = "credit.charge.requested"


def _records(count: int, users: int) -> list[dict[str, Any]]:
    base = example_events()[EVENT_TYPE]
    start = datetime(2026, 1, 1, tzinfo=UTC)
    return [
        dict(
            base,
            event_id=f"bench-{n}",
            user_id=f"user-{n % users}",
            request_id=f"req-{n}",
            input_tokens=100 + n % 5000,
            output_tokens=50 + n % 700,
            amount_micro=1 + n % 9000,
            occurred_at=start + timedelta(milliseconds=n),
        )
        for n in range(count)
    ]


def _rate(count: int, seconds: float) -> str:
    return f"{count / seconds:,.0f}"


def run(events: int, partitions: int, users: int) -> list[tuple[str, ...]]:
    settings = load_settings()
    codec: AvroCodec = load_codec(project_path(settings.schemas.avro_dir))
    admin = topic_admin.make_admin(settings)
    topic = f"bench.charge.requested.{uuid.uuid4().hex[:8]}"
    spec = TopicsSpec({topic: TopicSpec(topic, partitions, 1, {"retention.ms": "3600000"})}, {})
    topic_admin.apply(admin, spec, timeout_s=30)
    records = _records(events, users)
    rows: list[tuple[str, ...]] = []
    try:
        t0 = time.perf_counter()
        encoded = [codec.encode(EVENT_TYPE, r) for r in records]
        encode_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for data in encoded:
            codec.decode(data, expected=EVENT_TYPE)
        decode_s = time.perf_counter() - t0
        rows.append(("codec encode only (validate + write)", f"{events:,}",
                     f"{encode_s:.2f}", _rate(events, encode_s)))  # fmt: skip
        rows.append(("codec decode only", f"{events:,}", f"{decode_s:.2f}",
                     _rate(events, decode_s)))  # fmt: skip

        producer = make_producer(settings, **{"linger.ms": 20, "batch.size": 1_000_000})
        failures: list[KafkaError] = []

        def on_delivery(err: KafkaError | None, _msg: Any) -> None:
            if err is not None:
                failures.append(err)

        t0 = time.perf_counter()
        for record in tqdm(records, desc="produce", unit="ev", file=sys.stderr, mininterval=1):
            value = codec.encode(EVENT_TYPE, record)
            while True:
                try:
                    producer.produce(topic, key=record["user_id"].encode(), value=value,
                                     on_delivery=on_delivery)  # fmt: skip
                    break
                except BufferError:  # local queue full: let deliveries drain
                    producer.poll(0.05)
            producer.poll(0)
        remaining = producer.flush(120)
        produce_s = time.perf_counter() - t0
        if remaining or failures:
            raise SystemExit(f"{remaining} undelivered, {len(failures)} failed: {failures[:3]}")
        rows.append(("produce (encode + send, acks=all, until flushed)", f"{events:,}",
                     f"{produce_s:.2f}", _rate(events, produce_s)))  # fmt: skip

        consumer = make_consumer(settings, f"bench-{uuid.uuid4().hex[:8]}")
        consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
        seen = 0
        t0 = time.perf_counter()
        with tqdm(total=events, desc="consume", unit="ev", file=sys.stderr, mininterval=1) as bar:
            while seen < events:
                batch = consumer.consume(num_messages=10_000, timeout=1.0)
                if not batch and time.perf_counter() - t0 > 120:
                    raise SystemExit(f"consumed only {seen} of {events} in 120 s")
                for message in batch:
                    if message.error():
                        raise SystemExit(f"consume error: {message.error()}")
                    codec.decode(message.value(), expected=EVENT_TYPE)
                seen += len(batch)
                bar.update(len(batch))
        consume_s = time.perf_counter() - t0
        consumer.close()
        rows.append(("consume (fetch + decode)", f"{seen:,}", f"{consume_s:.2f}",
                     _rate(seen, consume_s)))  # fmt: skip
    finally:
        topic_admin.delete(admin, [topic], timeout_s=30)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.roundtrip",
        description="Avro credit.charge.requested round trip through real Kafka (events/s).",
    )
    parser.add_argument("--events", type=int, default=100_000, help="events (default 100000)")
    parser.add_argument("--partitions", type=int, default=6, help="topic partitions (default 6)")
    parser.add_argument("--users", type=int, default=10_000, help="distinct keys (default 10000)")
    args = parser.parse_args(argv)
    if args.events < 1 or args.partitions < 1 or args.users < 1:
        parser.error("--events, --partitions and --users must be positive")
    rows = run(args.events, args.partitions, args.users)
    print(render_table(["step", "events", "seconds", "events/s"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
