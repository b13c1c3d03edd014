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
from typing import Any

import psycopg
import redis.asyncio as aioredis
from psycopg_pool import AsyncConnectionPool
from redis.exceptions import RedisError

from contracts.redis_keys import RELEASE_HOLD_LUA, balance_key, event_key, holds_key
from kernel.errors import ProxyError
from kernel.settings import Settings
from llm_proxy.ports import Decision

log = logging.getLogger(__name__)


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

# Statuses of HOLD_LUA besides 1 (held) and 0 (refused).
NO_SNAPSHOT, REUSED, WINDOW_PASSED, RETRIES_USED = -1, -2, -3, -4

# KEYS[1] = balance snapshot, KEYS[2] = holds, KEYS[3] = the event id's record. ARGV:
# event_id, amount, now_ms, expires_ms, balance ('' = read the snapshot), fingerprint,
# retry_window_ms, serves_max, record_ttl_ms. Returns {status, balance, held, field}:
# status 1 = held under ``field``, 0 = refused (nothing held), NO_SNAPSHOT (ask Postgres,
# then call again with it), REUSED / WINDOW_PASSED / RETRIES_USED (the event id was served
# before: another fingerprint, too long ago, or too often; nothing held).
#
# The first attempt of an event id holds under the event id itself, the field the Redis
# projector deletes when it folds the charge. A retry whose event id is still held (an
# attempt in flight, or a charge not folded yet) or already folded holds under an attempt
# field of its own, which only its own settlement removes: so no retry replaces the
# charge's hold, and none can outlive its call.
# O(1) when the call is let through: expired holds can only make ``held`` larger, so they
# are swept (one pass over the user's holds) only when they would refuse the call.
HOLD_LUA = (
    RELEASE_HOLD_LUA
    + COMPARE_LUA
    + """
local field = ARGV[1]
local serves = 0
local remember = ARGV[6] ~= ''  -- '' = an id the proxy made up: it cannot come again
local record = {false}
if remember then record = redis.call('HMGET', KEYS[3], 'fp', 'first', 'serves', 'folded') end
if record[1] then
  if record[1] ~= ARGV[6] then return {-2, '', '', ''} end
  if tonumber(ARGV[3]) - tonumber(record[2]) > tonumber(ARGV[7]) then return {-3, '', '', ''} end
  serves = tonumber(record[3])
  if serves >= tonumber(ARGV[8]) then return {-4, '', '', ''} end
  if record[4] or redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then
    field = ARGV[1] .. '#' .. (serves + 1)
  end
end
local balance = ARGV[5]
if balance == '' then
  balance = redis.call('HGET', KEYS[1], 'balance_micro')
  if not balance then return {-1, '', '', ''} end
end
local held = redis.call('HGET', KEYS[2], '#total') or '0'
if not greater(balance, held) then
  local all = redis.call('HGETALL', KEYS[2])
  local now = tonumber(ARGV[3])
  for i = 1, #all, 2 do
    local name = all[i]
    if name ~= '#total' then
      local v = all[i + 1]
      if tonumber(string.sub(v, string.find(v, '|', 1, true) + 1)) <= now then
        release_hold(KEYS[2], name)
      end
    end
  end
  held = redis.call('HGET', KEYS[2], '#total') or '0'
  if not greater(balance, held) then return {0, balance, held, ''} end
end
if remember then
  if serves == 0 then
    redis.call('HSET', KEYS[3], 'fp', ARGV[6], 'first', ARGV[3], 'serves', 1)
  else
    redis.call('HINCRBY', KEYS[3], 'serves', 1)
  end
  redis.call('PEXPIRE', KEYS[3], ARGV[9])
end
release_hold(KEYS[2], field)
if ARGV[2] ~= '0' then redis.call('HINCRBY', KEYS[2], '#total', ARGV[2]) end
redis.call('HSET', KEYS[2], field, ARGV[2] .. '|' .. ARGV[4])
redis.call('PEXPIREAT', KEYS[2], ARGV[4], 'GT')
if redis.call('PTTL', KEYS[2]) < 0 then redis.call('PEXPIREAT', KEYS[2], ARGV[4]) end
return {1, balance, held, field}
"""
)

