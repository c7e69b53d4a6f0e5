-- DbSync's schema: sources, their snapshots (merkle_roots) and the content-addressed directory
-- nodes of the snapshots' trees (merkle_tree_data), docs/merkle-spec.md.

-- Directory nodes, content-addressed: each stored once, shared by every snapshot that holds it
-- (like git objects), so a snapshot that changes one file inserts O(depth) rows.
CREATE TABLE merkle_tree_data (
    hash        BYTEA       PRIMARY KEY CHECK (octet_length(hash) = 32),
    -- The node's canonical encoding (spec section 4): SHA-256 of these bytes is `hash`.
    encoded     BYTEA       NOT NULL,
    -- The entries' file sizes (not hashed, so not in `encoded`): 8 bytes big-endian each.
    sizes       BYTEA       NOT NULL,
    -- The hashes of the entries that are directories, 32 bytes each, for garbage collection.
    child_dirs  BYTEA       NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Last time a sync relied on this node (stored it, found it, or referenced it); garbage
    -- collection spares nodes used within GC_GRACE.
    last_used   TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Sources that have snapshots, with their retention policy (NULL: rule unset).
CREATE TABLE merkle_sources (
    name             TEXT        PRIMARY KEY,
    keep_last        INTEGER     CHECK (keep_last > 0),
    keep_within_secs BIGINT      CHECK (keep_within_secs > 0),
    snapshot_count   BIGINT      NOT NULL DEFAULT 0,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- One row per stored snapshot. The record hash and signature chain each source's snapshots
-- (the tamper-evident history); they are NULL until records are chained and signed.
CREATE TABLE merkle_roots (
    id                   BIGSERIAL   PRIMARY KEY,
    source               TEXT        NOT NULL REFERENCES merkle_sources (name),
    sequence             BIGINT      NOT NULL CHECK (sequence > 0),
    -- A snapshot's root node can never be collected while the snapshot exists.
    root_hash            BYTEA       NOT NULL REFERENCES merkle_tree_data (hash),
    profile              SMALLINT    NOT NULL,
    build_id             TEXT        NOT NULL,
    created_at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    file_count           BIGINT      NOT NULL,
    dir_count            BIGINT      NOT NULL,
    symlink_count        BIGINT      NOT NULL,
    skipped_count        BIGINT      NOT NULL,
    total_bytes          BIGINT      NOT NULL,
    previous_record_hash BYTEA,
    record_hash          BYTEA,
    signature            BYTEA,
    -- The latest snapshot of a source, and pages of its history newest first.
    UNIQUE (source, sequence)
);

-- A retried sync (same build) finds the snapshot it stored.
CREATE UNIQUE INDEX merkle_roots_by_build ON merkle_roots (source, build_id) WHERE build_id <> '';
-- Time-range listings and retention by age.
CREATE INDEX merkle_roots_by_time ON merkle_roots (source, created_at);
-- Is a root a stored snapshot's root (reads and garbage collection).
CREATE INDEX merkle_roots_by_root ON merkle_roots (root_hash);
-- No index on last_used: garbage collection (not a hot path) reads every node anyway, and
-- without it marking a node used can be a HOT update.

-- Secrets DbSync replicas share, made once: the key that signs page tokens.
CREATE TABLE dbsync_secrets (
    name  TEXT  PRIMARY KEY,
    value BYTEA NOT NULL
);
INSERT INTO dbsync_secrets (name, value) VALUES (
    'page_token_key',
    decode(replace(gen_random_uuid()::text, '-', '') || replace(gen_random_uuid()::text, '-', ''), 'hex')
);
