-- 0011: what each recall measurement measured. `measured_state` names the table's rows (count
-- and digest), its valid indexes, the ef_search and the week's query sample; while all of them
-- are unchanged a new measurement would measure the same thing, so index_recall_meets_target
-- reuses the last one (an ingest that changed no row re-measures nothing). `uses_index`: whether
-- the plan used the HNSW index then (the check still explains the plan every time).
ALTER TABLE vector_platform.recall_history ADD COLUMN measured_state text;
ALTER TABLE vector_platform.recall_history ADD COLUMN uses_index boolean;
CREATE INDEX recall_history_by_state ON vector_platform.recall_history (collection, model_key, measured_state)
    WHERE measured_state IS NOT NULL;
