"""The snapshot writer reads a table file once, not at every snapshot, and never trusts a
remembered sha256 for a file that may have changed."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from agents import snapshots
from agents.snapshots import FileHashes


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    seen: list[str] = []
    real = snapshots.file_sha256

    def counting(path: Path) -> str:
        seen.append(path.name)
        return real(path)

    monkeypatch.setattr(snapshots, "file_sha256", counting)
    return seen


def test_a_table_file_hard_linked_into_the_next_checkpoint_is_read_once(
    tmp_path: Path, reads: list[str]
) -> None:
    live = tmp_path / "live" / "000012.sst"
    live.parent.mkdir()
    live.write_bytes(b"table" * 1000)
    hashes = FileHashes()
    for n in range(3):  # three checkpoints, each a hard link of the same file
        checkpoint = tmp_path / f"cp{n}"
        checkpoint.mkdir()
        os.link(live, checkpoint / live.name)
        info = hashes.of(checkpoint / live.name)
        assert info.sha256 == hashlib.sha256(b"table" * 1000).hexdigest()
        assert info.size_bytes == 5000
    assert reads == ["000012.sst"]


def test_another_file_under_the_same_name_is_read_again(tmp_path: Path, reads: list[str]) -> None:
    hashes = FileHashes()
    first = tmp_path / "a" / "000007.sst"
    first.parent.mkdir()
    first.write_bytes(b"one")
    second = tmp_path / "b" / "000007.sst"  # a state folder restored since: another file
    second.parent.mkdir()
    second.write_bytes(b"two")
    assert hashes.of(first).sha256 != hashes.of(second).sha256
    assert reads == ["000007.sst", "000007.sst"]


def test_files_rocksdb_changes_in_place_are_always_read(tmp_path: Path, reads: list[str]) -> None:
    hashes = FileHashes()
    manifest = tmp_path / "MANIFEST-000005"
    manifest.write_bytes(b"v1")
    before = hashes.of(manifest).sha256
    manifest.write_bytes(b"v2")
    assert hashes.of(manifest).sha256 != before
    assert reads == ["MANIFEST-000005", "MANIFEST-000005"]
