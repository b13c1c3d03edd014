-- Standard event metadata (issue 16): the Kafka headers each outbox event is produced with,
-- CloudEvents' ce_* and the W3C traceparent of the request that caused it, as a JSON
-- object of header name -> text. Rows written before this migration have none.
ALTER TABLE outbox ADD COLUMN headers jsonb;
