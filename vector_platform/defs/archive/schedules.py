"""`row_archive_schedule`: nightly, one row_archive run per collection with an
archive_rows_older_than_days rule (active collections; the asset skips the others)."""

import dagster as dg

from vector_platform.catalog import tiers as tier_sql
from vector_platform.defs.archive.jobs import row_archive_job
from vector_platform.defs.partitions import collection_partitions
from vector_platform.defs.resources import PostgresResource


@dg.schedule(job=row_archive_job, cron_schedule="41 2 * * *", default_status=dg.DefaultScheduleStatus.RUNNING)
def row_archive_schedule(context: dg.ScheduleEvaluationContext, postgres: PostgresResource):
    """Nightly row archival: a run per active collection whose archive_rows_older_than_days
    rule is set, keyed by collection and night, so a tick evaluated twice starts one run."""
    with postgres.pool().connection() as conn:
        states = tier_sql.tier_states(conn)
    due = [s.name for s in states if s.rules.archive_rows_older_than_days and s.tier == "active"]
    if not due:
        return dg.SkipReason("no active collection has an archive_rows_older_than_days rule")
    known = set(context.instance.get_dynamic_partitions(collection_partitions.name))
    for c in due:
        if c not in known:  # collection_discovery_sensor adds it; the next night archives it
            context.log.warning(f"{c}: not a partition yet (the discovery sensor adds it); not archived tonight")
    due = [c for c in due if c in known]
    if not due:
        return dg.SkipReason("the collections with a rule are not partitions yet")
    night = context.scheduled_execution_time.strftime("%Y-%m-%d") if context.scheduled_execution_time else "manual"
    return [dg.RunRequest(run_key=f"row_archive:{c}:{night}", partition_key=c) for c in due]
