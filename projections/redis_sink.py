"""The Redis projection: one balance snapshot per user, replaced only by a newer seq.

A batch is one Lua script, so it is atomic: the snapshots of the batch's
users (only the newest entry per user is sent) and the new progress are
written together or not at all. The script first checks that the progress
is still what the projector read before planning the batch (optimistic
concurrency): if another projector moved it, or Redis restarted empty
meanwhile, nothing is written and the projector plans again. Snapshots never
go backwards because the script compares ``seq`` before writing.

Redis runs without persistence here; if it restarts empty, the stored
progress is gone too. The sink then refills the snapshots and the progress
from the Postgres read model (:mod:`projections.redis_refill`) and the
projector reads the ledger only from there on; without a Postgres progress
(or with ``projections.redis_refill`` off) it seeks back to the beginning of
the log and rebuilds every snapshot by itself.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis

from contracts.redis_keys import (
    MARK_FOLDED_LUA,
    RELEASE_HOLD_LUA,
    balance_key,
    holds_key,
    progress_key,
)
from kernel.errors import ProjectionError
from kernel.redis import connect_redis
from kernel.settings import Settings
from projections.entries import (
    BALANCE,
    EVENT,
    KIND,
    OFFSET_COLUMN,
    PARTITION,
    RECORDED_MS,
    SEQ,
    USER,
    Row,
    split_storable,
)
from projections.progress import BatchPlan, plan_batch
from projections.redis_refill import refill_from_postgres

log = logging.getLogger(__name__)

RETRIES = 20

# KEYS[1] = progress hash, KEYS[2..m+1] = balance hashes, KEYS[m+2..2m+1] = the same users'
# holds hashes. ARGV[1] = number of partitions n, then n x (field, expected stored or "", new
# next offset), then per user (seq, balance_micro, updated_at_ms, k, k charge event ids): the
# guard's holds for charges now folded into the snapshot are dropped with it, atomically,
# and the proxy's record of each such event id is marked folded. Last ARGV: the key prefix.
APPLY_LUA = (
    RELEASE_HOLD_LUA
    + MARK_FOLDED_LUA
    + """
