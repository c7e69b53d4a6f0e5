-- A fleet build's node builds, newest first (ListBuilds with parent_build_id pages by it).
DROP INDEX scheduler_builds_children;
CREATE INDEX scheduler_builds_children ON scheduler_builds (parent_id, created_at DESC, id DESC)
    WHERE parent_id <> '';
