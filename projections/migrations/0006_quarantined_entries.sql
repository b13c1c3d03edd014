-- Ledger entries a projection could not store (issue: money integrity). One bad id must
-- not stop the read models for everybody: the projector records the entry here, with its
-- reason, in the same transaction as the batch around it, and goes on. `verify` fails
-- while this table is not empty; the entry itself stays in the ledger topic (the truth).
-- Values are escaped and truncated (`projections.entries.printable`), so any entry fits.
CREATE TABLE quarantined_entries (
    projection     text        NOT NULL,
    topic          text        NOT NULL,
    partition      integer     NOT NULL,
    ledger_offset  bigint      NOT NULL,
    user_id        text        NOT NULL,
    seq            bigint      NOT NULL,
    event_id       text        NOT NULL,
    kind           text        NOT NULL,
    amount_micro   bigint      NOT NULL,
    reason         text        NOT NULL,
    quarantined_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, topic, partition, ledger_offset)
);
