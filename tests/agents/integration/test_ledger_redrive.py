"""Dead letters re-driven after a fix are applied once; re-driving again changes nothing."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from agents import ops
from agents.domain import DAY_MS
from contracts.records import GRANT_TOPIC, command_to_record
from creditledger.cli import main
from kernel.settings import Settings
from streams.codec import AvroCodec
from testbed.ledger import WorkerGroup, send
from testbed.workload import FRESH_T0_MS, Message
from tests.agents.unit.test_domain import grant


def _entries_for(settings: Settings, codec: AvroCodec, user: str) -> list[object]:
    return [entry for _record, entry in ops.read_entries(settings, codec)
            if not isinstance(entry, Exception) and entry.user_id == user]  # fmt: skip


def _wait(condition: Callable[[], object], timeout_s: float = 120) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(1)
    return False


@pytest.mark.timeout(600)
def test_a_grant_refused_by_a_too_low_limit_applies_after_the_fix(
    stack_settings: Settings, codec: AvroCodec, unique: str, capsys: pytest.CaptureFixture[str]
) -> None:
    workers = WorkerGroup(unique, stack_settings)
    user = f"redrive-{unique}"
    command = grant(
        event_id=f"{user}-order", user_id=user, amount_micro=5_000_000, occurred_at_ms=FRESH_T0_MS
    )
    value = codec.encode(GRANT_TOPIC, command_to_record(command))
    try:
        workers.extra_env = {"CREDITLEDGER_LEDGER__MAX_AMOUNT_MICRO": "1000"}
        workers.start("w1")
        send(stack_settings, [Message(GRANT_TOPIC, user.encode(), value, "invalid")])

        def refused() -> list[ops.DeadLetter]:
            return [d for d in ops.dead_letters(stack_settings, codec)
                    if d.record["event_id"] == command.event_id]  # fmt: skip

        assert _wait(lambda: refused()), f"no dead letter\n{workers.tail('w1')}"
        letter = refused()[0]
        assert letter.record["reason"] == "invalid"
        assert "exceeds the configured maximum 1000" in letter.record["detail"]
        assert _entries_for(stack_settings, codec, user) == []

        # The fix: the limit goes back to its default; the worker restarts.
        workers.stop_all()
        workers.extra_env = {}
        workers.start("w1")
        assert main(["ledger", "dlq", "redrive", "--offset", str(letter.offset)]) == 0
        assert "re-drove 1 message" in capsys.readouterr().out
        assert _wait(lambda: _entries_for(stack_settings, codec, user)), workers.tail("w1")

        # Again: the command is a duplicate by event_id now; no second entry.
        assert main(["ledger", "dlq", "redrive", "--offset", str(letter.offset)]) == 0
        time.sleep(8)
        entries = _entries_for(stack_settings, codec, user)
        assert len(entries) == 1
        assert len(refused()) == 1, "the re-driven duplicate must not be rejected again"

        # What an operator sees through the CLI.
        capsys.readouterr()
        assert main(["ledger", "balance", user]) == 0
        balance_line = capsys.readouterr().out.splitlines()[-1].split()
        assert balance_line[:5] == [user, "5.000000", "5000000", "1", "1"]
        assert main(["ledger", "dlq", "list", "--reason", "invalid", "--limit", "0"]) == 0
        assert command.event_id in capsys.readouterr().out
        assert main(["ledger", "fold-check", "--quiet"]) == 0
        assert "fold-check: OK" in capsys.readouterr().out
    finally:
        workers.cleanup()


@pytest.mark.timeout(600)
def test_a_stale_command_is_dead_lettered_and_applies_once_after_a_checked_redrive(
    stack_settings: Settings, codec: AvroCodec, unique: str, capsys: pytest.CaptureFixture[str]
) -> None:
    workers = WorkerGroup(unique, stack_settings)
    user = f"stale-{unique}"
    forty_days_ago = time.time_ns() // 1_000_000 - 40 * DAY_MS
    command = grant(event_id=f"{user}-late", user_id=user, amount_micro=3_000_000,
                    occurred_at_ms=forty_days_ago)  # fmt: skip
    message = Message(GRANT_TOPIC, user.encode(),
                      codec.encode(GRANT_TOPIC, command_to_record(command)), "stale")  # fmt: skip

    def letters() -> list[ops.DeadLetter]:
        return [d for d in ops.dead_letters(stack_settings, codec)
                if d.record["event_id"] == command.event_id]  # fmt: skip

    try:
        workers.start("w1")
        send(stack_settings, [message])
        assert _wait(lambda: letters()), f"no dead letter\n{workers.tail('w1')}"
        letter = letters()[0]
        assert letter.record["reason"] == "stale"
        assert letter.record["detail"].startswith("occurred_at is 40 days 0 hours old")
        assert _entries_for(stack_settings, codec, user) == []

        # The operator re-drives it: the ledger has never applied it, so it goes past the window.
        capsys.readouterr()
        assert main(["ledger", "dlq", "redrive", "--offset", str(letter.offset)]) == 0
        out = capsys.readouterr().out
        assert "not in the ledger: re-driven past the idempotency window" in out
        assert "re-drove 1 message" in out
        assert _wait(lambda: _entries_for(stack_settings, codec, user)), workers.tail("w1")

        # The producer sends it again: the index knows it now, so it is a duplicate (however
        # old). The operator re-drives the letter again: the ledger has it, so it is not sent.
        send(stack_settings, [message])
        capsys.readouterr()
        assert main(["ledger", "dlq", "redrive", "--offset", str(letter.offset)]) == 0
        out = capsys.readouterr().out
        assert "already applied as entry 1 of" in out, out
        assert "re-drove 0 message" in out
        time.sleep(5)
        entries = _entries_for(stack_settings, codec, user)
        assert len(entries) == 1 and entries[0].amount_micro == 3_000_000  # type: ignore[attr-defined]
        assert len(letters()) == 1, "a known id is a duplicate, not stale"
    finally:
        workers.cleanup()
    assert main(["ledger", "fold-check", "--quiet"]) == 0
