"""Snapshots of the fold's state, so that a worker without local state recovers in bounded time.

Without them, a worker whose RocksDB folder is gone (a new host, a lost disk, a worker that
takes partitions over after a rebalance) rebuilds each partition's state by folding the
ledger from offset 0: time in proportion to all of history.

**What a snapshot is.** The files of a RocksDB checkpoint of one partition's state store,
packed into one blob. The store keeps Faust's persisted offset (the last ledger offset
applied) in the same database, and the checkpoint is taken on the event loop between two
batches, when no write is half done: a snapshot is the fold of exactly the entries
``[0, ledger_offset]`` of its partition, and says so.

**Where it is kept.** In Postgres (``ledger_snapshots`` and ``ledger_snapshot_chunks``,
migration 0010), not on the worker's disk. One transaction writes the chunks and then the
snapshot's row: a writer killed halfway leaves no row, and the previous snapshot stays the
newest. The row names the ledger topic's id, so a topic deleted and created again (another
log under the same name) never gets the old log's state. The row carries the blob's
sha256, checked before anything is unpacked. ARCHITECTURE.md argues Postgres against a
compacted topic.

**Recovery.** When partitions are assigned (at start, or taken over after a rebalance: the
same path), :meth:`FoldSnapshots.restore` runs before Faust opens their stores. A partition
whose local state is missing, or behind the newest snapshot by at least
``ledger.snapshot_every_entries``, gets the newest snapshot that verifies; a corrupt one is
logged and skipped for the one before it; with none usable, the local state stays as it is
(in the worst case none: the full fold, as before). Faust's own table recovery then folds
the ledger from the restored offset to its end. Postgres being down costs time, never
correctness: the full fold is always the fallback.

**Taking.** After each durable batch the agent calls :meth:`FoldSnapshots.maybe_take`: a
partition with ``snapshot_every_entries`` new entries since its last snapshot, or any new
entry after ``snapshot_interval_s``, is checkpointed (hard links and a memtable flush: a
short pause of the loop) and uploaded by a thread while the fold goes on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import shutil
import struct
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import psycopg
import rocksdict

from agents.metrics import LedgerMetrics
from contracts.records import LEDGER_TOPIC
from kernel.db import connect
from kernel.errors import CreditLedgerError, SnapshotError
from kernel.settings import Settings
from streams.topic_admin import make_admin, topic_id

log = logging.getLogger(__name__)

FORMAT = 1
MAGIC = b"CLSNAP1\n"
_FILE = struct.Struct(">HQ")  # name length, content length; the name follows, then content
OFFSET_KEY = b"__faust\0offset__"  # where Faust's RocksDB store keeps the persisted offset
FAILED_RETRY_S = 30.0
COPY_CHUNKS = "COPY ledger_snapshot_chunks (snapshot_id, n, data) FROM STDIN (FORMAT BINARY)"


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    snapshot_id: int
    partition: int
    ledger_offset: int
    size_bytes: int
    chunks: int
    sha256: str
    taken_by: str
    took_ms: int


# --- the blob: a checkpoint's files, one after the other -----------------------------------


def pack(directory: Path, piece_bytes: int = 1 << 20) -> Iterator[bytes]:
    """The files of ``directory`` (flat, as a RocksDB checkpoint is) as one byte stream."""
    yield MAGIC
    for path in sorted(directory.iterdir()):
        if not path.is_file():
            continue
        name = path.name.encode()
        yield _FILE.pack(len(name), path.stat().st_size) + name
        with path.open("rb") as file:
            while piece := file.read(piece_bytes):
                yield piece


def rechunk(pieces: Iterable[bytes], size: int) -> Iterator[bytes]:
    """The same bytes in pieces of exactly ``size`` (the last one shorter)."""
    buffer = bytearray()
    for piece in pieces:
        buffer += piece
        while len(buffer) >= size:
            yield bytes(buffer[:size])
            del buffer[:size]
    if buffer:
        yield bytes(buffer)


def unpack(blob: BinaryIO, target: Path) -> int:
    """Write the blob's files into ``target`` (made here); return how many. The blob was
    checked against its sha256 before: what is wrong here is a format error."""
    if blob.read(len(MAGIC)) != MAGIC:
        raise SnapshotError("not a fold-state snapshot (its first bytes are not the magic)")
    target.mkdir(parents=True)
    files = 0
    while header := blob.read(_FILE.size):
        if len(header) != _FILE.size:
            raise SnapshotError("the snapshot ends inside a file header")
        name_length, size = _FILE.unpack(header)
        name = blob.read(name_length).decode()
        if not name or "/" in name or name in (".", ".."):
            raise SnapshotError(f"the snapshot names a file {name!r}")
        with (target / name).open("wb") as out:
            left = size
            while left:
                piece = blob.read(min(left, 1 << 20))
                if not piece:
                    raise SnapshotError(f"the snapshot ends inside {name}")
                out.write(piece)
                left -= len(piece)
        files += 1
    return files


def local_offset(path: Path) -> int | None:
    """The persisted offset of a partition's state folder, or None when there is no usable
    state there (no folder, not a database, no offset yet)."""
    if not path.exists():
        return None
    try:
        db = rocksdict.Rdict(str(path), options=rocksdict.Options(raw_mode=True),
                             access_type=rocksdict.AccessType.read_only())  # fmt: skip
    except Exception as exc:  # rocksdict raises its own untyped errors
        log.warning("state folder %s does not open (%s): treated as missing", path, exc)
        return None
    try:
        value = db.get(OFFSET_KEY)
    finally:
        db.close()
    return None if value is None else int(value)


# --- where snapshots live -------------------------------------------------------------------


class SnapshotStore:
    """The snapshots in Postgres. Every method opens its own connection: the callers are
    threads, and a worker holds no Postgres connection between snapshots."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def save(self, topic: str, topic_id: str, partition: int, ledger_offset: int,
             pieces: Iterable[bytes], taken_by: str) -> SnapshotInfo:  # fmt: skip
        started = time.monotonic()
        hasher = hashlib.sha256()
        size = count = 0
        with connect(self.settings) as conn:
            row = conn.execute("SELECT nextval('ledger_snapshot_ids')").fetchone()
            assert row is not None
            snapshot_id = int(row[0])
            with conn.cursor().copy(COPY_CHUNKS) as copy:
                copy.set_types(["bigint", "integer", "bytea"])
                for chunk in rechunk(pieces, self.settings.ledger.snapshot_chunk_bytes):
                    hasher.update(chunk)
                    copy.write_row((snapshot_id, count, chunk))
                    size += len(chunk)
                    count += 1
            took_ms = round((time.monotonic() - started) * 1000)
            conn.execute(
                "INSERT INTO ledger_snapshots (snapshot_id, topic, topic_id, partition, "
                "ledger_offset, format, size_bytes, chunks, sha256, taken_by, took_ms) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (snapshot_id, topic, topic_id, partition, ledger_offset, FORMAT, size, count,
                 hasher.hexdigest(), taken_by, took_ms),
            )  # fmt: skip
            conn.commit()
        return SnapshotInfo(snapshot_id, partition, ledger_offset, size, count,
                            hasher.hexdigest(), taken_by, took_ms)  # fmt: skip

    def newest_first(self, topic: str, topic_id: str, partition: int) -> list[SnapshotInfo]:
        with connect(self.settings, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT snapshot_id, partition, ledger_offset, size_bytes, chunks, sha256, "
                "taken_by, took_ms FROM ledger_snapshots WHERE topic = %s AND topic_id = %s "
                "AND partition = %s AND format = %s ORDER BY ledger_offset DESC, "
                "snapshot_id DESC",
                (topic, topic_id, partition, FORMAT),
            ).fetchall()
        return [SnapshotInfo(*row) for row in rows]

    def fetch(self, info: SnapshotInfo, into: BinaryIO) -> None:
        """Write the snapshot's blob to ``into``; a :class:`SnapshotError` unless its size,
        chunk count and sha256 are the ones its row promised."""
        hasher = hashlib.sha256()
        size = count = 0
        with connect(self.settings) as conn, conn.cursor(name="snapshot", binary=True) as cur:
            cur.itersize = 4
            cur.execute("SELECT n, data FROM ledger_snapshot_chunks WHERE snapshot_id = %s "
                        "ORDER BY n", (info.snapshot_id,))  # fmt: skip
            for n, data in cur:
                if n != count:
                    raise SnapshotError(f"snapshot {info.snapshot_id}: chunk {count} missing")
                hasher.update(data)
                into.write(data)
                size += len(data)
                count += 1
        if (count, size) != (info.chunks, info.size_bytes):
            raise SnapshotError(f"snapshot {info.snapshot_id}: {count} chunks of {size} bytes, "
                                f"its row says {info.chunks} of {info.size_bytes}")  # fmt: skip
        if hasher.hexdigest() != info.sha256:
            raise SnapshotError(f"snapshot {info.snapshot_id}: sha256 {hasher.hexdigest()} "
                                f"is not the {info.sha256} it was written with")  # fmt: skip

    def prune(self, topic: str, partition: int, keep: int) -> int:
        """Drop all but the newest ``keep`` snapshots of the partition; return how many."""
        with connect(self.settings) as conn:
            rows = conn.execute(
                "DELETE FROM ledger_snapshots WHERE snapshot_id IN (SELECT snapshot_id FROM "
                "ledger_snapshots WHERE topic = %s AND partition = %s ORDER BY ledger_offset "
                "DESC, snapshot_id DESC OFFSET %s) RETURNING snapshot_id",
                (topic, partition, keep),
            ).fetchall()
            ids = [row[0] for row in rows]
            if ids:
                conn.execute("DELETE FROM ledger_snapshot_chunks WHERE snapshot_id = ANY(%s)",
                             (ids,))  # fmt: skip
            conn.commit()
        return len(ids)