# KEYS[1] = holds, KEYS[2] = the event id's record. ARGV: event_id, the attempt's field,
# amount, expires_ms, recorded ('1': this attempt wrote the charge; '0': a duplicate).
# A duplicate's own attempt hold goes; the charge's hold (field = event_id) stays until the
# projector folds it. A charge this attempt wrote is held under the event id, but only
# while the attempt's hold exists and the projector has not folded it: re-creating a hold
# the projector deleted would count the charge twice.
SETTLE_LUA = (
    RELEASE_HOLD_LUA
    + """
local event_id, field = ARGV[1], ARGV[2]
if ARGV[5] == '0' then
  if field ~= event_id then release_hold(KEYS[1], field) end
  return 1
end
if redis.call('HEXISTS', KEYS[1], field) == 0 then return 0 end
release_hold(KEYS[1], field)
if redis.call('HGET', KEYS[2], 'folded') then return 0 end
release_hold(KEYS[1], event_id)
if ARGV[3] ~= '0' then redis.call('HINCRBY', KEYS[1], '#total', ARGV[3]) end
redis.call('HSET', KEYS[1], event_id, ARGV[3] .. '|' .. ARGV[4])
redis.call('PEXPIREAT', KEYS[1], ARGV[4], 'GT')
if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIREAT', KEYS[1], ARGV[4]) end
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


def _int(value: Any) -> int:
    return int(value.decode() if isinstance(value, bytes) else value)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


REUSE_MESSAGES = {
    REUSED: "was used before for a different call (another user, model, scene or body)",
    WINDOW_PASSED: "was used before, longer ago than the retry window",
    RETRIES_USED: "was retried as often as a retry may be",
}


class CreditBalanceGuard:
    def __init__(self, settings: Settings, redis_client: aioredis.Redis,
                 pool: AsyncConnectionPool[Any], *, prefix: str | None = None) -> None:  # fmt: skip
        self.settings = settings
        self.prefix = prefix or settings.projections.redis_key_prefix
        self.redis = redis_client
        self.pool = pool
        proxy = settings.proxy
        self.ttl_ms = proxy.hold_ttl_s * 1000
        self._reuse_args = [int(proxy.retry_window_s * 1000), proxy.retry_serves_max,
                            int(proxy.event_id_memory_s * 1000)]  # fmt: skip
        self._hold = redis_client.register_script(HOLD_LUA)
        self._settle = redis_client.register_script(SETTLE_LUA)
        self._release = redis_client.register_script(RELEASE_LUA)
        # Holds of this process, used only while Redis is down: event_id -> (user, amount).
        self._local: dict[str, tuple[str, int]] = {}
        self.policy_decisions = 0

    async def hold(self, user_id: str, event_id: str, amount_micro: int,
                   fingerprint: str | None) -> Decision:  # fmt: skip
        """Decide, and when allowed hold ``amount_micro``; raises 402, 409 or 503 if refused.

        ``fingerprint`` identifies the call (user, model, scene, body): the same event id is
        served again only for the same fingerprint, inside ``proxy.retry_window_s`` and at
        most ``proxy.retry_serves_max`` times in all; anything else is 409 event_id_reused
        before the call goes upstream. None: an id the proxy made up, not remembered (no
        caller can send it again)."""
        decision = await self._decide(user_id, event_id, amount_micro, fingerprint or "")
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

    async def _decide(self, user_id: str, event_id: str, amount: int,
                      fingerprint: str) -> Decision:  # fmt: skip
        now = int(time.time() * 1000)
        keys = [balance_key(self.prefix, user_id), holds_key(self.prefix, user_id),
                event_key(self.prefix, event_id)]  # fmt: skip
        args: list[Any] = [event_id, amount, now, now + self.ttl_ms, "", fingerprint,
                           *self._reuse_args]  # fmt: skip
        try:
            status, balance, held, field = await self._hold(keys=keys, args=args)
            if status == NO_SNAPSHOT:
                pg_balance = await self._postgres_balance(user_id)
                if pg_balance is None:
                    return self._policy(user_id, "no Redis snapshot and Postgres unreachable")
                args[4] = pg_balance
                status, balance, held, field = await self._hold(keys=keys, args=args)
            if status in REUSE_MESSAGES:
                raise ProxyError(409, "event_id_reused", "X-Billing-Event-Id "
                                 f"{REUSE_MESSAGES[status]}: send a new id for a new call",
                                 param="X-Billing-Event-Id")  # fmt: skip
            return Decision(status == 1, "redis", _int(balance), _int(held),
                            _text(field) if status == 1 else None)  # fmt: skip
        except RedisError as exc:
            # Without Redis the fingerprint cannot be checked before the call; the outbox
            # still refuses a reused id with other content when the charge is written.
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

    async def settle(self, user_id: str, event_id: str, field: str | None, amount_micro: int,
                     *, recorded: bool) -> None:  # fmt: skip
        """End the call's hold: its charge (``recorded``) stays held until the projector folds
        it; a duplicate's own hold goes (the first charge is held or folded already).

        A no-op for a charge whose hold is gone (folded already, expired, or taken in
        Postgres while Redis was down): re-creating it would count a folded charge twice."""
        self._local.pop(event_id, None)
        if field is None:
            return
        expires = int(time.time() * 1000) + self.ttl_ms
        keys = [holds_key(self.prefix, user_id), event_key(self.prefix, event_id)]
        try:
            await self._settle(keys=keys, args=[event_id, field, amount_micro, expires,
                                                "1" if recorded else "0"])  # fmt: skip
        except RedisError as exc:
            # The charge itself is safe in the outbox; only the guard's view lags until the
            # snapshot catches up.
            log.warning("guard: could not settle the hold of %s (%s)", event_id, exc)

    async def release_if_folded(self, user_id: str, event_id: str) -> None:
        """Release the hold under ``event_id`` once its charge is in the ledger (Postgres).

        Only for a duplicate that held under the event id itself: its first attempt left
        no hold in Redis (served while Redis was down, or forgotten), so no projector will
        delete this one."""
        try:
            async with self.pool.connection(timeout=2.0) as conn:
                cursor = await conn.execute(
                    "SELECT 1 FROM ledger_entries WHERE event_id = %s", (event_id,)
                )
                folded = await cursor.fetchone() is not None
        except (psycopg.Error, TimeoutError, OSError):
            folded = False  # keep the hold: it expires by itself
        if folded:
            await self.release(user_id, event_id, event_id)

    async def release(self, user_id: str, event_id: str, field: str | None) -> None:
        """Drop the call's hold (by its field): the call failed, or its charge existed."""
        self._local.pop(event_id, None)
        if field is None:
            return
        try:
            await self._release(keys=[holds_key(self.prefix, user_id)], args=[field])
        except RedisError as exc:
            log.warning("guard: could not release the hold %s (%s); it expires by "
                        "itself", field, exc)  # fmt: skip
