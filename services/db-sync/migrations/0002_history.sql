-- The tamper-evident history (docs/merkle-spec.md section 10): the id of the key that signed
-- each record, and the signed checkpoints of each source's chain.
ALTER TABLE merkle_roots ADD COLUMN key_id TEXT;

-- One `head` checkpoint per source (its latest record, rewritten in the transaction that
-- appends a record) and one `pruned` checkpoint (the last record retention removed, written
-- in the transaction that removes it).
CREATE TABLE merkle_history_checkpoints (
    source      TEXT        NOT NULL,
    kind        TEXT        NOT NULL CHECK (kind IN ('head', 'pruned')),
    sequence    BIGINT      NOT NULL CHECK (sequence > 0),
    record_hash BYTEA       NOT NULL CHECK (octet_length(record_hash) = 32),
    signature   BYTEA,
    key_id      TEXT,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (source, kind)
);
