-- When a directory state was last fetched (what a run with its id does), so retention can
-- remove the ones nobody has used for `directory_states_after_days`.
ALTER TABLE directory_states ADD COLUMN used_at BIGINT NOT NULL DEFAULT 0;
UPDATE directory_states SET used_at = created_at;
CREATE INDEX directory_states_used_at ON directory_states (used_at);
