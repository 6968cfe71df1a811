"""Asset checks: the platform's guarantees, each measured on every materialization.

The logic lives in `vector_platform.checks`; this is the glue that turns figures into results.
"""

import dagster as dg

from vector_platform import catalog, checks
from vector_platform.defs.ingest.assets import embeddings, hnsw_index, vector_table
from vector_platform.defs.partitions import collection_and_model, collection_model_partitions
from vector_platform.defs.resources import ObjectStoreResource, PostgresResource


@dg.asset_check(asset=embeddings, blocking=True, partitions_def=collection_model_partitions)
def embeddings_are_valid(
    context: dg.AssetCheckExecutionContext, postgres: PostgresResource, object_store: ObjectStoreResource
) -> dg.AssetCheckResult:
    """Every vector about to be loaded for the partition has the model's dimensions, is finite,
    and is unit length for cosine models. Blocking: a bad vector never reaches the table."""
    collection, model_key = collection_and_model(context)
    figures = checks.pending_vectors_are_valid(postgres.pool(), object_store.store(), collection, model_key)
    return dg.AssetCheckResult(
        passed=not figures["problems"],
        metadata={"vectors_checked": figures["vectors_checked"], "dims": figures["dims"], "problems": "; ".join(figures["problems"]) or "none"},
    )


@dg.asset_check(asset=vector_table, blocking=True, partitions_def=collection_model_partitions)
def no_chunk_lost(context: dg.AssetCheckExecutionContext, postgres: PostgresResource) -> dg.AssetCheckResult:
    """Every chunk of every live document has a vector in the table or an open dead letter saying
    why, and the table holds no row without a live chunk behind it."""
    collection, model_key = collection_and_model(context)
    figures = checks.count_lost_chunks(postgres.pool(), collection, model_key)
    return dg.AssetCheckResult(passed=figures["lost"] == 0 and figures["orphans"] == 0, metadata=figures)


@dg.asset_check(asset=hnsw_index, partitions_def=collection_model_partitions)
def index_recall_meets_target(
    context: dg.AssetCheckExecutionContext, postgres: PostgresResource
) -> dg.AssetCheckResult:
    """recall@10 of the HNSW index against exact search, on logged queries when there are enough
    and stored vectors otherwise (>= 100 queries), at the collection's ef_search, meets the
    collection's recall target, and the query plan really uses the index. Latency p50/p95 of
    both go in the metadata. An empty table has nothing to miss and passes, saying so."""
    collection, model_key = collection_and_model(context)
    pool = postgres.pool()
    with pool.connection() as conn:
        settings = catalog.get_collection(conn, collection).settings
    figures = checks.measure_recall(pool, collection, model_key, ef_search=settings.hnsw_ef_search, sample=100)
    if figures["recall"] is None:
        passed = True
    else:
        passed = figures["recall"] >= settings.recall_target and bool(figures["uses_index"])
    metadata = {k: v for k, v in figures.items() if k != "plan" and v is not None}
    metadata["recall"] = figures["recall"] if figures["recall"] is not None else "no rows: nothing to measure"
    return dg.AssetCheckResult(
        passed=passed,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={**metadata, "target": settings.recall_target, "plan": dg.MetadataValue.md(f"```\n{figures['plan']}\n```")},
    )
