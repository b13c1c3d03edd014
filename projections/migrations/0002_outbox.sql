-- The transactional outbox (step 4): events a finished call (or, in step 5, a
-- paid order) has earned, written before the response completes and published
-- to Kafka by `creditledger outbox relay`. event_id is the idempotency key: a
-- retried call with the same event_id adds nothing.
CREATE TABLE outbox (
    id            bigserial   PRIMARY KEY,
    event_id      text        NOT NULL,
    topic         text        NOT NULL,
    message_key   bytea       NOT NULL,
    message_value bytea       NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    sent_at       timestamptz,
    CONSTRAINT outbox_event_id_key UNIQUE (event_id)
);

-- What the relays scan: only the rows still to send, oldest first.
CREATE INDEX outbox_pending ON outbox (id) WHERE sent_at IS NULL;
