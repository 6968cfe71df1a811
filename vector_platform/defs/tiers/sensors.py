"""`tiering_sensor`: enforces every collection's tier rules (see `vector_platform.tiers.rules`)."""

import os

import dagster as dg

from vector_platform import clock
from vector_platform.catalog import tiers as tier_sql
from vector_platform.defs.ingest.sensors import missing_partitions
from vector_platform.defs.resources import PostgresResource
from vector_platform.defs.tiers.jobs import MOVE_JOBS, archive_job, evict_job, rehydrate_job
from vector_platform.tiers.rules import due_moves


DECISION_TAG = "vector_platform/decision"
MAX_ATTEMPTS = 5
FAILED = (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)


def _attempt_key(instance: dg.DagsterInstance, key: str) -> str:
    """The run key for a decision: its own while no run of it failed; after a failed run
    (store down, a crash), a new key per failure, up to MAX_ATTEMPTS, so the move is retried on
    the next tick instead of being deduplicated forever."""
    runs = instance.get_runs(filters=dg.RunsFilter(tags={DECISION_TAG: key}), limit=MAX_ATTEMPTS + 1)
    failed = sum(1 for r in runs if r.status in FAILED)
    if failed == 0:
        return key
    if runs[0].status in FAILED:  # newest first: the last attempt failed
        return f"{key}:retry{failed}" if failed < MAX_ATTEMPTS else f"{key}:retry{failed - 1}"  # the latter: give up
    return f"{key}:retry{failed}"  # that retry is queued, running or done


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
                run_key=_attempt_key(context.instance, d.run_key),
                job_name=MOVE_JOBS[d.target],
                partition_key=d.collection,
                run_config={"ops": {f"{MOVE_JOBS[d.target].replace('_job', '')}_collection": {"config": {"reason": "rule"}}}},
                tags={"vector_platform/rule": d.rule, "vector_platform/why": d.why[:200], DECISION_TAG: d.run_key},
            )
            for d in decisions
        ],
        # A collection declared since the discovery sensor last ran gets its partition first.
        dynamic_partitions_requests=missing_partitions(context.instance, [d.collection for d in decisions], []),
    )
