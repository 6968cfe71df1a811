-- Operability: who searched what (audit_log) and how well each index finds (recall_history).

-- One row per search through the HTTP API or the CLI while auditing is on (VP_AUDIT=1).
-- Kept `VP_AUDIT_RETENTION_DAYS` (default 90) days: the maintenance job deletes older rows.
CREATE TABLE vector_platform.audit_log (
    id bigserial PRIMARY KEY,
    at timestamptz NOT NULL,
    principal text NOT NULL,     -- the API key's name, or the OS user of a CLI command
    channel text NOT NULL CHECK (channel IN ('http', 'cli')),
    client text,                 -- the HTTP client's address
    collections text[] NOT NULL,
    query_text text,             -- NULL for a search by vector
    k int NOT NULL,
    results jsonb NOT NULL,      -- [{"collection", "doc_id", "chunk_id", "tier"}, ...] in rank order
    latency_ms double precision NOT NULL,
    error text                   -- why the search failed; NULL when it answered
);
CREATE INDEX audit_log_at ON vector_platform.audit_log (at);

-- Every recall measurement of an index (the index_recall_meets_target check, on a schedule or
-- after an ingest): the recall-over-time picture and the vp_recall metric read it.
CREATE TABLE vector_platform.recall_history (
    id bigserial PRIMARY KEY,
    collection text NOT NULL,
    model_key text NOT NULL,
    measured_at timestamptz NOT NULL,
    recall double precision NOT NULL,
    k int NOT NULL,
    ef_search int NOT NULL,
    queries int NOT NULL,
    queries_from_log int NOT NULL,
    ann_p95_ms double precision,
    curve jsonb NOT NULL DEFAULT '{}'   -- {ef_search: recall} measured on the same queries
);
CREATE INDEX recall_history_by_index ON vector_platform.recall_history (collection, model_key, measured_at);
