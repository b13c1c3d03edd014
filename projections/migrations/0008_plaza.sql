-- The plan plaza (issue 17): shared plans, their tags, likes, imports and comment threads.
-- Counts live on the plan row and change in the transaction that inserts or deletes the
-- like or import (the row lock serialises concurrent ones), so they stay exact. Every change
-- also writes its event into the outbox in the same transaction (plaza/repository.py).

CREATE TABLE plaza_plans (
    plan_id       text PRIMARY KEY CHECK (plan_id ~ '^p_[0-9a-f]{24}$'),
    author_id     text NOT NULL,
    title         text NOT NULL,
    summary       text NOT NULL,
    steps         jsonb NOT NULL CHECK (jsonb_typeof(steps) = 'array'),
    tags          text[] NOT NULL CHECK (cardinality(tags) >= 1),
    -- published: on the plaza; withdrawn: taken down by its author; private: a user's own
    -- copy of an imported plan, seen only by that user.
    status        text NOT NULL CHECK (status IN ('published', 'withdrawn', 'private')),
    imported_from text REFERENCES plaza_plans (plan_id),
    like_count    bigint NOT NULL DEFAULT 0 CHECK (like_count >= 0),
    import_count  bigint NOT NULL DEFAULT 0 CHECK (import_count >= 0),
    comment_count bigint NOT NULL DEFAULT 0 CHECK (comment_count >= 0),
    popularity    bigint GENERATED ALWAYS AS (like_count + import_count) STORED,
    -- Lexemes made by plaza.search (words, and CJK characters with their bigrams), built
    -- with array_to_tsvector so no database locale decides what a word is.
    search        tsvector NOT NULL,
    created_at    timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL
);

CREATE INDEX plaza_plans_newest ON plaza_plans (created_at DESC, plan_id DESC)
    WHERE status = 'published';
CREATE INDEX plaza_plans_popular ON plaza_plans (popularity DESC, plan_id DESC)
    WHERE status = 'published';
CREATE INDEX plaza_plans_tags ON plaza_plans USING gin (tags) WHERE status = 'published';
CREATE INDEX plaza_plans_search ON plaza_plans USING gin (search) WHERE status = 'published';
CREATE INDEX plaza_plans_author ON plaza_plans (author_id, updated_at DESC);

-- One row per (tag, published plan): the newest plans of a tag are an index range, however
-- many plans the tag has.
CREATE TABLE plaza_plan_tags (
    tag        text NOT NULL,
    created_at timestamptz NOT NULL,
    plan_id    text NOT NULL REFERENCES plaza_plans (plan_id),
    PRIMARY KEY (tag, created_at, plan_id)
);
CREATE INDEX plaza_plan_tags_plan ON plaza_plan_tags (plan_id);

-- Published plans per tag, for the tag chips.
CREATE TABLE plaza_tags (
    tag   text PRIMARY KEY,
    plans bigint NOT NULL CHECK (plans >= 0)
);

CREATE TABLE plaza_likes (
    plan_id  text NOT NULL REFERENCES plaza_plans (plan_id),
    user_id  text NOT NULL,
    liked_at timestamptz NOT NULL,
    PRIMARY KEY (plan_id, user_id)
);

-- Once per user and plan; the copy is the importer's own private plan.
CREATE TABLE plaza_imports (
    plan_id     text NOT NULL REFERENCES plaza_plans (plan_id),
    user_id     text NOT NULL,
    copy_id     text NOT NULL REFERENCES plaza_plans (plan_id),
    imported_at timestamptz NOT NULL,
    PRIMARY KEY (plan_id, user_id)
);

CREATE TABLE plaza_comments (
    comment_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    plan_id    text NOT NULL REFERENCES plaza_plans (plan_id),
    parent_id  bigint REFERENCES plaza_comments (comment_id),
    -- The ids from the thread's top down to this comment: ordering by it lists the tree
    -- depth first, replies in the order they were written, and pages by keyset.
    path       bigint[] NOT NULL,
    author_id  text NOT NULL,
    body       text NOT NULL,  -- '' once deleted: the replies stay, the text goes
    created_at timestamptz NOT NULL,
    deleted_at timestamptz
);
CREATE INDEX plaza_comments_thread ON plaza_comments (plan_id, path);
