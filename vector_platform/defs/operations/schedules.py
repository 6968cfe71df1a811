"""`maintenance_schedule` (nightly) and `recall_monitoring_schedule` (weekly)."""

import dagster as dg

from vector_platform import catalog
from vector_platform.catalog import tiers as tier_sql
from vector_platform.defs.operations.jobs import RECALL_CHECK, maintenance_job, recall_monitoring_job
from vector_platform.defs.partitions import collection_partitions, model_partitions
from vector_platform.defs.resources import PostgresResource


def _tick(context: dg.ScheduleEvaluationContext, fmt: str) -> str:
    return context.scheduled_execution_time.strftime(fmt) if context.scheduled_execution_time else "manual"


@dg.schedule(job=maintenance_job, cron_schedule="17 3 * * *", default_status=dg.DefaultScheduleStatus.RUNNING)
def maintenance_schedule(context: dg.ScheduleEvaluationContext):
    """Nightly: VACUUM (ANALYZE) of the vector tables with their health check, then the storage overview."""
    return dg.RunRequest(run_key=f"maintenance:{_tick(context, '%Y-%m-%d')}")


@dg.schedule(job=recall_monitoring_job, cron_schedule="23 4 * * 1", default_status=dg.DefaultScheduleStatus.RUNNING)
def recall_monitoring_schedule(context: dg.ScheduleEvaluationContext, postgres: PostgresResource):
    """Weekly: the recall check of every active collection's serving index, on that week's
    sample of the queries users actually asked (index_recall_meets_target)."""
    with postgres.pool().connection() as conn:
        serving = [(s.name, catalog.get_collection(conn, s.name).serving_model) for s in tier_sql.tier_states(conn) if s.tier == "active"]
    known_collections = set(context.instance.get_dynamic_partitions(collection_partitions.name))
    known_models = set(context.instance.get_dynamic_partitions(model_partitions.name))
    due = [(c, m) for c, m in serving if m and c in known_collections and m in known_models]
    if not due:
        return dg.SkipReason("no active collection with a serving model is a partition yet")
    week = _tick(context, "%G-W%V")
    return [
        dg.RunRequest(
            run_key=f"recall:{c}|{m}:{week}", partition_key=dg.MultiPartitionKey({"collection": c, "model": m}),
            asset_selection=[], asset_check_selection=[RECALL_CHECK],  # the check only: the index is not rebuilt
        )
        for c, m in due
    ]
