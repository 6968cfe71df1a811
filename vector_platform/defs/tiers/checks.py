"""`snapshot_matches_table`: the newest snapshot holds exactly what the table holds."""

import dagster as dg

from vector_platform import checks
from vector_platform.defs.partitions import collection_and_model, collection_model_partitions
from vector_platform.defs.resources import ObjectStoreResource, PostgresResource
from vector_platform.defs.tiers.assets import cold_snapshot


@dg.asset_check(asset=cold_snapshot, partitions_def=collection_model_partitions)
def snapshot_matches_table(
    context: dg.AssetCheckExecutionContext, postgres: PostgresResource, object_store: ObjectStoreResource
) -> dg.AssetCheckResult:
    """Active: the table's rows and digest equal the newest receipt's and every file is on the
    store with its size. Cold: the serving snapshot read back in full matches its receipt
    (sha256 of every file, rows, chunk ids)."""
    collection, model_key = collection_and_model(context)
    figures = checks.snapshot_matches_table(postgres.pool(), object_store.store(), collection, model_key)
    return dg.AssetCheckResult(passed=not figures["problems"], metadata={**figures, "problems": "; ".join(figures["problems"]) or "none"})