local n = tonumber(ARGV[1])
local prefix = ARGV[#ARGV]
for k = 0, n - 1 do
  local stored = redis.call('HGET', KEYS[1], ARGV[2 + 3 * k])
  if (stored or '') ~= ARGV[3 + 3 * k] then return -1 end
end
local users = (#KEYS - 1) / 2
local j = 2 + 3 * n
local written = 0
for i = 2, users + 1 do
  local current = redis.call('HGET', KEYS[i], 'seq')
  if current == false or tonumber(current) < tonumber(ARGV[j]) then
    redis.call('HSET', KEYS[i], 'seq', ARGV[j], 'balance_micro', ARGV[j + 1],
               'updated_at_ms', ARGV[j + 2])
    written = written + 1
  end
  local charges = tonumber(ARGV[j + 3])
  for c = 1, charges do
    release_hold(KEYS[i + users], ARGV[j + 3 + c])
    mark_folded(prefix, ARGV[j + 3 + c])
  end
  j = j + 4 + charges
end
for k = 0, n - 1 do
  redis.call('HSET', KEYS[1], ARGV[2 + 3 * k], ARGV[4 + 3 * k])
end
return written
"""
)

# Used by replay's rebuild: like APPLY_LUA but also overwrites a snapshot of the
# same seq (a corrupted one), and never touches the progress.
# KEYS = balance hashes; ARGV = per key (seq, balance_micro, updated_at_ms).
REBUILD_LUA = """
local written = 0
for i = 1, #KEYS do
  local j = (i - 1) * 3 + 1
  local current = redis.call('HGET', KEYS[i], 'seq')
  if current == false or tonumber(current) <= tonumber(ARGV[j]) then
    redis.call('HSET', KEYS[i], 'seq', ARGV[j], 'balance_micro', ARGV[j + 1],
               'updated_at_ms', ARGV[j + 2])
    written = written + 1
  end
end
return written
"""


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


def newest_per_user(rows: list[Row]) -> dict[str, tuple[int, int, int]]:
    """user -> (seq, balance_micro, recorded_ms) of that user's newest entry in ``rows``."""
    newest: dict[str, tuple[int, int, int]] = {}
    for row in rows:
        user, seq = row[USER], row[SEQ]
        held = newest.get(user)
        if held is None or seq > held[0]:
            newest[user] = (seq, row[BALANCE], row[RECORDED_MS])
    return newest


def charges_per_user(rows: list[Row]) -> dict[str, list[str]]:
    """user -> event ids of the charge entries in ``rows`` (their holds end here)."""
    charges: dict[str, list[str]] = {}
    for row in rows:
        if row[KIND] == "charge":
            charges.setdefault(row[USER], []).append(row[EVENT])
    return charges


class RedisSink:
    name = "redis"

    def __init__(self, settings: Settings, *, prefix: str | None = None) -> None:
        self.settings = settings
        self.prefix = prefix or settings.projections.redis_key_prefix
        self._client: redis.Redis | None = None
        self._apply: Any = None
        self._rebuild: Any = None

    def start(self) -> None:
        self._client = connect_redis(self.settings)
        self._apply = self._client.register_script(APPLY_LUA)
        self._rebuild = self._client.register_script(REBUILD_LUA)

    def _refill(self, topic: str, missing: list[int]) -> dict[int, int]:
        """Progress for ``missing`` partitions (none in Redis) from Postgres, if allowed."""
        if not missing or not self.settings.projections.redis_refill:
            return {}
        return refill_from_postgres(self.settings, self.client, self._rebuild, self.prefix,
                                    topic, missing)  # fmt: skip

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    @property
    def client(self) -> redis.Redis:
        if self._client is None:
            raise ProjectionError("RedisSink used before start()")
        return self._client

    def stored(self, topic: str, partitions: list[int]) -> dict[int, int]:
        try:
            values = self.client.hmget(progress_key(self.prefix, topic),
                                       [str(p) for p in partitions])  # fmt: skip
            stored = {p: int(v) for p, v in zip(partitions, values, strict=True) if v is not None}
            stored.update(self._refill(topic, [p for p in partitions if p not in stored]))
        except redis.RedisError as exc:
            raise ProjectionError(f"reading the Redis progress failed: {exc}") from exc
        return stored

    def apply(self, topic: str, rows: dict[int, list[Row]], lows: dict[int, int],
              sought: dict[int, int]) -> BatchPlan:  # fmt: skip
        key = progress_key(self.prefix, topic)
        partitions = sorted(rows)
        fields = [str(p) for p in partitions]
        for _attempt in range(RETRIES):
            try:
                raw = self.client.hmget(key, fields)
                missing = [p for p, v in zip(partitions, raw, strict=True) if v is None]
                if self._refill(topic, missing):  # Redis restarted empty under us
                    raw = self.client.hmget(key, fields)
                stored = {p: int(v) if v is not None else lows.get(p, 0)
                          for p, v in zip(partitions, raw, strict=True)}  # fmt: skip
                plan = plan_batch(rows, stored, sought)
                if not plan.apply:
                    return plan
                # As the Postgres sink: an entry breaking a field rule is not applied (it is
                # quarantined there, and verify reports it); the progress moves past it.
                storable, bad = split_storable(plan.rows)
                for row, reason in bad:
                    log.error("redis projection: ledger entry %s[%d]@%d skipped: %s", topic,
                              row[PARTITION], row[OFFSET_COLUMN], reason)  # fmt: skip
                newest = newest_per_user(storable)
                charges = charges_per_user(storable)
                keys = [key] + [balance_key(self.prefix, user) for user in newest]
                keys += [holds_key(self.prefix, user) for user in newest]
                args: list[Any] = [len(plan.next_offsets)]
                for p, next_offset in plan.next_offsets.items():
                    value = raw[partitions.index(p)]
                    args += [str(p), _text(value), next_offset]
                for user, (seq, balance, recorded_ms) in newest.items():
                    events = charges.get(user, [])
                    args += [seq, balance, recorded_ms, len(events), *events]
                args.append(self.prefix)
                if self._apply(keys=keys, args=args) != -1:
                    return plan
            except redis.RedisError as exc:
                raise ProjectionError(f"Redis projection batch failed: {exc}") from exc
            time.sleep(0.01)  # someone else moved the progress: plan again
        raise ProjectionError(f"Redis progress kept moving under this projector ({RETRIES} tries)")
