"""`tiering_sensor`: enforces every collection's tier rules (see `vector_platform.tiers.rules`)."""

import os

import dagster as dg

from vector_platform import clock
from vector_platform.catalog import tiers as tier_sql
from vector_platform.defs.ingest.sensors import missing_partitions
from vector_platform.defs.resources import PostgresResource
from vector_platform.defs.tiers.jobs import MOVE_JOBS, archive_job, evict_job, rehydrate_job
from vector_platform.tiers.rules import due_moves


@dg.sensor(
    jobs=[evict_job, rehydrate_job, archive_job],
    minimum_interval_seconds=int(os.environ.get("VP_TIERING_INTERVAL_S", "60")),
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def tiering_sensor(context: dg.SensorEvaluationContext, postgres: PostgresResource) -> dg.SensorResult:
    """Evicts collections idle for their evict_after_days, archives those cold for their
    archive_after_days, rehydrates cold ones queried with rehydrate_on_query. One run per
    rule and state (deterministic run keys); "now" comes from the platform's one clock.
    Interval: VP_TIERING_INTERVAL_S (default 60 s)."""
    with postgres.pool().connection() as conn:
        states = tier_sql.tier_states(conn)
    decisions = due_moves(states, clock.now())
    if not decisions:
        return dg.SensorResult(skip_reason="no tier rule is due")
    for d in decisions:
        context.log.info(f"{d.collection}: {d.rule} -> {d.target} ({d.why})")
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                run_key=d.run_key,
                job_name=MOVE_JOBS[d.target],
                partition_key=d.collection,
                run_config={"ops": {f"{MOVE_JOBS[d.target].replace('_job', '')}_collection": {"config": {"reason": "rule"}}}},
                tags={"vector_platform/rule": d.rule, "vector_platform/why": d.why[:200]},
            )
            for d in decisions
        ],
        # A collection declared since the discovery sensor last ran gets its partition first.
        dynamic_partitions_requests=missing_partitions(context.instance, [d.collection for d in decisions], []),
    )
