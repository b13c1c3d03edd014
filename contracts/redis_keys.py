"""Redis key names of the projections; the proxy's guard reads them (see ARCHITECTURE.md).

- ``<prefix>:balance:<user_id>``: a hash with ``balance_micro``, ``seq`` and
  ``updated_at_ms`` (the entry's recorded_at, epoch milliseconds), all
  decimal integers. Only ever replaced by a snapshot of a higher ``seq``.
- ``<prefix>:progress:<topic>``: a hash, field = partition number, value =
  the next ledger offset the Redis projection will apply.
"""

from __future__ import annotations


def balance_key(prefix: str, user_id: str) -> str:
    return f"{prefix}:balance:{user_id}"


def balance_pattern(prefix: str) -> str:
    return f"{prefix}:balance:*"


def progress_key(prefix: str, topic: str) -> str:
    return f"{prefix}:progress:{topic}"


def holds_key(prefix: str, user_id: str) -> str:
    """``<prefix>:holds:<user_id>``: the proxy guard's in-flight holds and settled charges
    not yet folded (field = event_id, value = ``amount|expires_ms``; field ``#total`` = their
    sum). The Redis projector deletes a charge's field when it applies the charge's entry."""
    return f"{prefix}:holds:{user_id}"


def attempt_field(event_id: str, attempt: int) -> str:
    """The holds field of a retry's hold: ``<event_id>#<attempt>``, never the field the
    projector deletes, so a retry's hold cannot outlive the call (see the guard)."""
    return f"{event_id}#{attempt}"


def event_key(prefix: str, event_id: str) -> str:
    """``<prefix>:event:<event_id>``: what the proxy remembers of a ledger event id it served
    (``fp`` = the call's fingerprint, ``first`` = when first served, ms, ``serves`` = how
    often, ``folded`` = 1 once the Redis projector applied its charge). It expires after
    ``proxy.event_id_memory_s``."""
    return f"{prefix}:event:{event_id}"


# Lua, shared by the guard's scripts and the Redis projector: drop one hold and take its
# amount off ``#total``. Amounts stay decimal strings handled by HINCRBY (exact int64):
# Lua's own numbers are doubles, and no balance is ever computed in one.
RELEASE_HOLD_LUA = """
local function release_hold(key, field)
  local v = redis.call('HGET', key, field)
  if v then
    local amount = string.sub(v, 1, string.find(v, '|', 1, true) - 1)
    if amount ~= '0' then redis.call('HINCRBY', key, '#total', '-' .. amount) end
    redis.call('HDEL', key, field)
  end
end
"""

# Lua, used by the Redis projector when it folds a charge: if the proxy remembers the
# event id, note that its charge is in the snapshot now (the guard's settle and its
# retries' holds read it). ``prefix`` is the key prefix.
MARK_FOLDED_LUA = """
local function mark_folded(prefix, event_id)
  local record = prefix .. ':event:' .. event_id
  if redis.call('EXISTS', record) == 1 then redis.call('HSET', record, 'folded', '1') end
end
"""
