"""The README's first command ends with the demo; it must keep working (docs that run)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kernel.settings import Settings


@pytest.mark.timeout(600)
def test_the_demo_passes(stack_settings: Settings) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "creditledger.cli", "demo"],
        capture_output=True, text=True, timeout=540, check=False,
        env={**os.environ, "CREDITLEDGER_DEMO_KEEP_STORE": "0"},  # leave no process behind
    )  # fmt: skip
    # What went wrong first (lines that say so), then the tail: CI logs are truncated.
    words = ("FAILED", "MISMATCH", "failed:", "did not")
    said = [line for line in result.stdout.splitlines() if any(w in line for w in words)]
    assert result.returncode == 0, (
        "\n".join(said[:20]) + f"\n...\n{result.stdout[-3000:]}\n{result.stderr[-2000:]}"
    )
    assert "decoded == sent" in result.stdout
    assert "(as expected)" in result.stdout
    assert "the purchase arrived once" in result.stdout
    assert "store page: http://" in result.stdout
    assert "the import earned one reward" in result.stdout
    assert "plaza page: http://" in result.stdout
    assert "demo passed" in result.stdout
