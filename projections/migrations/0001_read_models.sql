-- Read models of the ledger (step 3). Every row here is derived from
-- credit.ledger.entries alone, so `creditledger replay` can rebuild it
-- byte for byte. Money is bigint micro-credits; times are timestamptz (UTC).

-- Every entry, as the ledger wrote it. (user_id, seq) is the entry's identity;
-- the primary key also serves a user's newest-first history (a backward scan).
CREATE TABLE ledger_entries (
    user_id             text        NOT NULL,
    seq                 bigint      NOT NULL CHECK (seq >= 1),
    event_id            text        NOT NULL,
    command_digest      text        NOT NULL,
    kind                text        NOT NULL
        CHECK (kind IN ('charge', 'purchase', 'reward', 'adjustment', 'refund')),
    amount_micro        bigint      NOT NULL,
    balance_after_micro bigint      NOT NULL,
    reference           text,
    scene               text,
    request_id          text,
    conversation_id     text,
    model_alias         text,
    upstream_model      text,
    input_tokens        bigint      NOT NULL DEFAULT 0,
    output_tokens       bigint      NOT NULL DEFAULT 0,
    cached_tokens       bigint      NOT NULL DEFAULT 0,
    reasoning_tokens    bigint      NOT NULL DEFAULT 0,
    usage_estimated     boolean     NOT NULL DEFAULT false,
    price_rule_id       text,
    price_rule_version  integer,
    occurred_at         timestamptz NOT NULL,
    recorded_at         timestamptz NOT NULL,
    -- Where the entry sits in the log: lets ops go from a row to the message.
    ledger_partition    integer     NOT NULL,
    ledger_offset       bigint      NOT NULL,
    CONSTRAINT ledger_entries_pkey PRIMARY KEY (user_id, seq),
    CONSTRAINT ledger_entries_event_id_key UNIQUE (event_id)
);

-- One row per account: the newest entry's balance and seq, and running totals.
-- updated_at is the newest entry's recorded_at (not now()), so a replay gives
-- the same bytes.
CREATE TABLE accounts (
    user_id        text        PRIMARY KEY,
    balance_micro  bigint      NOT NULL,
    seq            bigint      NOT NULL,
    granted_micro  bigint      NOT NULL,
    charged_micro  bigint      NOT NULL,
    updated_at     timestamptz NOT NULL
);

-- Charges summed per user, UTC hour of occurred_at, model alias and scene.
CREATE TABLE consumption_hourly (
    user_id          text        NOT NULL,
    hour             timestamptz NOT NULL,
    model_alias      text        NOT NULL,
    scene            text        NOT NULL,
    credits_micro    bigint      NOT NULL,
    input_tokens     bigint      NOT NULL,
    output_tokens    bigint      NOT NULL,
    cached_tokens    bigint      NOT NULL,
    reasoning_tokens bigint      NOT NULL,
    calls            bigint      NOT NULL,
    CONSTRAINT consumption_hourly_pkey PRIMARY KEY (user_id, hour, model_alias, scene)
);

-- How far each projection has read each partition: the next offset to apply.
-- Written in the same transaction as the rows it covers.
CREATE TABLE projection_progress (
    projection  text        NOT NULL,
    topic       text        NOT NULL,
    partition   integer     NOT NULL,
    next_offset bigint      NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, topic, partition)
);
