"""Standard event metadata on every record we produce: CloudEvents 1.0 in Kafka's binary
mode (``ce_*`` headers, the Avro bytes as the data), and a W3C ``traceparent``.

The trace starts where a request enters (the proxy's call, the store's request; a
``traceparent`` the caller sent is continued, with a span of our own), is carried by the
command it caused (its record's headers, through the outbox or the spool) and is copied
onto the ledger entry that folds the command, so one trace id links a call, its charge
and its entry. Pure: no I/O; the request's trace lives in a context variable.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from datetime import UTC, datetime

from contracts.commands import Command
from contracts.records import command_topic

SPEC_VERSION = "1.0"
CONTENT_TYPE = "application/avro"
TRACEPARENT = "traceparent"
# Set by `ledger dlq redrive` on a stale command it checked against the ledger: the fold then
# skips the idempotency window for it. It grants nothing that write access to a command topic
# does not grant already (any producer there can send a new event id).
REDRIVE_CHECKED = "creditledger_redrive_checked"
TRACEPARENT_FORMAT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")

# The trace of the request being served (set by the proxy's and the store's front door).
current_trace: ContextVar[str | None] = ContextVar("current_trace", default=None)


def parse_traceparent(text: str | None) -> str | None:
    """``text`` if it is a valid W3C traceparent (version 00, ids not all zero), else None."""
    if not text:
        return None
    found = TRACEPARENT_FORMAT.match(text.strip().lower())
    if found is None or found[1] == "ff" or set(found[2]) == {"0"} or set(found[3]) == {"0"}:
        return None
    return found[0]


def new_traceparent(parent: str | None = None) -> str:
    """A span of our own: in ``parent``'s trace when it is a valid traceparent, else in a
    new trace (sampled)."""
    valid = parse_traceparent(parent)
    trace_id = valid.split("-")[1] if valid else secrets.token_hex(16)
    flags = valid.split("-")[3] if valid else "01"
    return f"00-{trace_id}-{secrets.token_hex(8)}-{flags}"


def trace_id(traceparent: str) -> str:
    return traceparent.split("-")[1]


def rfc3339(time_ms: int) -> str:
    return datetime.fromtimestamp(time_ms / 1000, tz=UTC).isoformat(timespec="milliseconds")


def event_headers(event_id: str, event_type: str, source: str, time_ms: int,
                  traceparent: str | None) -> dict[str, str]:  # fmt: skip
    """The CloudEvents binary-mode headers of one record (and its traceparent, if any)."""
    headers = {
        "ce_specversion": SPEC_VERSION,
        "ce_id": event_id,
        "ce_type": event_type,
        "ce_source": source,
        "ce_time": rfc3339(time_ms),
        "content-type": CONTENT_TYPE,
    }
    if traceparent:
        headers[TRACEPARENT] = traceparent
    return headers


# What confluent-kafka's produce() takes as headers.
KafkaHeaders = list[tuple[str, str | bytes | None]]


def command_headers(command: Command, traceparent: str | None = None) -> KafkaHeaders:
    """A command's record headers: typed by its topic, from its producer, at its time."""
    return kafka_headers(
        event_headers(
            command.event_id,
            command_topic(command),
            command.producer,
            command.occurred_at_ms,
            traceparent,
        )
    )


def kafka_headers(headers: Mapping[str, str]) -> KafkaHeaders:
    return [(name, value.encode()) for name, value in headers.items()]


def header(headers: Iterable[tuple[str, bytes | str | None]] | Mapping[str, bytes] | None,
           name: str) -> str | None:  # fmt: skip
    """One header's value from a record's headers (a list of pairs, or a mapping)."""
    if not headers:
        return None
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    for key, value in pairs:
        if key == name and value is not None:
            return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    return None
