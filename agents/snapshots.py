"""Snapshots of the fold's state, so that a worker without local state recovers in bounded time.

Without them, a worker whose RocksDB folder is gone (a new host, a lost disk, a worker that
takes partitions over after a rebalance) rebuilds each partition's state by folding the
ledger from offset 0: time in proportion to all of history.

**What a snapshot is.** The files of a RocksDB checkpoint of one partition's state store.
The store keeps Faust's persisted offset (the last ledger offset applied) in the same
database, and the checkpoint is taken on the event loop between two batches, when no write
is half done: a snapshot is the fold of exactly the entries ``[0, ledger_offset]`` of its
partition, and says so.

**Where it is kept.** In Postgres (migration 0010), not on the worker's disk. RocksDB never
changes a file once written, so files are stored once per partition (by sha256) and shared
by the snapshots that contain them: a snapshot uploads only what was written since the last
one. One transaction writes its new files and then its row: a writer killed halfway leaves
nothing, and the previous snapshot stays the newest. The row names the ledger topic's id, so
a topic deleted and created again (another log under the same name) never gets the old
log's state. Every file's sha256 and size, and the manifest's sha256, are checked before a
snapshot is used. ARCHITECTURE.md argues Postgres against a compacted topic.

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
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
OFFSET_KEY = b"__faust\0offset__"  # where Faust's RocksDB store keeps the persisted offset
FAILED_RETRY_S = 30.0
COPY_CHUNKS = "COPY ledger_snapshot_chunks (file_id, n, data) FROM STDIN (FORMAT BINARY)"


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    snapshot_id: int
    partition: int
    ledger_offset: int
    files: list[str]
    file_ids: list[int]
    size_bytes: int
    uploaded_bytes: int
    sha256: str
    taken_by: str
    took_ms: int


@dataclass(frozen=True, slots=True)
class FileInfo:
    name: str
    sha256: str
    size_bytes: int


def file_sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as file:
        while piece := file.read(1 << 20):
            hasher.update(piece)
    return hasher.hexdigest()


class FileHashes:
    """The checkpoint files' sha256, remembered for table files (``*.sst``).

    RocksDB never changes a table file once written, and a checkpoint hard-links it, so a
    file with the same inode, size and mtime has the same content. Without this, every
    snapshot read the whole state again (806 MB at 10M entries) to upload its few new files.
    The manifest, options, WAL and CURRENT files change in place: always read."""

    LIMIT = 10_000  # files remembered (a partition's state has some tens)

    def __init__(self) -> None:
        self._known: dict[tuple[str, int, int, int, int], str] = {}

    def of(self, path: Path) -> FileInfo:
        stat = path.stat()
        if path.suffix != ".sst":
            return FileInfo(path.name, file_sha256(path), stat.st_size)
        key = (path.name, stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
        sha = self._known.get(key)
        if sha is None:
            if len(self._known) >= self.LIMIT:
                self._known.clear()
            sha = self._known[key] = file_sha256(path)
        return FileInfo(path.name, sha, stat.st_size)


def manifest_sha256(files: Iterable[FileInfo]) -> str:
    """The snapshot's checksum: of its files' names, contents (their sha256) and sizes."""
    ordered = sorted(files, key=lambda f: f.name)
    lines = "".join(f"{f.name} {f.sha256} {f.size_bytes}\n" for f in ordered)
    return hashlib.sha256(lines.encode()).hexdigest()


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


def _lock(conn: psycopg.Connection[Any], topic: str, partition: int) -> None:
    """Serialise the writers and the pruning of one partition's snapshots (two-key advisory
    locks are a space of their own: no clash with ``migrate``'s one-key lock)."""
    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s), %s)", (topic, partition))


