"""CloudEvents headers and W3C traceparent (pure)."""

from __future__ import annotations

import pytest

from contracts.cloudevents import (
    command_headers,
    event_headers,
    header,
    new_traceparent,
    parse_traceparent,
    trace_id,
)
from contracts.commands import Grant

PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize("bad", [
    None, "", "garbage", "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
    "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
])  # fmt: skip
def test_invalid_traceparents_are_not_continued(bad: str | None) -> None:
    assert parse_traceparent(bad) is None
    assert parse_traceparent(new_traceparent(bad)) is not None  # a new trace instead


def test_a_valid_traceparent_is_continued_with_a_span_of_our_own() -> None:
    child = new_traceparent(PARENT)
    assert trace_id(child) == trace_id(PARENT) and child != PARENT
    assert child.endswith("-01")


def test_command_headers_are_cloudevents_binary_mode() -> None:
    grant = Grant("order:o-1", "u-1", "purchase", 5, "o-1", None, 1_767_225_600_123, "store")
    headers = dict(command_headers(grant, PARENT))
    assert headers == {
        "ce_specversion": b"1.0", "ce_id": b"order:o-1", "ce_type": b"credit.grant.requested",
        "ce_source": b"store", "ce_time": b"2026-01-01T00:00:00.123+00:00",
        "content-type": b"application/avro", "traceparent": PARENT.encode(),
    }  # fmt: skip
    assert "traceparent" not in event_headers("e", "t", "s", 0, None)
    assert header(list(headers.items()), "traceparent") == PARENT
    assert header(None, "traceparent") is None
