-- What an outbox row's event id stands for (issue: money integrity). A writer that
-- inserts an event id that exists already is told whether it is the same event (same
-- fingerprint: a retry, nothing added) or another one under a reused id (an error, never
-- a silent success). The proxy's fingerprint is that of the call (user, model alias,
-- scene, body digest); other writers use a digest of the encoded event. Rows written
-- before this migration have none: they compare by the digest of their value.
ALTER TABLE outbox ADD COLUMN fingerprint text;
