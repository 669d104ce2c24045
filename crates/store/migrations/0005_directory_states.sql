-- Directory states (Boxwood extension): a synced local tree as upload → path entries, so
-- `run(directory_state_id)` works from any client of the namespace.
CREATE TABLE directory_states (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    namespace   TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);

CREATE TABLE directory_state_files (
    state_id    INTEGER NOT NULL REFERENCES directory_states (id) ON DELETE CASCADE,
    path        TEXT NOT NULL,
    file_uuid   TEXT NOT NULL,
    mode        INTEGER NOT NULL,
    PRIMARY KEY (state_id, path)
);
