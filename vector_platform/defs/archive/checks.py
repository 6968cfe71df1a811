"""`archive_reconciles` [collection]: what left Postgres is in the row archive, verified, and
nothing is both live and archived (logic: `vector_platform.archive.reconcile`)."""

import dagster as dg

from vector_platform.archive.reconcile import archive_reconciles as reconcile
from vector_platform.defs.archive.assets import row_archive
from vector_platform.defs.partitions import collection_partitions
from vector_platform.defs.resources import ObjectStoreResource, PostgresResource


@dg.asset_check(asset=row_archive, partitions_def=collection_partitions)
def archive_reconciles(
    context: dg.AssetCheckExecutionContext, postgres: PostgresResource, object_store: ObjectStoreResource
) -> dg.AssetCheckResult:
    """Every completed archival job deleted exactly the rows its receipts hold; every receipt's
    file is on the store at its size; no document is both live and archived; a sample of
    archived documents (1 %, at least 20) read back from Parquet hashes to its content_hash,
    with its chunks and vectors in its batch's files."""
    figures = reconcile(postgres.pool(), object_store.store(), context.partition_key)
    return dg.AssetCheckResult(
        passed=figures["problem_count"] == 0,
        metadata={**figures, "problems": "; ".join(figures["problems"]) or "none"},
    )
