"""The processed-event index forgets ids older than a horizon, in time order, and never an id
that was applied again since (the ``t`` key's value must still be the ``e`` key's)."""

from __future__ import annotations

from pathlib import Path

import rocksdict

from agents.state import EVENT_PREFIX, forget_before, pack_seen, time_key

DIGEST = "00" * 16


def _db(path: Path) -> rocksdict.Rdict:
    return rocksdict.Rdict(str(path), options=rocksdict.Options(raw_mode=True))


def _seen(db: rocksdict.Rdict, event_id: str, occurred_at_ms: int, seq: int) -> None:
    value = pack_seen("u1", seq, DIGEST)
    db.put(EVENT_PREFIX + event_id.encode(), value)
    db.put(time_key(occurred_at_ms, event_id), value)


def test_ids_before_the_horizon_go_oldest_first_in_bounded_rounds(tmp_path: Path) -> None:
    db = _db(tmp_path / "state")
    for n in range(10):
        _seen(db, f"ev{n}", 1_000 * (n + 1), n + 1)  # ev0 at 1000 ... ev9 at 10000
    db.put(b"au1", b"account")
    assert forget_before(db, 5_500, limit=3) == 3
    assert [db.get(EVENT_PREFIX + f"ev{n}".encode()) is None for n in range(6)] == [
        True, True, True, False, False, False,
    ]  # fmt: skip
    assert forget_before(db, 5_500, limit=100) == 2
    assert forget_before(db, 5_500, limit=100) == 0
    keys = [bytes(key) for key, _value in db.items(from_key=EVENT_PREFIX)]  # type: ignore[arg-type]
    left = sorted(key for key in keys if key[:1] == EVENT_PREFIX)
    assert left == [EVENT_PREFIX + f"ev{n}".encode() for n in range(5, 10)]
    assert db.get(b"au1") == b"account", "accounts are never forgotten"
    db.close()


def test_an_id_applied_again_after_it_was_forgotten_is_kept(tmp_path: Path) -> None:
    db = _db(tmp_path / "state")
    # A full re-fold of the ledger writes both applications: the old time key, then the new.
    _seen(db, "reused", 1_000, 1)
    _seen(db, "reused", 90_000, 7)
    assert forget_before(db, 50_000, limit=100) == 1
    assert db.get(EVENT_PREFIX + b"reused") == pack_seen("u1", 7, DIGEST)
    assert db.get(time_key(90_000, "reused")) is not None
    db.close()
