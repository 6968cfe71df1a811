"""Dead-letter replay: a job that retries open embedding dead letters, and a sensor that runs it
for every (collection, model) whose dead letters have cooled down."""

import os

import dagster as dg

from vector_platform.catalog.dead_letters import replay_candidates
from vector_platform.defs.ingest.assets import embeddings, hnsw_index, vector_table
from vector_platform.defs.resources import PostgresResource

# Re-embedding picks up every live chunk without a vector, the dead-lettered ones included;
# resolved dead letters are marked, never deleted.
dead_letter_replay_job = dg.define_asset_job(
    "dead_letter_replay_job",
    selection=dg.AssetSelection.assets(embeddings, vector_table, hnsw_index),
    description="Retry the open embedding dead letters of one collection under one model (partition: collection|model).",
    tags={"vector_platform/purpose": "dead_letter_replay"},
)

DEFAULT_COOL_DOWN_S = 600
DEFAULT_MAX_ATTEMPTS = 5


@dg.sensor(job=dead_letter_replay_job, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING)
def dead_letter_replay_sensor(context: dg.SensorEvaluationContext, postgres: PostgresResource):
    """Runs dead_letter_replay_job for each (collection, model) whose open embedding dead letters
    were last seen more than VP_REPLAY_COOL_DOWN_S ago (default 600 s), up to
    VP_REPLAY_MAX_ATTEMPTS attempts (default 5). The run key names the newest failure, so one
    batch of failures is replayed once."""
    cool_down = float(os.environ.get("VP_REPLAY_COOL_DOWN_S", DEFAULT_COOL_DOWN_S))
    max_attempts = int(os.environ.get("VP_REPLAY_MAX_ATTEMPTS", DEFAULT_MAX_ATTEMPTS))
    with postgres.pool().connection() as conn:
        candidates = replay_candidates(conn, cool_down, max_attempts)
    if not candidates:
        return dg.SkipReason("no open embedding dead letters past their cool-down")
    return [
        dg.RunRequest(
            run_key=f"replay:{collection}:{model}:{last_seen.isoformat()}",
            partition_key=dg.MultiPartitionKey({"collection": collection, "model": model}),
        )
        for collection, model, last_seen in candidates
    ]
