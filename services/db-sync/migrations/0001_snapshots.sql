-- Snapshots of sources and the directory nodes of their trees (docs/merkle-spec.md).

-- Directory nodes, content-addressed: stored once however many snapshots share them.
CREATE TABLE tree_nodes (
    hash    BYTEA PRIMARY KEY CHECK (octet_length(hash) = 32),
    -- The node's canonical encoding (the bytes its hash is computed over).
    encoded BYTEA NOT NULL
);

-- Sources that have snapshots, with their retention policy (NULL: rule unset).
CREATE TABLE sources (
    name        TEXT PRIMARY KEY,
    keep_last   INTEGER CHECK (keep_last > 0),
    keep_within INTERVAL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- One row per stored snapshot: a signed record chained to the source's previous one.
CREATE TABLE snapshots (
    id                   BIGSERIAL PRIMARY KEY,
    source               TEXT        NOT NULL REFERENCES sources (name),
    sequence             BIGINT      NOT NULL CHECK (sequence > 0),
    root_hash            BYTEA       NOT NULL CHECK (octet_length(root_hash) = 32),
    profile              SMALLINT    NOT NULL,
    build_id             TEXT        NOT NULL,
    created_at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    file_count           BIGINT      NOT NULL,
    dir_count            BIGINT      NOT NULL,
    symlink_count        BIGINT      NOT NULL,
    skipped_count        BIGINT      NOT NULL,
    total_bytes          BIGINT      NOT NULL,
    previous_record_hash BYTEA,
    record_hash          BYTEA       NOT NULL,
    signature            BYTEA       NOT NULL,
    UNIQUE (source, sequence)
);

CREATE INDEX snapshots_by_source_time ON snapshots (source, created_at DESC);
CREATE INDEX snapshots_by_root ON snapshots (root_hash);
