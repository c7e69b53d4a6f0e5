-- Witnesses of the transparency log: the tree size each last cosigned (what the next
-- submission's consistency proof starts from), and the cosignatures kept per checkpoint.
CREATE TABLE merkle_log_witnesses (
    name       TEXT        PRIMARY KEY,
    size       BIGINT      NOT NULL CHECK (size >= 0),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- One C2SP tlog-cosignature line per witness and checkpoint (verified when it came).
CREATE TABLE merkle_log_cosignatures (
    size       BIGINT      NOT NULL,
    witness    TEXT        NOT NULL,
    line       TEXT        NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (size, witness)
);
