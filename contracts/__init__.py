"""What every context agrees on: the ledger's commands and entries as published types
(:mod:`contracts.commands`), their topics and Avro records (:mod:`contracts.records`), the
field rules (:mod:`contracts.fields`) and the Redis key layout with its scripts
(:mod:`contracts.redis_keys`)."""
