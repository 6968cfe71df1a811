"""`snapshot_matches_table`: the newest snapshot holds exactly what the table holds."""

import dagster as dg

from vector_platform import checks
from vector_platform.defs.ingest.checks import combine
from vector_platform.defs.partitions import collection_model_partitions, partition_pairs
from vector_platform.defs.resources import ObjectStoreResource, PostgresResource
from vector_platform.defs.tiers.assets import cold_snapshot


@dg.asset_check(asset=cold_snapshot, partitions_def=collection_model_partitions)
def snapshot_matches_table(
    context: dg.AssetCheckExecutionContext, postgres: PostgresResource, object_store: ObjectStoreResource
) -> dg.AssetCheckResult:
    """Active: the table's rows and digest equal the newest receipt's and every file is on the
    store with its size. Cold: the serving snapshot read back in full matches its receipt
    (sha256 of every file, rows, chunk ids)."""
    results = {}
    for collection, model_key in partition_pairs(context):
        figures = checks.snapshot_matches_table(postgres.pool(), object_store.store(), collection, model_key)
        results[f"{collection}|{model_key}"] = (not figures["problems"], {**figures, "problems": "; ".join(figures["problems"]) or "none"})
    return combine(context, results)
