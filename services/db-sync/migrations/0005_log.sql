-- The transparency log (docs/merkle-spec.md section 11): one append-only RFC 6962 Merkle log
-- per deployment whose leaves are the snapshot records' hashes, in commit order, with signed
-- C2SP checkpoints. Retention never touches these tables: a pruned snapshot's leaf stays.

-- Records stored but not yet in the log. A sync adds its record here in its own transaction,
-- so none is ever left out, even one that retention deletes before the log takes it in.
CREATE TABLE merkle_log_pending (
    snapshot_id BIGINT PRIMARY KEY,
    source      TEXT   NOT NULL,
    sequence    BIGINT NOT NULL,
    record_hash BYTEA  NOT NULL CHECK (octet_length(record_hash) = 32)
);

-- The leaves: leaf `index` (from 0) is `record_hash` of `source`'s record `sequence`.
CREATE TABLE merkle_log_leaves (
    index       BIGINT PRIMARY KEY CHECK (index >= 0),
    snapshot_id BIGINT NOT NULL UNIQUE,
    source      TEXT   NOT NULL,
    sequence    BIGINT NOT NULL,
    record_hash BYTEA  NOT NULL CHECK (octet_length(record_hash) = 32)
);
-- A record's leaf, for inclusion proofs by source and sequence.
CREATE INDEX merkle_log_leaves_by_record ON merkle_log_leaves (source, sequence);

-- The log's stored hashes (the layout of golang.org/x/mod/sumdb/tlog: each leaf hash and each
-- complete subtree's hash, by stored hash index), from which any tree hash and proof is read.
CREATE TABLE merkle_log_hashes (
    index BIGINT PRIMARY KEY CHECK (index >= 0),
    hash  BYTEA  NOT NULL CHECK (octet_length(hash) = 32)
);

-- Checkpoints: the tree of `size` leaves has `root`; `note` is the C2SP signed note (the
-- tlog-checkpoint text, then its signature lines; none when DbSync has no signing key).
CREATE TABLE merkle_log_checkpoints (
    size       BIGINT      PRIMARY KEY CHECK (size > 0),
    root       BYTEA       NOT NULL CHECK (octet_length(root) = 32),
    note       TEXT        NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Every record stored before the log existed joins it once, in commit order.
INSERT INTO merkle_log_pending (snapshot_id, source, sequence, record_hash)
    SELECT id, source, sequence, record_hash FROM merkle_roots WHERE record_hash IS NOT NULL;
