"""`row_archive` [collection]: the collection's aged rows, moved to Parquet on the object store
by its `archive_rows_older_than_days` rule (logic: `vector_platform.archive.rows`)."""

import dagster as dg

from vector_platform.archive import rows as archive
from vector_platform.catalog import tiers as tier_sql
from vector_platform.defs.ingest.assets import vector_table
from vector_platform.defs.partitions import collection_partitions
from vector_platform.defs.resources import ObjectStoreResource, PostgresResource


@dg.asset(
    partitions_def=collection_partitions,
    deps=[dg.AssetDep(vector_table, partition_mapping=dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="collection"))],
    group_name="archive",
    kinds={"parquet", "s3"},
    pool="vector_db",
)
def row_archive(context: dg.AssetExecutionContext, postgres: PostgresResource, object_store: ObjectStoreResource) -> dg.MaterializeResult:
    """Documents whose source timestamp is older than the collection's archive_rows_older_than_days,
    with their chunks and every model's vectors, as Parquet under archive/<collection>/year=/month=
    on the object store. Keyset batches: each batch's files are written, read back and verified,
    their receipts committed, and only then are its rows deleted, with the job's checkpoint, in
    one short transaction under the writer lock. A killed job resumes where it stopped.
    Collections without the rule (or not active) are left as they are."""
    collection = context.partition_key
    pool = postgres.pool()
    with pool.connection() as conn:
        [state] = tier_sql.tier_states(conn, [collection])
    days = state.rules.archive_rows_older_than_days
    if days is None or state.tier != "active":
        why = "no archive_rows_older_than_days rule" if days is None else f"the collection is {state.tier}"
        return dg.MaterializeResult(metadata={"archived": False, "why": why})
    try:
        report = archive.archive_rows(
            pool, object_store.store(), postgres.resolved_dsn(), collection, archive.cutoff_for(days),
            run_id=context.run.run_id, say=context.log.info,
        )
    except archive.ArchiveError as err:
        raise dg.Failure(str(err), allow_retries=False) from None
    with pool.connection() as conn:
        summary = archive.archive_summary(conn, collection)
    return dg.MaterializeResult(metadata={
        "archived": True, "dagster/row_count": report.documents, **report.as_metadata(),
        "archive_documents_total": summary["documents"], "archive_bytes_total": summary["bytes"],
        "recent_jobs": dg.MetadataValue.md(archive.jobs_markdown(summary["jobs"])),
    })
