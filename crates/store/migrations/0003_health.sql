-- One row, rewritten by readiness probes: a write that reaches the disk proves the store
-- accepts writes.
CREATE TABLE health (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    checked_at INTEGER NOT NULL
);
