"""The transactional outbox, shared by every producer of ledger commands: one way in
(:mod:`outbox.enqueue`), the proxies' spool for when Postgres is down
(:mod:`outbox.spool`), and the relay that publishes both to Kafka (:mod:`outbox.relay`)."""
