"""Schemathesis against the plaza's own OpenAPI document: no input gives a 5xx."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel.settings import Settings
from testbed.plaza import PlazaWorld, plaza_world
from testbed.topics import ScratchTopics


@pytest.fixture
def world(stack_settings: Settings, scratch: ScratchTopics, unique: str) -> Iterator[PlazaWorld]:
    with plaza_world(stack_settings, scratch, unique) as world:
        yield world


def test_schemathesis_finds_no_server_error(world: PlazaWorld) -> None:
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    assert st, "schemathesis is missing: run ./dev setup (it is a dev dependency)"
    token = world.token("fuzz-user")
    # Something to find: plans and comments the generated ids may hit, and a plan whose
    # id the fuzzer cannot guess but whose routes still see odd bodies.
    plan = world.publish(token, "Fuzz target", tags=["fuzz"])
    world.plaza("POST", f"/plans/{plan['plan_id']}/comments", token=token, body={"body": "c"})
    result = subprocess.run(
        [st, "run", f"{world.plaza_url}/openapi.json", "--checks", "not_a_server_error",
         "-H", f"Authorization: Bearer {token}", "--max-examples", "40", "--seed", "20261202",
         "--request-timeout", "10", "--no-color"],
        capture_output=True, text=True, timeout=600, cwd=world.logdir,
    )  # fmt: skip
    report = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, f"schemathesis found a failure:\n{report}\n" \
        f"plaza log:\n{world.log_tail('plaza', 60)}"  # fmt: skip
    assert " passed" in result.stdout, report
