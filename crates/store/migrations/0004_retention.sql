-- When a run or an import last used an image or an upload (NULL: not since it was made).
ALTER TABLE images ADD COLUMN used_at BIGINT;
ALTER TABLE files ADD COLUMN used_at BIGINT;

-- Images the retention policy removed: lineage goes on naming them.
CREATE TABLE removed_images (
    uuid            TEXT PRIMARY KEY,
    namespace       TEXT NOT NULL,
    parent_uuid     TEXT,
    operation_uuid  TEXT,
    size_bytes      BIGINT NOT NULL,
    created_at      BIGINT NOT NULL,
    removed_at      BIGINT NOT NULL,
    reason          TEXT NOT NULL
);
CREATE INDEX removed_images_parent ON removed_images (parent_uuid);
-- What the retention queries look up: unfinished operations (of an image, or any, a short
-- list) and uploads by content.
CREATE INDEX operations_unfinished_image ON operations (image_uuid)
    WHERE status NOT IN ('SUCCESS', 'FAILED', 'CANCELLED');
CREATE INDEX files_sha256 ON files (sha256);
