"""Schemathesis against the credit store's own OpenAPI document: no input gives a 5xx."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from contracts.tokens import Role
from kernel.settings import Settings
from testbed.store import StoreWorld, store_world
from testbed.topics import ScratchTopics


@pytest.fixture
def world(stack_settings: Settings, scratch: ScratchTopics, unique: str) -> Iterator[StoreWorld]:
    with store_world(stack_settings, scratch, unique) as world:
        yield world


@pytest.mark.parametrize("role", ["admin", "user"])
def test_schemathesis_finds_no_server_error(world: StoreWorld, role: Role) -> None:
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    assert st, "schemathesis is missing: run ./dev setup (it is a dev dependency)"
    result = subprocess.run(
        [st, "run", f"{world.store_url}/openapi.json", "--checks", "not_a_server_error",
         "-H", f"Authorization: Bearer {world.token('fuzz-user', role)}",
         "--max-examples", "25", "--seed", "20261125", "--request-timeout", "10",
         "--no-color"],
        capture_output=True, text=True, timeout=600, cwd=world.logdir,
    )  # fmt: skip
    report = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, f"schemathesis found a failure:\n{report}\n" \
        f"store log:\n{world.log_tail('store', 60)}"  # fmt: skip
    assert " passed" in result.stdout, report
