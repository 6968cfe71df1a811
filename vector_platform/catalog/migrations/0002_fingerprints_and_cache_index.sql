-- 0002: model identity (fingerprints on models and on every vector table), an index of the
-- embedding cache (content hash -> Parquet file, so a lookup reads only the files it needs),
-- chunks ordered for keyset pagination, and a schema_version that says when.

ALTER TABLE vector_platform.schema_version ADD COLUMN IF NOT EXISTS name text;
ALTER TABLE vector_platform.schema_version ADD COLUMN IF NOT EXISTS applied_at timestamptz NOT NULL DEFAULT now();

ALTER TABLE vector_platform.models ADD COLUMN IF NOT EXISTS fingerprint text;
ALTER TABLE vector_platform.models ADD COLUMN IF NOT EXISTS identity jsonb;
-- The fingerprint of the vectors a table holds (a table never mixes two).
ALTER TABLE vector_platform.collection_models ADD COLUMN IF NOT EXISTS fingerprint text;

DROP INDEX IF EXISTS vector_platform.chunks_by_document;
CREATE INDEX chunks_by_document ON vector_platform.chunks (collection, doc_id, seq);

-- Both keyed by the object store's URL too: the index describes the files of one store.
CREATE TABLE vector_platform.embedding_cache_files (
    store text NOT NULL,
    file_key text NOT NULL,
    fingerprint text NOT NULL,
    rows int NOT NULL,
    bytes bigint NOT NULL,
    created_at timestamptz NOT NULL,
    -- Set when compaction replaced the file; it is deleted only once no lookup can be reading it.
    retired_at timestamptz,
    PRIMARY KEY (store, file_key)
);
CREATE INDEX embedding_cache_files_live ON vector_platform.embedding_cache_files (store, fingerprint) WHERE retired_at IS NULL;

CREATE TABLE vector_platform.embedding_cache (
    store text NOT NULL,
    fingerprint text NOT NULL,
    content_hash text NOT NULL,
    file_key text NOT NULL,
    row_index int NOT NULL,
    PRIMARY KEY (store, fingerprint, content_hash),
    FOREIGN KEY (store, file_key) REFERENCES vector_platform.embedding_cache_files (store, file_key)
);
CREATE INDEX embedding_cache_by_file ON vector_platform.embedding_cache (store, file_key);

CREATE INDEX IF NOT EXISTS dead_letters_open_by_stage
    ON vector_platform.dead_letters (collection, stage) WHERE resolved_at IS NULL;
