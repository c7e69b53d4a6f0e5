-- Who last set each source's retention policy: passed on to DbSync with the policy, so the
-- signed pruning checkpoint names the person, not only the Scheduler.
ALTER TABLE scheduler_sources ADD COLUMN retention_set_by TEXT NOT NULL DEFAULT '';
