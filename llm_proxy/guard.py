"""CreditBalanceGuard: may this user start another call, and what does it keep held?

Available credit = the Redis balance snapshot (written by the Redis
projector) minus the user's holds. A call is let through while that is
positive, and a hold of its estimated cost is taken in the same Lua script,
so concurrent calls see each other's holds: together they can overspend by at
most one call's cost (the last one let through).

A hold lives in ``<prefix>:holds:<user>`` under the call's ``event_id``. At
settlement it becomes the call's actual charge and stays held until the Redis
projector applies that charge's ledger entry, which deletes the field in the
same script that raises the snapshot's seq. Settling only ever rewrites a
hold that still exists, so it may run concurrently with the charge's write:
if the projector folded the charge first, the hold is gone and stays gone.
So a charge is never counted twice and never missing between "settled" and
"folded". Every hold expires after ``proxy.hold_ttl_s``, which bounds what a
crashed proxy leaves blocked.

If Redis is down, the balance comes from Postgres (``accounts``), minus the
holds of this process only. If both are down, ``proxy.guard_failure_policy``
decides (fail closed by default); each such decision is logged and counted.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

import psycopg
import redis.asyncio as aioredis
from psycopg_pool import AsyncConnectionPool
from redis.exceptions import RedisError

from creditledger.errors import ProxyError
from creditledger.settings import Settings
from projections.redis_keys import RELEASE_HOLD_LUA, balance_key, holds_key

log = logging.getLogger(__name__)

Source = Literal["redis", "postgres", "policy", "skipped"]

# Signed decimal strings compared exactly (Lua numbers are doubles).
COMPARE_LUA = """
local function greater(a, b)
  local na, nb = string.sub(a, 1, 1) == '-', string.sub(b, 1, 1) == '-'
  if na ~= nb then return nb end
  local x, y = a, b
  if na then x, y = string.sub(b, 2), string.sub(a, 2) end
  if #x ~= #y then return #x > #y end
  return x > y
end
"""

# KEYS[1] = balance snapshot, KEYS[2] = holds. ARGV: event_id, amount, now_ms, expires_ms,
# balance ('' = read the snapshot). Returns {status, balance, held}: status 1 = held,
# 0 = refused (nothing held), -1 = no snapshot (ask Postgres, then call again with it).
# O(1) when the call is let through: expired holds can only make ``held`` larger, so they
# are swept (one pass over the user's holds) only when they would refuse the call.
HOLD_LUA = (
    RELEASE_HOLD_LUA
    + COMPARE_LUA
    + """
local balance = ARGV[5]
if balance == '' then
  balance = redis.call('HGET', KEYS[1], 'balance_micro')
  if not balance then return {-1, '', ''} end
end
release_hold(KEYS[2], ARGV[1])  -- a retried event_id replaces its earlier hold
local held = redis.call('HGET', KEYS[2], '#total') or '0'
if not greater(balance, held) then
  local all = redis.call('HGETALL', KEYS[2])
  local now = tonumber(ARGV[3])
  for i = 1, #all, 2 do
    local field = all[i]
    if field ~= '#total' then
      local v = all[i + 1]
      if tonumber(string.sub(v, string.find(v, '|', 1, true) + 1)) <= now then
        release_hold(KEYS[2], field)
      end
    end
  end
  held = redis.call('HGET', KEYS[2], '#total') or '0'
  if not greater(balance, held) then return {0, balance, held} end
end
if ARGV[2] ~= '0' then redis.call('HINCRBY', KEYS[2], '#total', ARGV[2]) end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2] .. '|' .. ARGV[4])
redis.call('PEXPIREAT', KEYS[2], ARGV[4], 'GT')
if redis.call('PTTL', KEYS[2]) < 0 then redis.call('PEXPIREAT', KEYS[2], ARGV[4]) end
return {1, balance, held}
"""
)

# KEYS[1] = holds. ARGV: event_id, amount, expires_ms. The hold becomes the actual charge,
# but only while it exists: a missing hold was folded already (the projector deleted it),
# expired, or never taken in Redis, and re-creating it would count the charge twice.
SETTLE_LUA = (
    RELEASE_HOLD_LUA
    + """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
release_hold(KEYS[1], ARGV[1])
if ARGV[2] ~= '0' then redis.call('HINCRBY', KEYS[1], '#total', ARGV[2]) end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. '|' .. ARGV[3])
redis.call('PEXPIREAT', KEYS[1], ARGV[3], 'GT')
if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIREAT', KEYS[1], ARGV[3]) end
return 1
"""
)

RELEASE_LUA = (
    RELEASE_HOLD_LUA
    + """
