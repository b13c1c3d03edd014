-- Snapshots of the ledger fold's state (issue 18), one per ledger partition and offset.
-- A snapshot is the fold of entries [0, ledger_offset] of one partition of one incarnation
-- of the ledger topic (topic_id: a topic deleted and created again is another log), as the
-- files of a RocksDB checkpoint packed into one blob, cut in chunks. A snapshot is written
-- in one transaction, chunks first and its row last: a writer killed halfway leaves no row,
-- and the previous snapshot stays the newest. Readers check the blob's sha256 before use.
CREATE TABLE ledger_snapshots (
    snapshot_id    bigint      PRIMARY KEY,
    topic          text        NOT NULL,
    topic_id       text        NOT NULL,
    partition      integer     NOT NULL,
    ledger_offset  bigint      NOT NULL,
    format         integer     NOT NULL,
    size_bytes     bigint      NOT NULL,
    chunks         integer     NOT NULL,
    sha256         text        NOT NULL,
    taken_by       text        NOT NULL,
    took_ms        bigint      NOT NULL,
    taken_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ledger_snapshots_newest ON ledger_snapshots (topic, partition, ledger_offset DESC);
CREATE SEQUENCE ledger_snapshot_ids;

CREATE TABLE ledger_snapshot_chunks (
    snapshot_id bigint  NOT NULL,
    n           integer NOT NULL,
    data        bytea   NOT NULL,
    PRIMARY KEY (snapshot_id, n)
);
-- The blob is RocksDB's compressed files: Postgres compressing it again costs CPU for nothing.
ALTER TABLE ledger_snapshot_chunks ALTER COLUMN data SET STORAGE EXTERNAL;
