"""The last resort of a finished call's charge: a local append-only file.

The proxy appends here only when Postgres (the outbox) and Kafka are both
unreachable. Each line is one event (JSON, key and value base64), written
under an exclusive ``flock`` and fsynced before the call's response ends.

The directory is private: created 0700, and both sides refuse one that another
user owns or that others may enter (anyone who can add a line could otherwise
add events). The relay moves only charge events from it into the outbox: a
spool line is never a way to grant credits.

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
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from contracts.records import CHARGE_TOPIC
from kernel.errors import OutboxConflict
from outbox.enqueue import enqueue

log = logging.getLogger(__name__)

SUFFIX = ".spool"
DRAINING = ".draining"


@dataclass(frozen=True, slots=True)
class SpooledEvent:
    event_id: str
    topic: str
    key: bytes
    value: bytes
    fingerprint: str | None = None  # the call's (see the outbox); lines before it had none
    headers: dict[str, str] | None = None  # CloudEvents and traceparent; older lines: none

    def line(self) -> bytes:
        return json.dumps({
            "event_id": self.event_id, "topic": self.topic,
            "key": base64.b64encode(self.key).decode(),
            "value": base64.b64encode(self.value).decode(), "fingerprint": self.fingerprint,
            "headers": self.headers,
        }).encode() + b"\n"  # fmt: skip

    @classmethod
    def parse(cls, line: bytes) -> SpooledEvent:
        raw = json.loads(line)
        fingerprint = raw.get("fingerprint")
        headers = raw.get("headers")
        if not isinstance(headers, dict):
            headers = None
        return cls(raw["event_id"], raw["topic"], base64.b64decode(raw["key"]),
                   base64.b64decode(raw["value"]),
                   fingerprint if isinstance(fingerprint, str) else None,
                   {str(k): str(v) for k, v in headers.items()} if headers else None)  # fmt: skip


class SpoolNotPrivate(OSError):
    """The spool directory belongs to another user or others may use it."""


def private_dir(directory: Path, *, create: bool) -> Path:
    """``directory`` (``~`` expanded), made 0700 if ``create`` and missing; raises
    SpoolNotPrivate unless it is a directory of this user that nobody else may use."""
    directory = directory.expanduser()
    if create:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() \
            or info.st_mode & 0o077:  # fmt: skip
        raise SpoolNotPrivate(f"spool directory {directory} must be a directory owned by uid "
                              f"{os.geteuid()} with mode 0700 (it is uid {info.st_uid}, mode "
                              f"{stat.S_IMODE(info.st_mode):o}); refusing to use it")  # fmt: skip
    return directory


def spool_path(directory: Path) -> Path:
    """This process's spool file (one per process: appends never interleave)."""
    return directory / f"{socket.gethostname()}-{os.getpid()}{SUFFIX}"


def append(directory: Path, event: SpooledEvent) -> None:
    """Append durably (fsync) or raise OSError; blocking, so call it off the event loop."""
    path = spool_path(private_dir(directory, create=True))
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
    directory = directory.expanduser()
    if not directory.is_dir():
        return []
    private_dir(directory, create=False)
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


def _enqueue(conn: psycopg.Connection[Any], path: Path, event: SpooledEvent,
             refused: Callable[[str], None]) -> None:  # fmt: skip
    if event.topic != CHARGE_TOPIC:
        log.error("spool %s: a %s event (%s) is not a charge; refused", path, event.topic,
                  event.event_id)  # fmt: skip
        refused("not_a_charge")
        return
    try:
        enqueue(
            conn,
            event.event_id,
            event.topic,
            event.key,
            event.value,
            event.fingerprint,
            event.headers,
        )
    except OutboxConflict:
        refused("conflict")  # logged by the outbox


def drain(directory: Path, conn: psycopg.Connection[Any],
          refused: Callable[[str], None] = lambda _reason: None) -> int:  # fmt: skip
    """Move every spooled charge into the outbox; the number of lines drained.

    ``refused(reason)`` is told of each line that is not moved (not a charge, or its event
    id taken by another event). Raises SpoolNotPrivate for a directory others could use."""
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
                _enqueue(conn, path, event, refused)
            conn.commit()
            path.unlink(missing_ok=True)  # a second relay may have drained it too: no harm
        finally:
            os.close(fd)
        drained += len(events)
        log.warning("drained %d spooled events from %s into the outbox", len(events), path)
    return drained