release_hold(KEYS[1], ARGV[1])
return 1
"""
)


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    source: Source
    balance_micro: int | None = None
    held_micro: int | None = None

    @property
    def available_micro(self) -> int | None:
        if self.balance_micro is None:
            return None
        return self.balance_micro - (self.held_micro or 0)


def _int(value: Any) -> int:
    return int(value.decode() if isinstance(value, bytes) else value)


class CreditBalanceGuard:
    def __init__(self, settings: Settings, redis_client: aioredis.Redis,
                 pool: AsyncConnectionPool[Any], *, prefix: str | None = None) -> None:  # fmt: skip
        self.settings = settings
        self.prefix = prefix or settings.projections.redis_key_prefix
        self.redis = redis_client
        self.pool = pool
        self.ttl_ms = settings.proxy.hold_ttl_s * 1000
        self._hold = redis_client.register_script(HOLD_LUA)
        self._settle = redis_client.register_script(SETTLE_LUA)
        self._release = redis_client.register_script(RELEASE_LUA)
        # Holds of this process, used only while Redis is down: event_id -> (user, amount).
        self._local: dict[str, tuple[str, int]] = {}
        self.policy_decisions = 0

    async def hold(self, user_id: str, event_id: str, amount_micro: int) -> Decision:
        """Decide, and when allowed hold ``amount_micro``; raises 402 or 503 when refused."""
        decision = await self._decide(user_id, event_id, amount_micro)
        if not decision.allowed:
            if decision.source == "policy":
                raise ProxyError(503, "credit_check_unavailable",
                                 "the balance cannot be checked right now (Redis and "
                                 "Postgres unreachable); try again shortly",
                                 kind="server_error")  # fmt: skip
            raise ProxyError(402, "insufficient_credits",
                             f"insufficient credits: {decision.available_micro} micro-credits "
                             "available", kind="insufficient_quota")  # fmt: skip
        return decision

    async def _decide(self, user_id: str, event_id: str, amount: int) -> Decision:
        now = int(time.time() * 1000)
        keys = [balance_key(self.prefix, user_id), holds_key(self.prefix, user_id)]
        args: list[Any] = [event_id, amount, now, now + self.ttl_ms, ""]
        try:
            status, balance, held = await self._hold(keys=keys, args=args)
            if status == -1:
                pg_balance = await self._postgres_balance(user_id)
                if pg_balance is None:
                    return self._policy(user_id, "no Redis snapshot and Postgres unreachable")
                args[4] = pg_balance
                status, balance, held = await self._hold(keys=keys, args=args)
            return Decision(status == 1, "redis", _int(balance), _int(held))
        except RedisError as exc:
            log.warning("guard: Redis unavailable (%s); using the Postgres accounts", exc)
        pg_balance = await self._postgres_balance(user_id)
        if pg_balance is None:
            return self._policy(user_id, "Redis and Postgres unreachable")
        held_here = sum(a for u, a in self._local.values() if u == user_id)
        allowed = pg_balance - held_here > 0
        if allowed:
            self._local[event_id] = (user_id, amount)
        return Decision(allowed, "postgres", pg_balance, held_here)

    def _policy(self, user_id: str, why: str) -> Decision:
        self.policy_decisions += 1
        allowed = self.settings.proxy.guard_failure_policy == "fail_open"
        log.error("guard: %s; policy %s %s the call of user %s", why,
                  self.settings.proxy.guard_failure_policy, "allows" if allowed else "refuses",
                  user_id)  # fmt: skip
        return Decision(allowed, "policy")

    async def _postgres_balance(self, user_id: str) -> int | None:
        """The user's balance in the accounts projection (0 when it has none); None if down."""
        try:
            async with self.pool.connection(timeout=2.0) as conn:
                cursor = await conn.execute(
                    "SELECT balance_micro FROM accounts WHERE user_id = %s", (user_id,)
                )
                row = await cursor.fetchone()
        except (psycopg.Error, TimeoutError, OSError) as exc:
            log.warning("guard: Postgres unavailable (%s)", exc)
            return None
        return int(row[0]) if row else 0

    async def settle(self, user_id: str, event_id: str, amount_micro: int) -> None:
        """Turn the call's hold into its actual charge, held until the projector folds it.

        A no-op when the hold is gone (folded already, expired, or taken in Postgres while
        Redis was down): re-creating it would count a folded charge twice."""
        self._local.pop(event_id, None)
        expires = int(time.time() * 1000) + self.ttl_ms
        try:
            await self._settle(keys=[holds_key(self.prefix, user_id)],
                               args=[event_id, amount_micro, expires])  # fmt: skip
        except RedisError as exc:
            # The charge itself is safe in the outbox; only the guard's view lags until the
            # snapshot catches up.
            log.warning("guard: could not settle the hold of %s (%s)", event_id, exc)

    async def release_if_folded(self, user_id: str, event_id: str) -> None:
        """Release the hold of a retried event_id once its first charge is in the ledger."""
        try:
            async with self.pool.connection(timeout=2.0) as conn:
                cursor = await conn.execute(
                    "SELECT 1 FROM ledger_entries WHERE event_id = %s", (event_id,)
                )
                folded = await cursor.fetchone() is not None
        except (psycopg.Error, TimeoutError, OSError):
            folded = False  # keep the hold: it expires by itself
        if folded:
            await self.release(user_id, event_id)

    async def release(self, user_id: str, event_id: str) -> None:
        """Drop the call's hold: it failed upstream, or its charge already existed."""
        self._local.pop(event_id, None)
        try:
            await self._release(keys=[holds_key(self.prefix, user_id)], args=[event_id])
        except RedisError as exc:
            log.warning("guard: could not release the hold of %s (%s); it expires by "
                        "itself", event_id, exc)  # fmt: skip
