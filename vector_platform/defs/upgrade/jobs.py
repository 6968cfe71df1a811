"""Model upgrades in Dagster: the backfill and the gate live on the vector assets
(`defs/ingest`), the swap on `serving_view`; here, retiring what a swap left behind."""

import dagster as dg

from vector_platform.defs.resources import PostgresResource
from vector_platform.upgrade.swap import retire_expired


@dg.op
def retire_previous_models(context: dg.OpExecutionContext, postgres: PostgresResource) -> dg.Output:
    """Drop the tables of previous models whose retention (retain_previous_days) ran out; the
    attachment stays as history, snapshots stay, and `models rollback` is no longer possible."""
    retired = retire_expired(postgres.pool(), postgres.resolved_dsn(), say=context.log.warning)
    for collection, model in retired:
        context.log.info(f"{collection}: retired {model}")
    return dg.Output(None, metadata={"retired": ", ".join(f"{c}/{m}" for c, m in retired) or "none"})


@dg.job(description="Drop previous models' tables past their retention (after a model swap).")
def retire_previous_models_job():
    retire_previous_models()


retire_previous_models_schedule = dg.ScheduleDefinition(
    job=retire_previous_models_job, cron_schedule="17 3 * * *", default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Daily: retire previous models' tables past retain_previous_days.",
)
