"""Consumption periods as UTC windows of whole hours or days (pure).

A period always ends with the current hour (included) and starts on a bucket
boundary, so every figure is a sum of whole ``consumption_hourly`` rows and can
be computed by hand:

- ``24h``: the current hour and the 23 before it, by hour (24 buckets);
- ``7d`` / ``30d``: today (UTC) and the 6 / 29 days before it, by day;
- ``all``: everything up to the end of the current hour, by day.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from kernel.errors import QueryError

Period = Literal["24h", "7d", "30d", "all"]
PERIODS: tuple[Period, ...] = ("24h", "7d", "30d", "all")
Bucket = Literal["hour", "day"]

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)


@dataclass(frozen=True)
class Window:
    period: Period
    start: datetime | None  # inclusive; None = since the first entry
    end: datetime  # exclusive
    bucket: Bucket

    @property
    def step(self) -> timedelta:
        return HOUR if self.bucket == "hour" else DAY

    def buckets(self) -> list[datetime]:
        """Every bucket start of a bounded window (for zero-filled series)."""
        if self.start is None:
            return []
        starts, at = [], self.start
        while at < self.end:
            starts.append(at)
            at += self.step
        return starts


def floor_hour(at: datetime) -> datetime:
    return at.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def floor_day(at: datetime) -> datetime:
    return floor_hour(at).replace(hour=0)


def window(period: str, now: datetime) -> Window:
    if period not in PERIODS:
        raise QueryError(f"period must be one of {', '.join(PERIODS)}; got {period!r}")
    if now.tzinfo is None:
        raise QueryError("now must be timezone-aware")
    end = floor_hour(now) + HOUR
    if period == "24h":
        return Window("24h", end - 24 * HOUR, end, "hour")
    if period == "7d":
        return Window("7d", floor_day(now) - 6 * DAY, end, "day")
    if period == "30d":
        return Window("30d", floor_day(now) - 29 * DAY, end, "day")
    return Window("all", None, end, "day")
