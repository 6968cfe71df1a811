-- 0005: row archival. A job per archival pass over a collection (its keyset checkpoint and
-- counts), a receipt per archive file (written, read back and verified before any row it
-- holds is deleted), and where each archived document went (lookups, and ingest leaving
-- archived documents archived).

-- 0001 created a placeholder archival_jobs that no release ever wrote: replaced here.
DROP TABLE IF EXISTS vector_platform.archival_jobs;
CREATE TABLE vector_platform.archival_jobs (
    id bigserial PRIMARY KEY,
    collection text NOT NULL REFERENCES vector_platform.collections (name) ON DELETE CASCADE,
    layout text NOT NULL CHECK (layout IN ('rows', 'partitions')),
    cutoff timestamptz NOT NULL,
    status text NOT NULL CHECK (status IN ('running', 'completed', 'failed')),
    last_key text,  -- the checkpoint: the last document id archived (keyset order)
    batches int NOT NULL DEFAULT 0,
    documents bigint NOT NULL DEFAULT 0,
    chunks bigint NOT NULL DEFAULT 0,
    vectors bigint NOT NULL DEFAULT 0,
    bytes bigint NOT NULL DEFAULT 0,
    error text,
    started_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    finished_at timestamptz,
    run_id text
);
-- One unfinished job per collection: a re-run resumes it.
CREATE UNIQUE INDEX archival_jobs_one_open ON vector_platform.archival_jobs (collection) WHERE status <> 'completed';

CREATE TABLE vector_platform.archive_files (
    id bigserial PRIMARY KEY,
    job_id bigint NOT NULL REFERENCES vector_platform.archival_jobs (id) ON DELETE CASCADE,
    batch int NOT NULL,  -- the job's batch number: receipts of a batch past the checkpoint are leftovers of a kill
    collection text NOT NULL,
    kind text NOT NULL CHECK (kind IN ('documents', 'vectors')),
    model_key text NOT NULL DEFAULT '',
    fingerprint text,
    dims int,
    storage_type text,
    year int NOT NULL,
    month int NOT NULL,
    first_key text NOT NULL,
    last_key text NOT NULL,
    key text NOT NULL UNIQUE,  -- job-<id>-batch-<n>: a resumed batch writes the same object again
    uri text NOT NULL,
    sha256 text NOT NULL,
    bytes bigint NOT NULL,
    rows int NOT NULL,
    row_groups int NOT NULL,
    id_hash text NOT NULL,
    verified_at timestamptz NOT NULL
);
CREATE INDEX archive_files_by_collection ON vector_platform.archive_files (collection, year, month);

CREATE TABLE vector_platform.archived_documents (
    collection text NOT NULL REFERENCES vector_platform.collections (name) ON DELETE CASCADE,
    doc_id text NOT NULL,
    content_hash text NOT NULL,
    source_ts timestamptz,
    file_id bigint NOT NULL REFERENCES vector_platform.archive_files (id),
    row_group int NOT NULL,
    archived_at timestamptz NOT NULL,
    PRIMARY KEY (collection, doc_id)
);
