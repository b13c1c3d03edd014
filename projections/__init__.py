"""The read side: ledger entries projected into Redis snapshots and Postgres read models,
their queries, replay and verify."""
