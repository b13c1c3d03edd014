-- The credit store (step 5): products, orders, reward rules and their claims.
-- Money: credits are integer micro-credits (*_micro); prices are integer minor units
-- of the currency (cents, *_minor). No floating point anywhere.

CREATE TABLE products (
    product_id          text        PRIMARY KEY CHECK (product_id ~ '^[a-z0-9][a-z0-9_-]{0,63}$'),
    name                text        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    credits_micro       bigint      NOT NULL CHECK (credits_micro > 0),
    original_price_minor bigint     NOT NULL CHECK (original_price_minor > 0),
    price_minor         bigint      NOT NULL CHECK (price_minor > 0),
    currency            text        NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    active_from         timestamptz NOT NULL DEFAULT '1970-01-01T00:00:00Z',
    active_until        timestamptz,
    sort_order          integer     NOT NULL DEFAULT 0,
    created_at          timestamptz NOT NULL DEFAULT now(),
    CHECK (price_minor <= original_price_minor),
    CHECK (active_until IS NULL OR active_until > active_from)
);

-- An order freezes the product's credits and price when it is created. Its life:
-- created -> paid -> fulfilled, or created -> cancelled | expired. A late payment of an
-- expired order is still taken (the customer paid); a cancelled one is refused.
CREATE TABLE orders (
    order_id          text        PRIMARY KEY,
    user_id           text        NOT NULL,
    product_id        text        NOT NULL REFERENCES products (product_id),
    credits_micro     bigint      NOT NULL CHECK (credits_micro > 0),
    price_minor       bigint      NOT NULL CHECK (price_minor > 0),
    currency          text        NOT NULL,
    status            text        NOT NULL DEFAULT 'created'
                      CHECK (status IN ('created', 'paid', 'fulfilled', 'cancelled', 'expired')),
    payment_reference text,
    grant_event_id    text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    expires_at        timestamptz NOT NULL,
    paid_at           timestamptz,
    fulfilled_at      timestamptz,
    cancelled_at      timestamptz,
    -- One payment pays one order: a callback replayed against another order is refused.
    CONSTRAINT orders_payment_reference_key UNIQUE (payment_reference),
    CHECK (status NOT IN ('paid', 'fulfilled') OR payment_reference IS NOT NULL),
    CHECK (status <> 'fulfilled' OR grant_event_id IS NOT NULL)
);
CREATE INDEX orders_by_user ON orders (user_id, created_at DESC, order_id DESC);
-- What the fulfiller sweeps: paid orders whose grant is not in the outbox yet.
CREATE INDEX orders_to_fulfil ON orders (paid_at) WHERE status = 'paid';
CREATE INDEX orders_to_expire ON orders (expires_at) WHERE status = 'created';

-- Reward rules: kind 'signup' (once), 'checkin' (once per period) or 'event' (triggered
-- by another service's event, e.g. forum.plan_imported). cap_per_period claims per user
-- per period ('day', 'week', 'month' or 'lifetime', UTC).
CREATE TABLE reward_rules (
    rule_id        text        PRIMARY KEY CHECK (rule_id ~ '^[a-z0-9][a-z0-9_.-]{0,63}$'),
    kind           text        NOT NULL CHECK (kind IN ('signup', 'checkin', 'event')),
    description    text        NOT NULL DEFAULT '',
    amount_micro   bigint      NOT NULL CHECK (amount_micro > 0),
    cap_per_period integer     NOT NULL CHECK (cap_per_period >= 1),
    period         text        NOT NULL CHECK (period IN ('day', 'week', 'month', 'lifetime')),
    trigger_event  text,
    active_from    timestamptz NOT NULL DEFAULT '1970-01-01T00:00:00Z',
    active_until   timestamptz,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    CHECK ((kind = 'event') = (trigger_event IS NOT NULL)),
    CHECK (active_until IS NULL OR active_until > active_from)
);

-- One row per granted claim; (rule, user, reference) makes a claim idempotent. The
-- reference is the period for signup and check-in, the triggering event's id for
-- event rules.
CREATE TABLE reward_claims (
    rule_id      text        NOT NULL REFERENCES reward_rules (rule_id),
    user_id      text        NOT NULL,
    reference    text        NOT NULL,
    period_start timestamptz NOT NULL,
    amount_micro bigint      NOT NULL CHECK (amount_micro > 0),
    event_id     text        NOT NULL UNIQUE,
    claimed_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (rule_id, user_id, reference)
);

-- Claims per (rule, user, period): the cap is enforced by one conditional upsert.
CREATE TABLE reward_counters (
    rule_id      text        NOT NULL,
    user_id      text        NOT NULL,
    period_start timestamptz NOT NULL,
    claimed      integer     NOT NULL CHECK (claimed >= 0),
    PRIMARY KEY (rule_id, user_id, period_start)
);
