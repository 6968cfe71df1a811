-- 0004: model upgrades. A shadow model's quality gate results, every serving swap and
-- rollback, the model a rollback returns to (kept until retain_until), and labelled
-- queries (BEIR qrels) for the nDCG part of the gate.

ALTER TABLE vector_platform.collections ADD COLUMN IF NOT EXISTS previous_model text REFERENCES vector_platform.models (key);
ALTER TABLE vector_platform.collections ADD COLUMN IF NOT EXISTS previous_retain_until timestamptz;
-- The model an upgrade is heading to (set by `models upgrade`, cleared by the swap).
ALTER TABLE vector_platform.collections ADD COLUMN IF NOT EXISTS upgrade_to text REFERENCES vector_platform.models (key);
ALTER TABLE vector_platform.collections ADD COLUMN IF NOT EXISTS upgrade_backfill_id text;
-- Set when a model's table was dropped after its retention (the attachment stays: history).
ALTER TABLE vector_platform.collection_models ADD COLUMN IF NOT EXISTS retired_at timestamptz;

CREATE TABLE vector_platform.quality_gates (
    id bigserial PRIMARY KEY,
    collection text NOT NULL REFERENCES vector_platform.collections (name) ON DELETE CASCADE,
    model_key text NOT NULL,
    fingerprint text NOT NULL,
    baseline_model text,
    passed boolean NOT NULL,
    figures jsonb NOT NULL,
    reasons text[] NOT NULL DEFAULT '{}',
    rows bigint NOT NULL,
    evaluated_at timestamptz NOT NULL,
    run_id text
);
CREATE INDEX quality_gates_latest ON vector_platform.quality_gates (collection, model_key, evaluated_at DESC);

CREATE TABLE vector_platform.model_swaps (
    id bigserial PRIMARY KEY,
    collection text NOT NULL REFERENCES vector_platform.collections (name) ON DELETE CASCADE,
    kind text NOT NULL CHECK (kind IN ('swap', 'rollback')),
    from_model text,
    to_model text NOT NULL,
    gate_id bigint REFERENCES vector_platform.quality_gates (id),
    at timestamptz NOT NULL,
    actor text NOT NULL,
    run_id text
);
CREATE INDEX model_swaps_by_collection ON vector_platform.model_swaps (collection, at DESC);

CREATE TABLE vector_platform.labelled_queries (
    collection text NOT NULL REFERENCES vector_platform.collections (name) ON DELETE CASCADE,
    query_id text NOT NULL,
    text text NOT NULL,
    PRIMARY KEY (collection, query_id)
);

CREATE TABLE vector_platform.qrels (
    collection text NOT NULL,
    query_id text NOT NULL,
    doc_id text NOT NULL,
    relevance int NOT NULL,
    PRIMARY KEY (collection, query_id, doc_id),
    FOREIGN KEY (collection, query_id) REFERENCES vector_platform.labelled_queries ON DELETE CASCADE
);

-- Serving views gain the fingerprint of their vectors: recreated by schema.migrate once the
-- fingerprints of release-1 tables are filled in (tables.publish_view).
