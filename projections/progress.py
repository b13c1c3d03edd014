"""Which part of a batch a sink may apply, given the progress it stored (pure).

A sink stores, with the rows it writes and in the same transaction or script,
the next offset it expects per partition. That stored progress, not the
consumer's position, is the truth: before applying, each partition's messages
are checked against it.

- Messages below the stored offset were applied already (a redelivery, or
  another projector got there first during a rebalance): dropped.
- A first message above the stored offset is a gap: the consumer is ahead of
  the sink (the sink was rebuilt by ``replay``, or Redis restarted empty). The
  projector seeks back to the stored offset and applies nothing of that
  partition now.
- After such a seek, a first message still above the stored offset means the
  log has nothing readable in between (e.g. transaction markers): accepted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from projections.entries import Row

OFFSET = 23  # index of ledger_offset in a row (see entries.RAW_COLUMNS)


@dataclass
class BatchPlan:
    apply: dict[int, list[Row]] = field(default_factory=dict)
    rewinds: dict[int, int] = field(default_factory=dict)
    next_offsets: dict[int, int] = field(default_factory=dict)

    @property
    def rows(self) -> list[Row]:
        return [row for rows in self.apply.values() for row in rows]


def plan_batch(rows: dict[int, list[Row]], stored: dict[int, int],
               sought: dict[int, int]) -> BatchPlan:  # fmt: skip
    """``stored``: the sink's next offset per partition; ``sought``: where the projector
    last sought each partition to (after a gap)."""
    plan = BatchPlan()
    for partition, partition_rows in rows.items():
        expected = stored[partition]
        fresh = [row for row in partition_rows if row[OFFSET] >= expected]
        if not fresh:
            continue
        if fresh[0][OFFSET] > expected and sought.get(partition) != expected:
            plan.rewinds[partition] = expected
            continue
        plan.apply[partition] = fresh
        plan.next_offsets[partition] = fresh[-1][OFFSET] + 1
    return plan
