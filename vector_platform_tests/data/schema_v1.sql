-- The catalog exactly as the first release (schema version 1) created it: its bootstrap DDL,
-- then the version row it wrote. test_migrations upgrades a database built from this file.
CREATE SCHEMA IF NOT EXISTS vector_platform;
CREATE SCHEMA IF NOT EXISTS vp_vectors;
CREATE SCHEMA IF NOT EXISTS vp_serving;

CREATE TABLE IF NOT EXISTS vector_platform.models (
    key text PRIMARY KEY,
    provider text NOT NULL,
    model_name text NOT NULL,
    dims int NOT NULL,
    distance text NOT NULL,
    storage_type text NOT NULL,
    max_tokens int NOT NULL,
    options jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS vector_platform.collections (
    name text PRIMARY KEY,
    source text NOT NULL,
    settings jsonb NOT NULL DEFAULT '{}',
    serving_model text REFERENCES vector_platform.models (key),
    tier text NOT NULL DEFAULT 'active' CHECK (tier IN ('active', 'cold', 'archived')),
    tier_rules jsonb NOT NULL DEFAULT '{}',
    tier_changed_at timestamptz,
    last_queried_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS vector_platform.collection_models (
    collection text NOT NULL REFERENCES vector_platform.collections (name) ON DELETE CASCADE,
    model_key text NOT NULL REFERENCES vector_platform.models (key),
    table_name text NOT NULL UNIQUE,
    added_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (collection, model_key)
);

CREATE TABLE IF NOT EXISTS vector_platform.documents (
    collection text NOT NULL REFERENCES vector_platform.collections (name) ON DELETE CASCADE,
    doc_id text NOT NULL,
    title text,
    body text NOT NULL,
    content_hash text NOT NULL,
    metadata jsonb NOT NULL DEFAULT '{}',
    source_ts timestamptz,
    chunked_hash text,
    first_seen_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    deleted_at timestamptz,
    PRIMARY KEY (collection, doc_id)
);

CREATE TABLE IF NOT EXISTS vector_platform.chunks (
    chunk_id uuid PRIMARY KEY,
    collection text NOT NULL,
    doc_id text NOT NULL,
    seq int NOT NULL,
    text text NOT NULL,
    content_hash text NOT NULL,
    token_count int NOT NULL,
    FOREIGN KEY (collection, doc_id) REFERENCES vector_platform.documents ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS chunks_by_document ON vector_platform.chunks (collection, doc_id);

CREATE TABLE IF NOT EXISTS vector_platform.dead_letters (
    id bigserial PRIMARY KEY,
    collection text NOT NULL,
    model_key text NOT NULL DEFAULT '',
    stage text NOT NULL,
    ref text NOT NULL,
    error text NOT NULL,
    payload text,
    attempts int NOT NULL DEFAULT 1,
    created_at timestamptz NOT NULL,
    last_seen_at timestamptz NOT NULL,
    resolved_at timestamptz,
    resolution text
);
CREATE UNIQUE INDEX IF NOT EXISTS dead_letters_open
    ON vector_platform.dead_letters (collection, model_key, stage, ref) WHERE resolved_at IS NULL;

CREATE TABLE IF NOT EXISTS vector_platform.tier_events (
    id bigserial PRIMARY KEY,
    collection text NOT NULL,
    from_tier text,
    to_tier text NOT NULL,
    at timestamptz NOT NULL,
    actor text NOT NULL,
    reason text,
    rows bigint,
    bytes bigint
);

CREATE TABLE IF NOT EXISTS vector_platform.snapshots (
    id bigserial PRIMARY KEY,
    collection text NOT NULL,
    model_key text NOT NULL,
    uri text NOT NULL,
    rows bigint NOT NULL,
    bytes bigint NOT NULL,
    sha256 text NOT NULL,
    manifest jsonb NOT NULL,
    created_at timestamptz NOT NULL
);

CREATE TABLE IF NOT EXISTS vector_platform.archival_jobs (
    id bigserial PRIMARY KEY,
    collection text NOT NULL,
    cutoff timestamptz NOT NULL,
    cursor text,
    status text NOT NULL,
    rows_archived bigint NOT NULL DEFAULT 0,
    error text,
    started_at timestamptz NOT NULL,
    finished_at timestamptz
);

CREATE TABLE IF NOT EXISTS vector_platform.query_stats (
    id bigserial PRIMARY KEY,
    collection text NOT NULL,
    model_key text NOT NULL,
    queried_at timestamptz NOT NULL,
    mode text NOT NULL,
    k int NOT NULL,
    latency_ms real NOT NULL,
    hits int NOT NULL,
    query_text text,
    query_vector vector
);
CREATE INDEX IF NOT EXISTS query_stats_recent ON vector_platform.query_stats (collection, model_key, queried_at DESC);

CREATE TABLE IF NOT EXISTS vector_platform.schema_version (version int NOT NULL);
INSERT INTO vector_platform.schema_version VALUES (1);
