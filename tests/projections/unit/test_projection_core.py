"""The pure parts of the projections: batch planning, periods, cursors, the verify model."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from kernel.errors import ProjectionError, QueryError
from projections.entries import RAW_COLUMNS
from projections.migrate import load_migrations
from projections.model import ReadModelFold
from projections.periods import window
from projections.progress import OFFSET, plan_batch
from projections.queries import check_limit, make_cursor, parse_cursor
from projections.redis_sink import newest_per_user
from projections.replay import split_partitions


def row(offset: int, user: str = "u", seq: int = 1, kind: str = "charge", amount: int = -5,
        balance: int = -5, occurred_ms: int = 0) -> tuple[object, ...]:  # fmt: skip
    values: list[object] = [None] * len(RAW_COLUMNS)
    values[0], values[1], values[4], values[5], values[6] = user, seq, kind, amount, balance
    values[8], values[11] = "chat", "small"
    values[13:17] = [10, 2, 1, 0]
    values[20], values[21], values[22], values[23] = occurred_ms, occurred_ms + 1, 0, offset
    return tuple(values)


def test_offset_index_points_at_ledger_offset() -> None:
    assert RAW_COLUMNS[OFFSET] == "ledger_offset"


def test_plan_drops_what_was_applied_and_keeps_the_rest() -> None:
    plan = plan_batch({0: [row(3), row(4), row(5)]}, stored={0: 4}, sought={})
    assert [r[OFFSET] for r in plan.apply[0]] == [4, 5]
    assert plan.next_offsets == {0: 6} and not plan.rewinds


def test_plan_rewinds_on_a_gap_and_accepts_it_after_seeking() -> None:
    rows = {0: [row(7), row(8)], 1: [row(2)]}
    plan = plan_batch(rows, stored={0: 5, 1: 2}, sought={})
    assert plan.rewinds == {0: 5} and list(plan.apply) == [1]
    # After seeking to 5, the log still starts at 7 (nothing readable between): accepted.
    plan = plan_batch({0: [row(7)]}, stored={0: 5}, sought={0: 5})
    assert plan.next_offsets == {0: 8} and not plan.rewinds


def test_plan_of_a_fully_redelivered_batch_is_empty() -> None:
    plan = plan_batch({0: [row(1), row(2)]}, stored={0: 10}, sought={})
    assert not plan.apply and not plan.rewinds and not plan.next_offsets


def test_newest_per_user_keeps_the_highest_seq() -> None:
    rows = [row(0, "a", 1, balance=10), row(1, "a", 3, balance=30), row(2, "a", 2, balance=20)]
    assert newest_per_user(rows) == {"a": (3, 30, 1)}


def test_periods_are_whole_utc_buckets_ending_with_the_current_hour() -> None:
    now = datetime(2026, 3, 10, 12, 30, tzinfo=UTC)
    day = window("24h", now)
    assert (day.start, day.end, day.bucket) == (
        datetime(2026, 3, 9, 13, tzinfo=UTC),
        datetime(2026, 3, 10, 13, tzinfo=UTC),
        "hour",
    )
    assert len(day.buckets()) == 24
    assert window("7d", now).start == datetime(2026, 3, 4, tzinfo=UTC)
    assert len(window("7d", now).buckets()) == 7
    assert window("30d", now).start == datetime(2026, 2, 9, tzinfo=UTC)
    assert window("all", now).start is None and window("all", now).buckets() == []
    # Another time zone names the same instant: the same window.
    tokyo = now.astimezone(timezone_of(9))
    assert window("7d", tokyo) == window("7d", now)
    with pytest.raises(QueryError, match="period must be one of"):
        window("1y", now)
    with pytest.raises(QueryError, match="timezone-aware"):
        window("7d", datetime(2026, 3, 10))


def timezone_of(hours: int) -> timezone:
    return timezone(timedelta(hours=hours))


def test_cursor_and_limit_are_checked() -> None:
    assert parse_cursor(make_cursor(42)) == 42
    assert parse_cursor(None) is None and parse_cursor("") is None
    for bad in ("42", "s", "s-1", "x42", "s" + "9" * 30):
        with pytest.raises(QueryError, match="cursor"):
            parse_cursor(bad)
    assert check_limit(1) == 1 and check_limit(200) == 200
    for bad_limit in (0, 201, True):
        with pytest.raises(QueryError, match="limit"):
            check_limit(bad_limit)


def test_model_fold_sums_charges_by_utc_hour() -> None:
    fold = ReadModelFold()
    hour = 3_600_000
    fold.add(row(0, "u", 1, "purchase", 100, 100, 5))
    fold.add(row(1, "u", 2, "charge", -7, 93, 10 * hour + 1))
    fold.add(row(2, "u", 3, "charge", -3, 90, 10 * hour + hour - 1))
    account = fold.accounts["u"]
    assert (account.balance_micro, account.seq, account.granted_micro,
            account.charged_micro) == (90, 3, 100, 10)  # fmt: skip
    assert fold.consumption == {("u", 10 * hour, "small", "chat"): [10, 20, 4, 2, 0, 2]}
    assert fold.entries["u"].count == 3


def test_migrations_are_numbered_without_gaps(tmp_path: object) -> None:
    migrations = load_migrations()
    assert [m.version for m in migrations] == list(range(1, len(migrations) + 1))
    from pathlib import Path

    folder = Path(str(tmp_path))
    (folder / "0001_a.sql").write_text("SELECT 1;")
    (folder / "0003_c.sql").write_text("SELECT 1;")
    with pytest.raises(ProjectionError, match="versions must"):
        load_migrations(folder)
    (folder / "2_bad name.sql").write_text("")
    with pytest.raises(ProjectionError, match="NNNN_lower_case"):
        load_migrations(folder)


def test_split_partitions_balances_remaining_entries() -> None:
    left = {0: 100, 1: 90, 2: 10, 3: 5, 4: 80, 5: 95}
    groups = split_partitions(left, 2)
    assert sorted(p for g in groups for p in g) == [0, 1, 2, 3, 4, 5]
    sizes = sorted(sum(left[p] for p in g) for g in groups)
    assert sizes == [190, 190]
    assert split_partitions({3: 7}, 4) == [[3]]
