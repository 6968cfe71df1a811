-- Row archival, partitioned layout: whole month partitions of a vector table are detached,
-- checked against the archive files, and dropped. Each one's progress is a row here, so a run
-- killed between the steps is finished by the next (see vector_platform/archive/partitions.py).

CREATE TABLE vector_platform.archive_partitions (
    id bigserial PRIMARY KEY,
    job_id bigint NOT NULL REFERENCES vector_platform.archival_jobs (id) ON DELETE CASCADE,
    collection text NOT NULL REFERENCES vector_platform.collections (name) ON DELETE CASCADE,
    model_key text NOT NULL,
    parent text NOT NULL,        -- the partitioned vector table (schema vp_vectors)
    partition text NOT NULL,     -- the partition's name while attached
    detached_as text,            -- its name once detached (the month's name is free again for new rows)
    year int NOT NULL,
    month int NOT NULL,
    state text NOT NULL CHECK (state IN ('detaching', 'detached', 'dropped', 'rows_deleted')),
    rows bigint,                 -- rows the partition held when detached (or rows deleted)
    remainder_rows bigint NOT NULL DEFAULT 0,  -- rows no archive file held yet, written before the drop
    error text,                  -- why the last attempt stopped short (reported by status and the check)
    updated_at timestamptz NOT NULL
);
CREATE UNIQUE INDEX archive_partitions_open ON vector_platform.archive_partitions (parent, partition)
    WHERE state IN ('detaching', 'detached');

-- Rows of a detached partition that no batch file held (normally none) get a file of their own.
ALTER TABLE vector_platform.archive_files DROP CONSTRAINT IF EXISTS archive_files_kind_check;
ALTER TABLE vector_platform.archive_files ADD CONSTRAINT archive_files_kind_check
    CHECK (kind IN ('documents', 'vectors', 'partition_rows'));
