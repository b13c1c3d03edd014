"""Ops on the ledger and its dead letters: balance, fold-check, DLQ list and re-drive.

These read topics from the beginning up to the high watermarks taken when
they start (a moving target would never finish), with a progress bar on
standard error for long scans.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from agents.domain import Account, command_digest
from agents.fold_check import FoldChecker
from contracts.cloudevents import REDRIVE_CHECKED, event_headers, kafka_headers
from contracts.commands import Command, Entry
from contracts.records import LEDGER_TOPIC, REJECTED_TOPIC, command_from_record, entry_from_record
from kernel.errors import CodecError, CreditLedgerError
from kernel.settings import Settings
from streams.codec import AvroCodec
from streams.kafka_clients import make_producer, partition_of
from streams.reading import Record, read_topic


def read_entries(
    settings: Settings, codec: AvroCodec, partitions: list[int] | None = None,
    progress: bool = False,
) -> Iterator[tuple[Record, Entry | CodecError]]:  # fmt: skip
    for record in read_topic(settings, LEDGER_TOPIC, partitions, progress):
        try:
            decoded = codec.decode(record.value, expected=LEDGER_TOPIC)
        except CodecError as exc:
            yield record, exc
            continue
        yield record, entry_from_record(decoded.record)


@dataclass(frozen=True)
class FoldCheckReport:
    checker: FoldChecker
    unreadable: int
    first_unreadable: str | None

    @property
    def ok(self) -> bool:
        return self.checker.ok and self.unreadable == 0


def fold_check(settings: Settings, codec: AvroCodec, progress: bool = True,
               keep_entries: bool = False) -> FoldCheckReport:  # fmt: skip
    checker = FoldChecker(keep_entries=keep_entries)
    unreadable = 0
    first_unreadable: str | None = None
    for record, entry in read_entries(settings, codec, progress=progress):
        where = f"{LEDGER_TOPIC}[{record.partition}]@{record.offset}"
        if isinstance(entry, CodecError):
            unreadable += 1
            first_unreadable = first_unreadable or f"{where}: {entry}"
            continue
        checker.add(entry, where)
    return FoldCheckReport(checker, unreadable, first_unreadable)


def balance(settings: Settings, codec: AvroCodec, user_id: str,
            partitions: int) -> tuple[Account, int]:  # fmt: skip
    """The account by folding the user's partition of the ledger; and its entry count."""
    account = Account()
    count = 0
    for _record, entry in read_entries(settings, codec, [partition_of(user_id, partitions)]):
        if isinstance(entry, Entry) and entry.user_id == user_id and entry.seq > account.seq:
            account = Account(balance_micro=entry.balance_after_micro, seq=entry.seq)
            count += 1
    return account, count


@dataclass(frozen=True)
class DeadLetter:
    offset: int  # in credit.commands.rejected
    record: dict[str, Any]


def dead_letters(settings: Settings, codec: AvroCodec, reason: str | None = None,
                 progress: bool = False) -> list[DeadLetter]:  # fmt: skip
    letters: list[DeadLetter] = []
    for record in read_topic(settings, REJECTED_TOPIC, progress=progress):
        decoded = codec.decode(record.value, expected=REJECTED_TOPIC).record
        if reason is None or decoded["reason"] == reason:
            letters.append(DeadLetter(record.offset, decoded))
    return letters


@dataclass(frozen=True)
class StaleCheck:
    """What the ledger says of a ``stale`` dead letter's event id."""

    letter: DeadLetter
    send: bool  # not in the ledger: re-driven past the idempotency window
    detail: str


def check_stale(settings: Settings, codec: AvroCodec, letters: list[DeadLetter],
                partitions: int, progress: bool = True) -> list[StaleCheck]:  # fmt: skip
    """Look each stale letter's event id up in the ledger itself (its user's partition, from
    the start): the fold's index may have forgotten it, the ledger has not. Only a command
    the ledger has never applied may be sent past the window."""
    commands: dict[int, Command] = {}
    checks: list[StaleCheck] = []
    for letter in letters:
        record = letter.record
        try:
            decoded = codec.decode(record["original_value"], plain_times=True)
            commands[letter.offset] = command_from_record(record["topic"], decoded.record)
        except (CodecError, KeyError, TypeError) as exc:
            checks.append(StaleCheck(letter, False, f"does not decode: {exc}"))
    wanted = {command.event_id for command in commands.values()}
    homes = sorted({partition_of(c.user_id, partitions) for c in commands.values()})
    found: dict[str, Entry] = {}
    if homes:
        for _record, read in read_entries(settings, codec, homes, progress):
            if isinstance(read, Entry) and read.event_id in wanted:
                found.setdefault(read.event_id, read)
    for letter in letters:
        command = commands.get(letter.offset)
        if command is None:
            continue
        entry = found.get(command.event_id)
        if entry is None:
            checks.append(StaleCheck(letter, True, "not in the ledger: re-driven past the "
                                     "idempotency window"))  # fmt: skip
        elif entry.command_digest == command_digest(command):
            checks.append(StaleCheck(letter, False, f"already applied as entry {entry.seq} of "
                                     f"{entry.user_id}: not sent"))  # fmt: skip
        else:
            checks.append(StaleCheck(letter, False, f"its event id is entry {entry.seq} of "
                                     f"{entry.user_id} with other content: not sent"))  # fmt: skip
    return checks


def redrive(settings: Settings, letters: list[DeadLetter],
            checked: frozenset[int] = frozenset()) -> int:  # fmt: skip
    """Send the original bytes back to their original topic (the fold decides again).

    Safe to repeat: a command that was applied meanwhile is a duplicate by
    event_id, and one that is still wrong returns to the dead-letter topic.
    Letters whose dlq offset is in ``checked`` are stale ones :func:`check_stale` found
    absent from the ledger: they carry the header that lets them past the window.
    """
    producer = make_producer(settings)
    failures: list[Any] = []
    for letter in letters:
        record = letter.record
        # Sent again by an operator: the re-drive is this record's source.
        event_id = (
            record["event_id"] or f"{record['topic']}/{record['partition']}/{record['offset']}"
        )
        headers = event_headers(event_id, record["topic"], "creditledger-redrive",
                                time.time_ns() // 1_000_000, None)  # fmt: skip
        if letter.offset in checked:
            headers[REDRIVE_CHECKED] = f"dlq@{letter.offset}"
        producer.produce(
            record["topic"], key=record["original_key"], value=record["original_value"],
            headers=kafka_headers(headers),
            on_delivery=lambda err, _msg: failures.append(err) if err else None,
        )  # fmt: skip
        producer.poll(0)
    remaining = producer.flush(60)
    if remaining or failures:
        raise CreditLedgerError(f"re-drive incomplete: {remaining} unsent, {failures[:3]}")
    sent: int = len(letters)
    return sent
