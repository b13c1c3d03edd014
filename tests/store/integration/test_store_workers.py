"""``store.workers`` > 1: a supervisor and its SO_REUSEPORT workers (store/server.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel.settings import Settings
from testbed.proxy import free_port, wait_for
from testbed.store import StoreWorld, store_world
from testbed.topics import ScratchTopics


@pytest.fixture
def world(stack_settings: Settings, scratch: ScratchTopics, unique: str) -> Iterator[StoreWorld]:
    with store_world(stack_settings, scratch, unique, start=False) as world:
        world.start_store(workers="2")
        yield world


def workers_of(supervisor: int) -> set[int]:
    """The supervisor's worker processes (not multiprocessing's resource tracker)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            command = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        parent = int(stat[stat.rindex(")") + 2 :].split()[1])
        if parent == supervisor and b"spawn_main" in command:
            found.add(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def answers(world: StoreWorld, requests: int = 40) -> int:
    token = world.token("alice")
    return sum(world.call("GET", "/balance", token=token)[0] == 200 for _ in range(requests))


def test_workers_serve_restart_and_never_outlive_their_supervisor(world: StoreWorld) -> None:
    supervisor = world.processes["store"].pid
    wait_for("two workers", lambda: len(workers_of(supervisor)) == 2, 30, world)
    assert answers(world) == 40

    # A worker killed outright is replaced; the port keeps answering meanwhile.
    first = workers_of(supervisor)
    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    wait_for("a replacement worker",
             lambda: len(workers_of(supervisor)) == 2 and victim not in workers_of(supervisor),
             30, world)  # fmt: skip
    time.sleep(1.0)  # the replacement binds its socket once its app has started
    assert answers(world) == 40

    # A second store on the same port is refused with a message, not silently let in.
    second = subprocess.run(
        [sys.executable, "-m", "creditledger.cli", "store", "serve", "--port",
         str(world.store_port), "--workers", "2"],
        env=world.env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert second.returncode != 0
    assert "is another store running?" in second.stdout + second.stderr, second
    assert answers(world, 10) == 10

    # The supervisor killed outright: its workers notice and stop by themselves.
    workers = workers_of(supervisor)
    os.kill(supervisor, signal.SIGKILL)
    world.processes["store"].wait(10)
    wait_for("orphaned workers to stop", lambda: not any(alive(p) for p in workers), 30, world)


def test_the_supervisor_gives_up_on_workers_that_cannot_start(
    stack_settings: Settings, scratch: ScratchTopics, unique: str
) -> None:
    with store_world(stack_settings, scratch, unique, start=False) as world:
        # A price-rules file that does not parse: every worker fails in its start-up.
        broken = world.logdir / "broken-rules.yaml"
        broken.write_text("price_rules: 5\n")
        env = {**world.env(), "CREDITLEDGER_PROXY__PRICE_RULES_FILE": str(broken)}
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "creditledger.cli", "store", "serve", "--port",
             str(free_port()), "--workers", "2"],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode != 0
        assert "keep exiting right after they start" in result.stdout + result.stderr, result
        assert time.monotonic() - started < 60
