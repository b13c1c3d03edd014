-- Snapshots of the ledger fold's state (issue 18), one per ledger partition and offset.
-- A snapshot is the fold of entries [0, ledger_offset] of one partition of one incarnation
-- of the ledger topic (topic_id: a topic deleted and created again is another log): the
-- files of a RocksDB checkpoint of that partition's state. Files are stored once per
-- partition and shared by the snapshots that contain them (RocksDB never changes a file it
-- wrote), so a snapshot uploads only the files that are new since the last one.
--
-- A snapshot is written in one transaction: its new files, their chunks, then its row. A
-- writer killed halfway leaves nothing, and the previous snapshot stays the newest. Readers
-- check every file's sha256 and size, and the manifest's sha256, before using any of it.
-- Writers and the pruning of a partition take an advisory lock on (topic, partition).
CREATE SEQUENCE ledger_snapshot_ids;

CREATE TABLE ledger_snapshots (
    snapshot_id     bigint      PRIMARY KEY,
    topic           text        NOT NULL,
    topic_id        text        NOT NULL,
    partition       integer     NOT NULL,
    ledger_offset   bigint      NOT NULL,
    format          integer     NOT NULL,
    files           text[]      NOT NULL,  -- file names in the checkpoint
    file_ids        bigint[]    NOT NULL,  -- ledger_snapshot_files, in the same order
    size_bytes      bigint      NOT NULL,  -- all its files
    uploaded_bytes  bigint      NOT NULL,  -- the files this snapshot was the first to store
    sha256          text        NOT NULL,  -- of its manifest: "name sha256 size" lines
    taken_by        text        NOT NULL,
    took_ms         bigint      NOT NULL,
    taken_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ledger_snapshots_newest ON ledger_snapshots (topic, partition, ledger_offset DESC);

CREATE TABLE ledger_snapshot_files (
    file_id     bigint  PRIMARY KEY,
    topic       text    NOT NULL,
    partition   integer NOT NULL,
    sha256      text    NOT NULL,
    size_bytes  bigint  NOT NULL,
    chunks      integer NOT NULL
);
CREATE INDEX ledger_snapshot_files_content ON ledger_snapshot_files (topic, partition, sha256);

CREATE TABLE ledger_snapshot_chunks (
    file_id bigint  NOT NULL,
    n       integer NOT NULL,
    data    bytea   NOT NULL,
    PRIMARY KEY (file_id, n)
);
-- The files are RocksDB's compressed blocks: Postgres compressing them again costs CPU for nothing.
ALTER TABLE ledger_snapshot_chunks ALTER COLUMN data SET STORAGE EXTERNAL;
