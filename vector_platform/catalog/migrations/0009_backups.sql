-- 0009: dropping collections. Backups themselves are not recorded here: they are listed from
-- the backup location (each one's manifest.json), so they outlive the loss of this database.
-- A drop deletes the collection's catalog rows and tables in one transaction, then its files
-- on the object store; this row says which backup held its state, and whether the files are
-- gone yet (a drop killed in between is finished by the next drop or restore of the name).

CREATE TABLE vector_platform.dropped_collections (
    id bigserial PRIMARY KEY,
    collection text NOT NULL,
    dropped_at timestamptz NOT NULL,
    backup_uri text,                 -- the verified backup of its last state; NULL when forced without one
    forced boolean NOT NULL DEFAULT false,
    files_removed_at timestamptz,    -- NULL while its object-store files may still be there
    details jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX dropped_collections_files_pending ON vector_platform.dropped_collections (collection)
    WHERE files_removed_at IS NULL;