def _next_id(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT nextval('ledger_snapshot_ids')").fetchone()
    assert row is not None
    return int(row[0])


class SnapshotStore:
    """The snapshots in Postgres. Every method opens its own connection: the callers are
    threads, and a worker holds no Postgres connection between snapshots."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.hashes = FileHashes()

    def save(self, topic: str, topic_id: str, partition: int, ledger_offset: int,
             directory: Path, taken_by: str) -> SnapshotInfo:  # fmt: skip
        """Store the checkpoint in ``directory`` as the partition's snapshot at
        ``ledger_offset``: the files no earlier snapshot stored, then its row, in one
        transaction."""
        started = time.monotonic()
        paths = sorted(path for path in directory.iterdir() if path.is_file())
        files = [self.hashes.of(p) for p in paths]
        with connect(self.settings) as conn:
            _lock(conn, topic, partition)
            ids: dict[tuple[str, int], int] = {
                (sha, size): file_id
                for file_id, sha, size in conn.execute(
                    "SELECT file_id, sha256, size_bytes FROM ledger_snapshot_files "
                    "WHERE topic = %s AND partition = %s AND sha256 = ANY(%s)",
                    (topic, partition, [f.sha256 for f in files]),
                )
            }  # fmt: skip
            new: list[tuple[int, FileInfo, Path]] = []
            for f, path in zip(files, paths, strict=True):
                if (f.sha256, f.size_bytes) not in ids:
                    ids[(f.sha256, f.size_bytes)] = _next_id(conn)
                    new.append((ids[(f.sha256, f.size_bytes)], f, path))
            self._store_files(conn, topic, partition, new)
            took_ms = round((time.monotonic() - started) * 1000)
            info = SnapshotInfo(
                _next_id(conn), partition, ledger_offset, [f.name for f in files],
                [ids[(f.sha256, f.size_bytes)] for f in files], sum(f.size_bytes for f in files),
                sum(f.size_bytes for _i, f, _p in new), manifest_sha256(files), taken_by, took_ms,
            )  # fmt: skip
            conn.execute(
                "INSERT INTO ledger_snapshots (snapshot_id, topic, topic_id, partition, "
                "ledger_offset, format, files, file_ids, size_bytes, uploaded_bytes, sha256, "
                "taken_by, took_ms) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (info.snapshot_id, topic, topic_id, partition, ledger_offset, FORMAT, info.files,
                 info.file_ids, info.size_bytes, info.uploaded_bytes, info.sha256, taken_by,
                 took_ms),
            )  # fmt: skip
            conn.commit()
        return info

    def _store_files(self, conn: psycopg.Connection[Any], topic: str, partition: int,
                     new: list[tuple[int, FileInfo, Path]]) -> None:  # fmt: skip
        """The new files' contents as chunks (one COPY), then their rows."""
        counts: dict[int, int] = {}
        size = self.settings.ledger.snapshot_chunk_bytes
        with conn.cursor().copy(COPY_CHUNKS) as copy:
            copy.set_types(["bigint", "integer", "bytea"])
            for file_id, _f, path in new:
                count = 0
                with path.open("rb") as file:
                    while piece := file.read(size):
                        copy.write_row((file_id, count, piece))
                        count += 1
                counts[file_id] = count
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO ledger_snapshot_files (file_id, topic, partition, sha256, "
                "size_bytes, chunks) VALUES (%s, %s, %s, %s, %s, %s)",
                [(i, topic, partition, f.sha256, f.size_bytes, counts[i]) for i, f, _p in new],
            )

    def newest_first(self, topic: str, topic_id: str, partition: int) -> list[SnapshotInfo]:
        with connect(self.settings, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT snapshot_id, partition, ledger_offset, files, file_ids, size_bytes, "
                "uploaded_bytes, sha256, taken_by, took_ms FROM ledger_snapshots "
                "WHERE topic = %s AND topic_id = %s AND partition = %s AND format = %s "
                "ORDER BY ledger_offset DESC, snapshot_id DESC",
                (topic, topic_id, partition, FORMAT),
            ).fetchall()
        return [SnapshotInfo(*row) for row in rows]

    def fetch(self, info: SnapshotInfo, target: Path) -> None:
        """Write the snapshot's files into ``target`` (made here); a :class:`SnapshotError`
        unless every file and the manifest have the sha256 and size they were written with."""
        target.mkdir(parents=True)
        with connect(self.settings) as conn:
            rows = conn.execute(
                "SELECT file_id, sha256, size_bytes FROM ledger_snapshot_files "
                "WHERE file_id = ANY(%s)", (info.file_ids,)
            ).fetchall()  # fmt: skip
            stored = {row[0]: (row[1], row[2]) for row in rows}
            missing = [i for i in info.file_ids if i not in stored]
            if missing:
                raise SnapshotError(f"snapshot {info.snapshot_id}: files {missing} are gone")
            files = [FileInfo(name, *stored[i]) for name, i in zip(info.files, info.file_ids,
                                                                    strict=True)]  # fmt: skip
            if manifest_sha256(files) != info.sha256:
                raise SnapshotError(f"snapshot {info.snapshot_id}: its manifest's sha256 is "
                                    f"not the {info.sha256} it was written with")  # fmt: skip
            for f, file_id in zip(files, info.file_ids, strict=True):
                _download(conn, info.snapshot_id, file_id, f, target)

    def prune(self, topic: str, topic_id: str, partition: int, keep: int) -> int:
        """Drop all but the newest ``keep`` snapshots of the partition (and every one of an
        older incarnation of the topic), then the files no snapshot names; return how many
        snapshots went."""
        with connect(self.settings) as conn:
            _lock(conn, topic, partition)
            dropped = conn.execute(
                "DELETE FROM ledger_snapshots WHERE topic = %s AND partition = %s AND "
                "(topic_id <> %s OR snapshot_id IN (SELECT snapshot_id FROM ledger_snapshots "
                "WHERE topic = %s AND topic_id = %s AND partition = %s ORDER BY ledger_offset "
                "DESC, snapshot_id DESC OFFSET %s)) RETURNING snapshot_id",
                (topic, partition, topic_id, topic, topic_id, partition, keep),
            ).fetchall()
            if dropped:
                orphans = conn.execute(
                    "DELETE FROM ledger_snapshot_files f WHERE topic = %s AND partition = %s "
                    "AND NOT EXISTS (SELECT 1 FROM ledger_snapshots s WHERE s.topic = f.topic "
                    "AND s.partition = f.partition AND f.file_id = ANY(s.file_ids)) "
                    "RETURNING file_id",
                    (topic, partition),
                ).fetchall()
                conn.execute("DELETE FROM ledger_snapshot_chunks WHERE file_id = ANY(%s)",
                             ([row[0] for row in orphans],))  # fmt: skip
            conn.commit()
        return len(dropped)


def _download(conn: psycopg.Connection[Any], snapshot_id: int, file_id: int, f: FileInfo,
              target: Path) -> None:  # fmt: skip
    if not f.name or "/" in f.name or f.name in (".", ".."):
        raise SnapshotError(f"snapshot {snapshot_id} names a file {f.name!r}")
    hasher = hashlib.sha256()
    size = 0
    with (
        conn.cursor(name=f"file{file_id}", binary=True) as cur,
        (target / f.name).open("wb") as out,
    ):
        cur.itersize = 4
        cur.execute("SELECT data FROM ledger_snapshot_chunks WHERE file_id = %s ORDER BY n",
                    (file_id,))  # fmt: skip
        for (data,) in cur:
            hasher.update(data)
            out.write(data)
            size += len(data)
    if (hasher.hexdigest(), size) != (f.sha256, f.size_bytes):
        raise SnapshotError(
            f"snapshot {snapshot_id}: file {f.name} has sha256 {hasher.hexdigest()} and "
            f"{size} bytes, not the {f.sha256} and {f.size_bytes} it was written with"
        )


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
        """Download and verify next to ``path``, then put it in ``path``'s place."""
        staging = path.with_name(path.name + ".restoring")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            self.store.fetch(info, staging)  # raises on any file that does not verify
            if local_offset(staging) != info.ledger_offset:
                raise SnapshotError(f"its state's offset is not the {info.ledger_offset} "
                                    "its row names")  # fmt: skip
            old = path.with_name(path.name + ".replaced")
            shutil.rmtree(old, ignore_errors=True)
            if path.exists():
                path.rename(old)
            staging.rename(path)
            shutil.rmtree(old, ignore_errors=True)
            return len(info.files)
        finally:
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
                try:
                    rocksdict.Checkpoint(db).create_checkpoint(str(target))
                except Exception as exc:  # rocksdict's errors are untyped
                    # A snapshot is never a reason to stop folding: the next one may do.
                    log.error("partition %s: no checkpoint at offset %s: %s", partition,
                              offset, exc)  # fmt: skip
                    self.metrics.snapshots.labels("failed").inc()
                    self._retry_at = now + FAILED_RETRY_S
                    continue
                due.append((partition, offset, target))
        if due:
            self._running = self._pool.submit(self._upload_all, due)

    def _upload_all(self, due: list[tuple[int, int, Path]]) -> None:
        for partition, offset, directory in due:
            try:
                topic_id = self.topic_id()
                info = self.store.save(self.topic, topic_id, partition, offset, directory,
                                       self.worker_name)  # fmt: skip
                self.store.prune(self.topic, topic_id, partition,
                                 self.settings.ledger.snapshot_keep)  # fmt: skip
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
            log.info("partition %s: snapshot %s at ledger offset %s, %s files, %s bytes "
                     "(%s new) in %s ms", partition, info.snapshot_id, offset, len(info.files),
                     info.size_bytes, info.uploaded_bytes, info.took_ms)  # fmt: skip
