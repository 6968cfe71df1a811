-- 0010: figures that runs produce (rows ingested, batch commit and embedding latency, retries,
-- rejected vectors), added up across every process that ever ran a step, so a Prometheus
-- scrape of any process (`vector-platform serve` or `metrics`) reads them. Runs execute in
-- Dagster run workers on any machine; their in-memory counters die with them.
--
-- One row per figure and label set. A counter keeps its value in `total`; a histogram keeps
-- its sum in `total`, its count in `observations` and per-bucket counts (not cumulative, the
-- last one for +Inf) in `buckets`, for the upper bounds in `bounds`. Rows only grow, so every
-- counter is monotonic and rate() works on it.

CREATE TABLE vector_platform.run_metrics (
    metric text NOT NULL,
    collection text NOT NULL,
    model_key text NOT NULL DEFAULT '',
    label text NOT NULL DEFAULT '',  -- the figure's one extra label (a stage, a reason); '' when it has none
    total double precision NOT NULL DEFAULT 0,
    observations bigint NOT NULL DEFAULT 0,
    bounds double precision[],
    buckets bigint[],
    updated_at timestamptz NOT NULL,
    PRIMARY KEY (metric, collection, model_key, label)
);
