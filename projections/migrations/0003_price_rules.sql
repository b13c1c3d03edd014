-- Price rules managed in the database (the credit store's admin writes them), merged by
-- the proxy with the YAML file. A version is never updated once written: a new price is a
-- new version with a later effective_from, so past charges keep the version they carry.
-- Prices are exact decimals, micro-credits per token (p credits per million tokens = p).
CREATE TABLE price_rules (
    rule_id            text          NOT NULL,
    version            integer       NOT NULL CHECK (version >= 1),
    effective_from     timestamptz   NOT NULL,
    input_micro        numeric(24, 12) NOT NULL CHECK (input_micro >= 0),
    cached_input_micro numeric(24, 12)          CHECK (cached_input_micro >= 0),
    output_micro       numeric(24, 12) NOT NULL CHECK (output_micro >= 0),
    reasoning_micro    numeric(24, 12)          CHECK (reasoning_micro >= 0),
    minimum_micro      bigint        NOT NULL DEFAULT 0 CHECK (minimum_micro >= 0),
    rounding           text          NOT NULL DEFAULT 'ceil'
                                     CHECK (rounding IN ('ceil', 'floor', 'half_up')),
    created_at         timestamptz   NOT NULL DEFAULT now(),
    PRIMARY KEY (rule_id, version)
);
