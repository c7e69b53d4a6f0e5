-- Fleet builds: one build of the whole fleet (the parent) and one build per client node, each
-- node's build naming its parent.
ALTER TABLE scheduler_builds ADD COLUMN parent_id TEXT NOT NULL DEFAULT '';
-- The one-active rule is about a source's own builds; a fleet build's nodes run together.
DROP INDEX scheduler_builds_one_active;
CREATE UNIQUE INDEX scheduler_builds_one_active ON scheduler_builds (source)
    WHERE state IN (1, 2) AND parent_id = '';
-- A fleet build's node builds.
CREATE INDEX scheduler_builds_children ON scheduler_builds (parent_id) WHERE parent_id <> '';
