-- The Scheduler's tables: sources, builds, the leader's lease, and its page-token key.

-- A registered source. `spec` is the Source message as the user set it (protobuf); the columns
-- beside it are what the Scheduler queries and sets itself.
CREATE TABLE scheduler_sources (
    name        TEXT        PRIMARY KEY,
    spec        BYTEA       NOT NULL,
    enabled     BOOLEAN     NOT NULL,
    -- The next tick of the schedule, and when its build starts (the tick plus the jitter, or
    -- later after failures); NULL when the source has no schedule.
    next_tick   TIMESTAMPTZ,
    next_due_at TIMESTAMPTZ,
    failures    INTEGER     NOT NULL DEFAULT 0,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
-- The leader's scan for due sources.
CREATE INDEX scheduler_sources_due ON scheduler_sources (next_due_at) WHERE enabled AND next_due_at IS NOT NULL;

-- One build (or a skipped tick). `record` is the Build message as last written.
CREATE TABLE scheduler_builds (
    id            TEXT        PRIMARY KEY,
    source        TEXT        NOT NULL,
    state         SMALLINT    NOT NULL,
    scheduled_for TIMESTAMPTZ,
    -- The replica running it, its last sign of life, and the lease epoch it was started
    -- under (scheduled builds), which fences what it records.
    runner        TEXT        NOT NULL,
    heartbeat_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    lease_epoch   BIGINT,
    record        BYTEA       NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);
-- At most one queued or running build per source, whichever replica starts it.
CREATE UNIQUE INDEX scheduler_builds_one_active ON scheduler_builds (source) WHERE state IN (1, 2);
-- Each tick of a source's schedule is run (or skipped) once.
CREATE UNIQUE INDEX scheduler_builds_one_per_tick ON scheduler_builds (source, scheduled_for)
    WHERE scheduled_for IS NOT NULL;
-- Listings, newest first, of one source or all.
CREATE INDEX scheduler_builds_by_source ON scheduler_builds (source, created_at DESC, id DESC);
CREATE INDEX scheduler_builds_by_time ON scheduler_builds (created_at DESC, id DESC);
-- Builds whose runner went silent.
CREATE INDEX scheduler_builds_active ON scheduler_builds (heartbeat_at) WHERE state IN (1, 2);

-- The leader's lease: renewed by the holder; `epoch` grows with each new holder and fences
-- every write the leader makes, so a paused former leader cannot write after losing it.
CREATE TABLE scheduler_lease (
    name       TEXT        PRIMARY KEY,
    holder     TEXT        NOT NULL,
    epoch      BIGINT      NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);

CREATE TABLE scheduler_secrets (
    name  TEXT  PRIMARY KEY,
    value BYTEA NOT NULL
);
INSERT INTO scheduler_secrets (name, value) VALUES (
    'page_token_key',
    decode(replace(gen_random_uuid()::text, '-', '') || replace(gen_random_uuid()::text, '-', ''), 'hex')
);
