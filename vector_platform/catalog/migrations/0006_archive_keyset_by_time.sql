-- 0006: row archival walks documents in (source_ts, doc_id) order, so a batch's rows fall
-- in one or two source months and each month's archive is a few large files, not a file
-- from every batch. The checkpoint is that pair.
ALTER TABLE vector_platform.archival_jobs ADD COLUMN last_ts timestamptz;
CREATE INDEX IF NOT EXISTS documents_by_source_ts ON vector_platform.documents (collection, source_ts, doc_id);
-- What search and get ask of the receipts: a collection's files of one kind and model by month.
CREATE INDEX IF NOT EXISTS archive_files_by_kind ON vector_platform.archive_files (collection, kind, model_key, year, month);
-- An archived document the source no longer has: still in its file (a receipt keeps it),
-- but no longer answered by search; `get` says when it went.
ALTER TABLE vector_platform.archived_documents ADD COLUMN deleted_at timestamptz;
