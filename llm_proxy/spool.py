"""The last resort of a finished call's charge: a local append-only file.

The proxy appends here only when Postgres (the outbox) and Kafka are both
unreachable. Each line is one event (JSON, key and value base64), written
under an exclusive ``flock`` and fsynced before the call's response ends.

``outbox relay`` drains the directory into the outbox once Postgres is back:
it renames a file to ``*.draining`` (new appends then open a fresh file),
takes the lock (so an append that opened the old file first finishes),
inserts every line (``ON CONFLICT DO NOTHING``: a line drained twice is one
row), commits, and only then deletes the file. A writer that opened the file
just before the rename notices, after locking, that the path now names
another file, and appends to the new one instead.
"""

from __future__ import annotations

import base64
import fcntl
import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from llm_proxy.outbox import enqueue

log = logging.getLogger(__name__)

SUFFIX = ".spool"
DRAINING = ".draining"


@dataclass(frozen=True, slots=True)
class SpooledEvent:
    event_id: str
    topic: str
    key: bytes
    value: bytes

    def line(self) -> bytes:
        return json.dumps({
            "event_id": self.event_id, "topic": self.topic,
            "key": base64.b64encode(self.key).decode(),
            "value": base64.b64encode(self.value).decode(),
        }).encode() + b"\n"  # fmt: skip

    @classmethod
    def parse(cls, line: bytes) -> SpooledEvent:
        raw = json.loads(line)
        return cls(raw["event_id"], raw["topic"], base64.b64decode(raw["key"]),
                   base64.b64decode(raw["value"]))  # fmt: skip


def spool_path(directory: Path) -> Path:
    """This process's spool file (one per process: appends never interleave)."""
    return directory / f"{socket.gethostname()}-{os.getpid()}{SUFFIX}"


def append(directory: Path, event: SpooledEvent) -> None:
    """Append durably (fsync) or raise OSError; blocking, so call it off the event loop."""
    directory.mkdir(parents=True, exist_ok=True)
    path = spool_path(directory)
    while True:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                continue  # a relay renamed it between our open and our lock: reopen
            os.write(fd, event.line())
            os.fsync(fd)
            return
        finally:
            os.close(fd)  # closing releases the lock


def pending_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted([*directory.glob(f"*{DRAINING}"), *directory.glob(f"*{SUFFIX}")])


def read_events(path: Path, data: bytes) -> list[SpooledEvent]:
    events = []
    for number, line in enumerate(data.splitlines(), start=1):
        try:
            events.append(SpooledEvent.parse(line))
        except (ValueError, KeyError) as exc:
            # Only a torn last line can be unreadable: its append never returned, so
            # that call's response reported an error instead of completing.
            log.error("spool %s line %d unreadable, skipped (%s)", path, number, exc)
    return events


def drain(directory: Path, conn: psycopg.Connection[Any]) -> int:
    """Move every spooled event into the outbox; the number of lines drained."""
    drained = 0
    for path in pending_files(directory):
        if path.suffix == SUFFIX:
            target = path.with_name(f"{path.stem}-{os.getpid()}-{drained}{DRAINING}")
            try:
                path.rename(target)
            except FileNotFoundError:
                continue  # another relay took it
            path = target
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # waits for an append that opened it before
            with os.fdopen(os.dup(fd), "rb") as reader:
                events = read_events(path, reader.read())
            for event in events:
                enqueue(conn, event.event_id, event.topic, event.key, event.value)
            conn.commit()
            path.unlink(missing_ok=True)  # a second relay may have drained it too: no harm
        finally:
            os.close(fd)
        drained += len(events)
        log.warning("drained %d spooled events from %s into the outbox", len(events), path)
    return drained
