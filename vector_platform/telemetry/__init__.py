"""Operability: Prometheus metrics and logs.

- `figures`: counters and histograms that runs produce (rows ingested, batch commit and
  embedding latency, retries, rejected vectors), summed in memory and added to the catalog
  table `run_metrics` every few seconds, because runs execute in Dagster run workers, not in
  the process Prometheus scrapes.
- `metrics`: the series a scrape returns: this process's own (query latency per tier,
  connection pools) and the catalog's (run figures, vectors and bytes per tier, dead
  letters, recall), served at `/metrics` by `vector-platform serve` and `vector-platform metrics`.
- `logs`: secrets masked in every log record, and one JSON object per line with run,
  collection and model when VP_LOG_FORMAT=json.

Nothing here imports Dagster: dagster.yaml names `logs.RunLogHandler` for runs' logs.
"""
