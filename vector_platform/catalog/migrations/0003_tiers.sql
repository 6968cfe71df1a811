-- 0003: storage tiers. Snapshots become receipts (a row exists only once its files were read
-- back from the store and verified), each vector table remembers the snapshot that serves it
-- while the collection is cold, tier events say how long a move took and which run made it,
-- queries to cold collections can ask for a rehydrate, and every change of a fact that
-- search caches (tier, settings, serving model, attachments) is announced on a channel.

ALTER TABLE vector_platform.snapshots ADD COLUMN IF NOT EXISTS table_digest text;
ALTER TABLE vector_platform.snapshots ADD COLUMN IF NOT EXISTS verified_at timestamptz;
-- Set when the snapshot's files were deleted (replaced by a newer one, or archived).
ALTER TABLE vector_platform.snapshots ADD COLUMN IF NOT EXISTS deleted_at timestamptz;
CREATE INDEX IF NOT EXISTS snapshots_by_pair ON vector_platform.snapshots (collection, model_key, id DESC);

ALTER TABLE vector_platform.collection_models
    ADD COLUMN IF NOT EXISTS cold_snapshot_id bigint REFERENCES vector_platform.snapshots (id);

ALTER TABLE vector_platform.collections ADD COLUMN IF NOT EXISTS rehydrate_requested_at timestamptz;

ALTER TABLE vector_platform.tier_events ADD COLUMN IF NOT EXISTS seconds real;
ALTER TABLE vector_platform.tier_events ADD COLUMN IF NOT EXISTS run_id text;
ALTER TABLE vector_platform.tier_events ADD COLUMN IF NOT EXISTS snapshot_id bigint;
CREATE INDEX IF NOT EXISTS tier_events_by_collection ON vector_platform.tier_events (collection, id DESC);

CREATE OR REPLACE FUNCTION vector_platform.announce_catalog_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- The payload names the collection ('' = every collection, e.g. a model changed).
    IF TG_TABLE_NAME = 'collections' THEN
        PERFORM pg_notify('vector_platform_catalog', coalesce(NEW.name, OLD.name));
    ELSIF TG_TABLE_NAME = 'collection_models' THEN
        PERFORM pg_notify('vector_platform_catalog', coalesce(NEW.collection, OLD.collection));
    ELSE
        PERFORM pg_notify('vector_platform_catalog', '');
    END IF;
    RETURN NULL;
END $$;

-- Query bookkeeping (last_queried_at, rehydrate_requested_at) is not a fact search caches.
CREATE TRIGGER collections_changed
    AFTER UPDATE ON vector_platform.collections FOR EACH ROW
    WHEN (OLD.tier IS DISTINCT FROM NEW.tier OR OLD.settings IS DISTINCT FROM NEW.settings
          OR OLD.serving_model IS DISTINCT FROM NEW.serving_model OR OLD.tier_rules IS DISTINCT FROM NEW.tier_rules)
    EXECUTE FUNCTION vector_platform.announce_catalog_change();
CREATE TRIGGER collections_added_or_removed
    AFTER INSERT OR DELETE ON vector_platform.collections FOR EACH ROW
    EXECUTE FUNCTION vector_platform.announce_catalog_change();
CREATE TRIGGER collection_models_changed
    AFTER INSERT OR UPDATE OR DELETE ON vector_platform.collection_models FOR EACH ROW
    EXECUTE FUNCTION vector_platform.announce_catalog_change();
CREATE TRIGGER models_changed
    AFTER UPDATE OR DELETE ON vector_platform.models FOR EACH STATEMENT
    EXECUTE FUNCTION vector_platform.announce_catalog_change();
