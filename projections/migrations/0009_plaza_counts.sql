-- A plan's counts move to a narrow table of their own (step 17's benchmark).
-- On plaza_plans, a like changed like_count and with it popularity, which is indexed, so
-- Postgres could not update the row in place (HOT): every like wrote a new entry into
-- each of the plan's indexes, the two GIN indexes (its tags, its ~50 search lexemes)
-- among them, and the GIN pending-list flushes landed on the liking requests (bench.plaza:
-- likes p99 ~170 ms, Postgres the bottleneck). Here a like touches a row whose only
-- indexes are its key and the popular order. `published` mirrors the plan's status for
-- that partial index (the repository sets both in one transaction).

CREATE TABLE plaza_plan_counts (
    plan_id       text PRIMARY KEY REFERENCES plaza_plans (plan_id),
    published     boolean NOT NULL,
    like_count    bigint NOT NULL DEFAULT 0 CHECK (like_count >= 0),
    import_count  bigint NOT NULL DEFAULT 0 CHECK (import_count >= 0),
    comment_count bigint NOT NULL DEFAULT 0 CHECK (comment_count >= 0),
    popularity    bigint GENERATED ALWAYS AS (like_count + import_count) STORED
) WITH (fillfactor = 80);  -- room on each page, so a comment count changes in place (HOT)

INSERT INTO plaza_plan_counts (plan_id, published, like_count, import_count, comment_count)
SELECT plan_id, status = 'published', like_count, import_count, comment_count
FROM plaza_plans;

CREATE INDEX plaza_plan_counts_popular ON plaza_plan_counts (popularity DESC, plan_id DESC)
    WHERE published;

DROP INDEX plaza_plans_popular;
ALTER TABLE plaza_plans
    DROP COLUMN popularity,
    DROP COLUMN like_count,
    DROP COLUMN import_count,
    DROP COLUMN comment_count;
