-- Who set each source's retention policy, and who caused each checkpoint (for a `pruned`
-- checkpoint: the identity that set the policy that removed the records). Covered by the
-- checkpoint's signature (docs/merkle-spec.md section 10.2, encoding version 2).
ALTER TABLE merkle_sources ADD COLUMN retention_set_by TEXT NOT NULL DEFAULT '';
ALTER TABLE merkle_history_checkpoints ADD COLUMN actor TEXT NOT NULL DEFAULT '';