# --- the worker's side: restore before Faust opens a store, take after a batch -------------


@dataclass
class _Last:
    """What a partition's newest snapshot covers, and when it was taken (monotonic)."""

    offset: int
    at: float


class FoldSnapshots:
    """Restores partitions' state from snapshots and takes new ones, for one worker."""

    def __init__(self, settings: Settings, worker_name: str, metrics: LedgerMetrics,
                 store: SnapshotStore | None = None) -> None:  # fmt: skip
        self.settings = settings
        self.worker_name = worker_name
        self.metrics = metrics
        self.store = store or SnapshotStore(settings)
        self.topic = LEDGER_TOPIC
        self._topic_id: str | None = None
        self._last: dict[int, _Last] = {}
        self._retry_at = 0.0
        self._swept = False
        self._pool = concurrent.futures.ThreadPoolExecutor(1, "snapshot")
        self._running: concurrent.futures.Future[None] | None = None

    @property
    def enabled(self) -> bool:
        return self.settings.ledger.snapshot_every_entries > 0

    def topic_id(self) -> str:
        if self._topic_id is None:
            timeout = self.settings.kafka.request_timeout_ms / 1000
            self._topic_id = topic_id(make_admin(self.settings), self.topic, timeout)
        return self._topic_id

    # Restoring ---------------------------------------------------------------------------

    async def restore(self, partitions: dict[int, Path]) -> None:
        """Bring each partition's state folder up to its newest valid snapshot where it is
        missing or far behind (in a thread: downloads take seconds)."""
        if self.enabled and partitions:
            await asyncio.to_thread(self._restore_all, partitions)

    def _restore_all(self, partitions: dict[int, Path]) -> None:
        for partition, path in sorted(partitions.items()):
            try:
                self._restore_one(partition, path)
            except (CreditLedgerError, psycopg.Error, OSError) as exc:
                # Never a reason not to start: the ledger itself is always there to fold.
                log.warning("partition %s: no snapshot restored (%s); folding the ledger "
                            "from the local state's offset", partition, exc)  # fmt: skip
                self.metrics.snapshot_restores.labels("failed").inc()

    def _restore_one(self, partition: int, path: Path) -> None:
        started = time.monotonic()
        local = local_offset(path)
        candidates = self.store.newest_first(self.topic, self.topic_id(), partition)
        newest = candidates[0].ledger_offset if candidates else -1
        self._last[partition] = _Last(max(newest, -1 if local is None else local), started)
        have = -1 if local is None else local
        gap = self.settings.ledger.snapshot_every_entries
        usable = [
            c
            for c in candidates
            if c.ledger_offset > have and (local is None or c.ledger_offset - have >= gap)
        ]
        for info in usable:
            try:
                files = self._install(info, path)
            except SnapshotError as exc:
                log.error("partition %s: snapshot %s (offset %s) is not usable, trying an "
                          "older one: %s", partition, info.snapshot_id, info.ledger_offset,
                          exc)  # fmt: skip
                self.metrics.snapshot_restores.labels("corrupt").inc()
                continue
            took = time.monotonic() - started
            log.info("partition %s: restored snapshot %s (ledger offset %s, %s files, %s "
                     "bytes) in %.1f s; local state was at %s", partition, info.snapshot_id,
                     info.ledger_offset, files, info.size_bytes, took, local)  # fmt: skip
            self.metrics.snapshot_restores.labels("restored").inc()
            return
        if candidates and usable:
            log.warning("partition %s: no snapshot verified; folding from %s", partition, local)

    def _install(self, info: SnapshotInfo, path: Path) -> int:
        """Download, verify, unpack next to ``path``, then put it in ``path``'s place."""
        staging = path.with_name(path.name + ".restoring")
        blob_path = path.with_name(path.name + ".snapshot")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            with blob_path.open("w+b") as blob:
                self.store.fetch(info, blob)  # raises before anything is unpacked
                blob.seek(0)
                files = unpack(blob, staging)
            if local_offset(staging) != info.ledger_offset:
                raise SnapshotError(f"its state's offset is not the {info.ledger_offset} "
                                    "its row names")  # fmt: skip
            old = path.with_name(path.name + ".replaced")
            shutil.rmtree(old, ignore_errors=True)
            if path.exists():
                path.rename(old)
            staging.rename(path)
            shutil.rmtree(old, ignore_errors=True)
            return files
        finally:
            blob_path.unlink(missing_ok=True)
            shutil.rmtree(staging, ignore_errors=True)

    # Taking ------------------------------------------------------------------------------

    def maybe_take(self, dbs: dict[int, Any], root: Path) -> None:
        """Called on the loop after a durable batch: checkpoint the partitions that are due
        and hand them to the upload thread. One upload at a time; the fold goes on."""
        if not self.enabled or (self._running is not None and not self._running.done()):
            return
        if not self._swept:  # checkpoints a killed process left behind
            shutil.rmtree(root, ignore_errors=True)
            self._swept = True
        now = time.monotonic()
        if now < self._retry_at:
            return
        due: list[tuple[int, int, Path]] = []
        for partition, db in list(dbs.items()):
            value = db.get(OFFSET_KEY)
            if value is None:
                continue
            offset = int(value)
            last = self._last.setdefault(partition, _Last(-1, now))
            entries = offset - last.offset
            if entries <= 0:
                continue
            interval = self.settings.ledger.snapshot_interval_s
            if entries >= self.settings.ledger.snapshot_every_entries or now - last.at >= interval:
                target = root / f"p{partition}-{offset}"
                shutil.rmtree(target, ignore_errors=True)
                root.mkdir(parents=True, exist_ok=True)
                rocksdict.Checkpoint(db).create_checkpoint(str(target))
                due.append((partition, offset, target))
        if due:
            self._running = self._pool.submit(self._upload_all, due)

    def _upload_all(self, due: list[tuple[int, int, Path]]) -> None:
        for partition, offset, directory in due:
            try:
                info = self.store.save(self.topic, self.topic_id(), partition, offset,
                                       pack(directory), self.worker_name)  # fmt: skip
                self.store.prune(self.topic, partition, self.settings.ledger.snapshot_keep)
            except (CreditLedgerError, psycopg.Error, OSError) as exc:
                log.warning("partition %s: snapshot at offset %s not written (%s); the "
                            "previous one stays", partition, offset, exc)  # fmt: skip
                self.metrics.snapshots.labels("failed").inc()
                self._retry_at = time.monotonic() + FAILED_RETRY_S
                continue
            finally:
                shutil.rmtree(directory, ignore_errors=True)
            self._last[partition] = _Last(offset, time.monotonic())
            self.metrics.snapshots.labels("taken").inc()
            self.metrics.snapshot_bytes.labels(str(partition)).set(info.size_bytes)
            self.metrics.snapshot_seconds.observe(info.took_ms / 1000)
            log.info("partition %s: snapshot %s at ledger offset %s, %s bytes in %s chunks, "
                     "%s ms", partition, info.snapshot_id, offset, info.size_bytes,
                     info.chunks, info.took_ms)  # fmt: skip

    def wait(self, timeout_s: float | None = None) -> None:
        """Let a running upload finish (tests and the benchmark)."""
        if self._running is not None:
            self._running.result(timeout_s)
