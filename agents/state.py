"""The fold's state: accounts and the processed-event index, in one Faust table.

The table's changelog topic is ``credit.ledger.entries`` itself. An entry is
both the ledger's fact and the state change it implies (the account's new
``balance`` and ``seq``, one more ``event_id`` seen), so there is no second
write that could be lost or land without the first. The worker never writes
through Faust's changelog: it produces entries, waits for Kafka to ack them,
then applies the acked entries to the table's local store with
:meth:`LedgerStateTable.apply_entries`, which records the last applied ledger
offset per partition in the same store (Faust's "persisted offset").

When a partition is (re)assigned, Faust's own table recovery reads the ledger
from that persisted offset to its end and hands the records to
:meth:`LedgerStateTable.apply_changelog_batch`, the same code path. So the
state is always the fold of a ledger prefix, whatever the worker lived through.

Keys: ``a<user_id>`` for an account, ``e<event_id>`` for a processed event, and
``t<occurred_at, 8 bytes big-endian><event_id>`` (its value: the ``e`` key's) so that
the processed-event index can forget ids older than the idempotency window in key
order, without a scan (:meth:`LedgerStateTable.forget_before`). Values are small
fixed structs: this is the per-event path.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import faust
import rocksdict
from faust.types import TP

from agents.domain import Account, Seen
from contracts.records import LEDGER_TOPIC
from kernel.errors import CodecError
from streams.codec import AvroCodec

if TYPE_CHECKING:
    from agents.snapshots import FoldSnapshots

log = logging.getLogger(__name__)

ACCOUNT_PREFIX = b"a"
EVENT_PREFIX = b"e"
TIME_PREFIX = b"t"
FORGET_MARGIN_MS = 86_400_000  # a worker's clock may step back this far, no further
_TIME = struct.Struct(">q")  # big-endian: keys sort by time (occurred_at is never negative)
_ACCOUNT = struct.Struct("<qq")  # balance_micro, seq
_SEEN = struct.Struct("<q16s")  # seq, digest (16 bytes) + user_id (utf-8) after it


@dataclass(frozen=True, slots=True)
class StateWrite:
    """What one ledger entry at (partition, offset) changes in the state."""

    partition: int
    offset: int
    user_id: str
    seq: int
    balance_after_micro: int
    event_id: str
    command_digest: str
    occurred_at_ms: int


def time_key(occurred_at_ms: int, event_id: str) -> bytes:
    return TIME_PREFIX + _TIME.pack(max(occurred_at_ms, 0)) + event_id.encode()


def pack_account(balance_micro: int, seq: int) -> bytes:
    return _ACCOUNT.pack(balance_micro, seq)


def unpack_account(value: bytes) -> Account:
    balance, seq = _ACCOUNT.unpack(value)
    return Account(balance_micro=balance, seq=seq)


def pack_seen(user_id: str, seq: int, digest: str) -> bytes:
    return _SEEN.pack(seq, bytes.fromhex(digest)) + user_id.encode()


def unpack_seen(value: bytes) -> Seen:
    seq, digest = _SEEN.unpack_from(value)
    return Seen(user_id=value[_SEEN.size :].decode(), seq=seq, command_digest=digest.hex())


def _store_event(partition: int, offset: int, key: bytes, value: bytes) -> Any:
    # Faust stores read either event.key/value (memory) or event.message.* (RocksDB).
    message = SimpleNamespace(
        tp=TP(LEDGER_TOPIC, partition), partition=partition, offset=offset, key=key, value=value
    )
    return SimpleNamespace(message=message, key=key, value=value)


class LedgerStateTable(faust.Table[bytes, bytes]):
    """A Faust table folded from the ledger topic (its changelog)."""

    # Told how many entries each recovery batch read back (the worker's metrics).
    on_recovered: Callable[[int], None] | None = None
    codec: AvroCodec | None = None
    # Restores a newly assigned partition's local state from a snapshot (agents.snapshots).
    snapshots: FoldSnapshots | None = None
    _getter: Any = None

    async def on_rebalance(self, assigned: set[TP], revoked: set[TP], newly_assigned: set[TP],
                           generation_id: int = 0) -> None:  # fmt: skip
        """Before Faust opens the stores of newly assigned partitions (and then recovers them
        from their persisted offsets), bring missing or far-behind ones up to a snapshot."""
        if self.snapshots is not None:
            store = self.data
            partition_path = getattr(store, "partition_path", None)
            opened: dict[int, Any] = getattr(store, "_dbs", {})
            if partition_path is not None:  # RocksDB (the memory store has nothing to restore)
                await self.snapshots.restore({
                    tp.partition: partition_path(tp.partition) for tp in newly_assigned
                    if tp.topic == LEDGER_TOPIC and tp.partition not in opened
                })  # fmt: skip
        await super().on_rebalance(assigned, revoked, newly_assigned, generation_id)

    def open_partitions(self) -> dict[int, Any]:
        """The partitions whose stores are open on this worker (RocksDB), by number."""
        return dict(getattr(self.data, "_dbs", {}))

    def forget_old_ids(self, window_ms: int, limit: int) -> int:
        """Forget processed event ids older than the window (and a day's margin for clock
        steps), up to ``limit`` per partition. Safe: every command that old is ``stale``
        before the index is asked (:func:`agents.domain.decide`)."""
        horizon = time.time_ns() // 1_000_000 - window_ms - FORGET_MARGIN_MS
        forgotten = sum(forget_before(db, horizon, limit)
                        for db in self.open_partitions().values())  # fmt: skip
        if forgotten:
            log.info("forgot %d event ids that occurred before %d", forgotten, horizon)
        return forgotten

    def _raw_get(self, partition: int, key: bytes) -> bytes | None:
        getter = self._getter
        if getter is None:
            store = self.data
            db_for_partition = getattr(store, "_db_for_partition", None)
            if db_for_partition is not None:  # RocksDB: one database per partition

                def getter(partition: int, key: bytes) -> bytes | None:
                    value: bytes | None = db_for_partition(partition).get(key)
                    return value
            else:
                memory: MutableMapping[bytes, bytes] = store.data  # the memory store's dict

                def getter(partition: int, key: bytes) -> bytes | None:
                    return memory.get(key)

            self._getter = getter
        return getter(partition, key)  # type: ignore[no-any-return]

    def account(self, partition: int, user_id: str) -> Account:
        value = self._raw_get(partition, ACCOUNT_PREFIX + user_id.encode())
        return Account() if value is None else unpack_account(value)

    def seen(self, partition: int, event_id: str) -> Seen | None:
        value = self._raw_get(partition, EVENT_PREFIX + event_id.encode())
        return None if value is None else unpack_seen(value)

    def apply_entries(
        self,
        writes: Iterable[StateWrite],
        trusted: bool = False,
        offsets: dict[int, int] | None = None,
    ) -> int:
        """Apply acked ledger entries to the local store; return how many changed it.

        An account only moves forward: an entry whose seq is not newer than the
        stored one (a redelivered duplicate in the log) leaves it as it is.
        ``trusted``: the entries were just decided on this very state, so each
        is newer by construction and the stored account need not be read.
        The store writes the batch, then the highest offset per partition;
        ``offsets`` gives those directly (partition -> highest ledger offset)
        when the writes do not carry their own.
        """
        newest: dict[tuple[int, str], StateWrite] = {}
        puts: dict[int, list[tuple[bytes, bytes]]] = {}
        tops: dict[int, int] = {}
        for write in writes:
            key = (write.partition, write.user_id)
            known = newest.get(key)
            if known is None:
                if not trusted and write.seq <= self.account(write.partition, write.user_id).seq:
                    continue
            elif write.seq <= known.seq:
                continue
            newest[key] = write
            partition = write.partition
            offset = write.offset if offsets is None else offsets[partition]
            if offset > tops.get(partition, -1):
                tops[partition] = offset
            seen = pack_seen(write.user_id, write.seq, write.command_digest)
            into = puts.setdefault(partition, [])
            into.append((EVENT_PREFIX + write.event_id.encode(), seen))
            into.append((time_key(write.occurred_at_ms, write.event_id), seen))
        for (partition, user_id), write in newest.items():
            account = pack_account(write.balance_after_micro, write.seq)
            puts[partition].append((ACCOUNT_PREFIX + user_id.encode(), account))
        if puts:
            self._write(puts, tops)
        return len(newest)

    def _write(self, puts: dict[int, list[tuple[bytes, bytes]]], tops: dict[int, int]) -> None:
        """Each partition's writes in one batch, then its persisted offset (as Faust's own
        ``apply_changelog_batch`` does, without an event object per key: the per-event
        path)."""
        store = self.data
        db_for_partition = getattr(store, "_db_for_partition", None)
        if db_for_partition is None or not getattr(store, "use_rocksdict", False):
            # The memory store (or python-rocksdb): through Faust's events.
            events = [_store_event(partition, tops[partition], key, value)
                      for partition, pairs in puts.items() for key, value in pairs]  # fmt: skip
            store.apply_changelog_batch(events, to_key=_identity, to_value=_identity)
            return
        for partition, pairs in puts.items():
            batch = rocksdict.WriteBatch(raw_mode=True)
            for key, value in pairs:
                batch.put(key, value)
            db_for_partition(partition).write(batch)
        for partition, offset in tops.items():
            store.set_persisted_offset(TP(LEDGER_TOPIC, partition), offset)

    def apply_changelog_batch(self, batch: Iterable[Any]) -> None:
        """Faust's recovery path: ledger records from the persisted offset onwards."""
        assert self.codec is not None, "LedgerStateTable.codec is set when the app is built"
        writes: list[StateWrite] = []
        for event in batch:
            message = event.message
            if message.value is None:
                continue
            try:
                record = self.codec.decode(
                    message.value, expected=LEDGER_TOPIC, plain_times=True
                ).record
            except CodecError as exc:
                # Not ours to fix here: fold-check reports it; the state skips it.
                log.error("ledger %s[%s]@%s unreadable: %s", message.topic,
                          message.partition, message.offset, exc)  # fmt: skip
                continue
            writes.append(
                StateWrite(message.partition, message.offset, record["user_id"], record["seq"],
                           record["balance_after_micro"], record["event_id"],
                           record["command_digest"], record["occurred_at"])
            )  # fmt: skip
        self.apply_entries(writes)
        if self.on_recovered is not None:
            self.on_recovered(len(writes))


def _identity(value: Any) -> Any:
    return value


def forget_before(db: Any, before_ms: int, limit: int) -> int:
    """Forget up to ``limit`` processed event ids that occurred before ``before_ms``, oldest
    first, in one write; return how many. An ``e`` key goes only if it still holds what its
    ``t`` key recorded: an id applied again later (forgotten once, then reused) stays."""
    end = TIME_PREFIX + _TIME.pack(max(before_ms, 0))
    batch = rocksdict.WriteBatch(raw_mode=True)
    iterator = db.iter()
    iterator.seek(TIME_PREFIX)
    count = 0
    while count < limit and iterator.valid():
        key = iterator.key()
        if key >= end:
            break
        event_key = EVENT_PREFIX + key[1 + _TIME.size :]
        if db.get(event_key) == iterator.value():
            batch.delete(event_key)
        batch.delete(key)
        count += 1
        iterator.next()
    del iterator
    if count:
        db.write(batch)
    return count
