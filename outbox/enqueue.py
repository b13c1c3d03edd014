"""One way into the outbox: :func:`enqueue`, in the writer's own transaction.

Every producer of ledger commands (the proxy when a call finishes, the credit store when
an order is paid or a reward claimed, the relay when it drains a spool) writes through
here, so the rule holds in one place: an event id already in the outbox is a
``duplicate`` when the event is the same (same fingerprint), and an
:class:`OutboxConflict` when it is another event; never a silent success.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import psycopg
from psycopg.types.json import Jsonb

from kernel.errors import OutboxConflict

log = logging.getLogger(__name__)


# One statement: insert, or tell what the existing row under that event id stands for.
# (The CTE's SELECT sees the table as it was before the INSERT: NULL means inserted.)
ENQUEUE_SQL = (
    "WITH inserted AS (INSERT INTO outbox (event_id, topic, message_key, message_value, "
    "fingerprint, headers) VALUES (%(event_id)s, %(topic)s, %(key)s, %(value)s, "
    "%(fingerprint)s, %(headers)s) "
    "ON CONFLICT (event_id) DO NOTHING RETURNING 1) "
    "SELECT EXISTS (SELECT 1 FROM inserted), (SELECT coalesce(fingerprint, "
    "encode(sha256(message_value), 'hex')) FROM outbox WHERE event_id = %(event_id)s)"
)

Enqueued = Literal["inserted", "duplicate"]


def value_fingerprint(value: bytes) -> str:
    """The default fingerprint of an event: the digest of its encoded bytes."""
    return hashlib.sha256(value).hexdigest()


def _params(event_id: str, topic: str, key: bytes, value: bytes, fingerprint: str | None,
            headers: Mapping[str, str] | None) -> dict[str, Any]:  # fmt: skip
    return {"event_id": event_id, "topic": topic, "key": key, "value": value,
            "fingerprint": fingerprint or value_fingerprint(value),
            "headers": Jsonb(dict(headers)) if headers else None}  # fmt: skip


def _outcome(row: Any, params: dict[str, Any]) -> Enqueued:
    inserted, existing = row
    if inserted:
        return "inserted"
    if existing == params["fingerprint"]:
        return "duplicate"
    log.error("outbox: event id %r reused with other content (%s); refused",
              params["event_id"], params["topic"])  # fmt: skip
    raise OutboxConflict(params["event_id"], params["topic"])


def enqueue(conn: psycopg.Connection[Any], event_id: str, topic: str, key: bytes,
            value: bytes, fingerprint: str | None = None,
            headers: Mapping[str, str] | None = None) -> Enqueued:  # fmt: skip
    """Add one event in the caller's transaction: ``inserted``, or ``duplicate`` when the
    same event (same fingerprint) is there already. Raises :class:`OutboxConflict` when the
    event id is taken by another event: that is never a silent success. ``headers`` are
    the Kafka headers the relay produces it with (CloudEvents, traceparent)."""
    params = _params(event_id, topic, key, value, fingerprint, headers)
    return _outcome(conn.execute(ENQUEUE_SQL, params).fetchone(), params)


async def enqueue_async(conn: psycopg.AsyncConnection[Any], event_id: str, topic: str,
                        key: bytes, value: bytes, fingerprint: str | None = None,
                        headers: Mapping[str, str] | None = None) -> Enqueued:  # fmt: skip
    """:func:`enqueue` on an async connection (the proxy's and the store's)."""
    params = _params(event_id, topic, key, value, fingerprint, headers)
    cursor = await conn.execute(ENQUEUE_SQL, params)
    return _outcome(await cursor.fetchone(), params)


# Many events in one statement; the ids it did not insert are looked up after it.
ENQUEUE_MANY_SQL = (
    "INSERT INTO outbox (event_id, topic, message_key, message_value, fingerprint, headers) "
    "SELECT * FROM unnest(%s::text[], %s::text[], %s::bytea[], %s::bytea[], %s::text[], "
    "%s::jsonb[]) ON CONFLICT (event_id) DO NOTHING RETURNING event_id"
)
EXISTING_SQL = (
    "SELECT event_id, coalesce(fingerprint, encode(sha256(message_value), 'hex')) FROM "
    "outbox WHERE event_id = ANY(%s)"
)


async def enqueue_many_async(conn: psycopg.AsyncConnection[Any],
                             events: Sequence[tuple[str, str, bytes, bytes, Mapping[str, str]]]
                             ) -> list[Enqueued]:  # fmt: skip
    """Several events, each ``(event_id, topic, key, value, headers)``, added in the
    caller's transaction as :func:`enqueue_async` adds one, in one statement (their ids
    must differ): what a change made for many callers at once (the plaza's batched likes)
    writes. Each is ``inserted`` or ``duplicate``; raises :class:`OutboxConflict` as
    :func:`enqueue` does when an id is taken by another event."""
    params = [_params(*event[:4], None, event[4]) for event in events]
    if len({p["event_id"] for p in params}) != len(params):
        raise ValueError("enqueue_many_async: two events share an id")
    columns = ("event_id", "topic", "key", "value", "fingerprint", "headers")
    cursor = await conn.execute(ENQUEUE_MANY_SQL, [[p[c] for p in params] for c in columns])
    inserted = {row[0] for row in await cursor.fetchall()}
    others = [p["event_id"] for p in params if p["event_id"] not in inserted]
    existing: dict[str, str] = {}
    if others:
        cursor = await conn.execute(EXISTING_SQL, (others,))
        existing = dict(await cursor.fetchall())
    return [_outcome((p["event_id"] in inserted, existing.get(p["event_id"])), p)
            for p in params]  # fmt: skip
