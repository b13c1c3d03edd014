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
