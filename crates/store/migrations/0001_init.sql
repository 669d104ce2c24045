-- Images are immutable; `layers` is a JSON array of layer digests, topmost first.
CREATE TABLE images (
    uuid            TEXT PRIMARY KEY,
    namespace       TEXT NOT NULL,
    parent_uuid     TEXT,
    operation_uuid  TEXT,
    layers          TEXT NOT NULL,
    env             TEXT NOT NULL,
    workdir         TEXT,
    size_bytes      BIGINT NOT NULL,
    created_at      BIGINT NOT NULL
);
CREATE INDEX images_ns_created ON images (namespace, created_at DESC);

-- A tag names one image within a namespace.
CREATE TABLE tags (
    namespace   TEXT NOT NULL,
    tag         TEXT NOT NULL,
    image_uuid  TEXT NOT NULL REFERENCES images (uuid),
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (namespace, tag)
);
CREATE INDEX tags_image ON tags (image_uuid);

-- Times are microseconds since the Unix epoch.
CREATE TABLE operations (
    uuid               TEXT PRIMARY KEY,
    namespace          TEXT NOT NULL,
    kind               TEXT NOT NULL,
    status             TEXT NOT NULL,
    error              TEXT,
    created_at         BIGINT NOT NULL,
    started_at         BIGINT,
    finished_at        BIGINT,
    image_uuid         TEXT,
    result_image_uuid  TEXT,
    result_tag         TEXT,
    image_size         BIGINT,
    consumed_cpu       DOUBLE PRECISION,
    consumed_memory    BIGINT,
    metadata           TEXT NOT NULL,
    result             TEXT
);
CREATE INDEX operations_ns_created ON operations (namespace, created_at DESC);
CREATE INDEX operations_status ON operations (status);

-- The append-only event log of each operation; ids increase per operation.
CREATE TABLE events (
    operation_uuid  TEXT NOT NULL REFERENCES operations (uuid),
    id              BIGINT NOT NULL,
    ts              BIGINT NOT NULL,
    spid            BIGINT,
    type            TEXT NOT NULL,
    data            TEXT NOT NULL,
    PRIMARY KEY (operation_uuid, id)
);
