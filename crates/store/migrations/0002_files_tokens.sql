-- Uploaded files: one row per (namespace, content); the bytes live in the blob store.
CREATE TABLE files (
    uuid        TEXT PRIMARY KEY,
    namespace   TEXT NOT NULL,
    sha256      TEXT NOT NULL,
    size        BIGINT NOT NULL,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    UNIQUE (namespace, sha256)
);
CREATE INDEX files_ns_created ON files (namespace, created_at DESC);

-- API tokens created with `boxwood token create`; only the SHA-256 of the secret is kept.
CREATE TABLE tokens (
    sha256       TEXT PRIMARY KEY,
    uuid         TEXT NOT NULL UNIQUE,
    namespace    TEXT NOT NULL,
    permissions  TEXT NOT NULL,
    description  TEXT,
    created_at   BIGINT NOT NULL,
    revoked_at   BIGINT
);

CREATE INDEX images_parent ON images (parent_uuid);
