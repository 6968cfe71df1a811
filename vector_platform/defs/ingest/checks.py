"""Asset checks: the platform's guarantees, each measured on every materialization.

The logic lives in `vector_platform.checks` (and `vector_platform.upgrade.gate`); this is the
glue that turns figures into results. A backfill run covers a range of partitions: each
check then measures every partition and passes only if all do, with the figures per
partition in its metadata.
"""

import dagster as dg

from vector_platform import catalog, checks
from vector_platform.catalog import upgrades as upgrade_sql
from vector_platform.defs.ingest.assets import embeddings, hnsw_index, vector_table
from vector_platform.defs.partitions import collection_model_partitions, partition_pairs
from vector_platform.defs.resources import EmbedderResource, ObjectStoreResource, PostgresResource
from vector_platform.upgrade import gate


def _combine(context, results: dict[str, tuple[bool, dict]], severity=dg.AssetCheckSeverity.ERROR) -> dg.AssetCheckResult:
    """One result: the partition's own, or for a range, all-passed with figures per partition."""
    if len(results) == 1:
        passed, metadata = next(iter(results.values()))
        return dg.AssetCheckResult(passed=passed, metadata=metadata, severity=severity)
    failed = [key for key, (passed, _) in results.items() if not passed]
    return dg.AssetCheckResult(
        passed=not failed,
        severity=severity,
        metadata={
            "partitions": len(results),
            "failed_partitions": ", ".join(failed) or "none",
            "per_partition": dg.MetadataValue.json(
                {key: {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v)) for k, v in meta.items()}
                 for key, (_, meta) in results.items()}
            ),
        },
    )


@dg.asset_check(asset=embeddings, blocking=True, partitions_def=collection_model_partitions)
def embeddings_are_valid(
    context: dg.AssetCheckExecutionContext, postgres: PostgresResource, object_store: ObjectStoreResource
) -> dg.AssetCheckResult:
    """Every vector about to be loaded for the partition has the model's dimensions, is finite,
    and is unit length for cosine models. Blocking: a bad vector never reaches the table."""
    results = {}
    for collection, model_key in partition_pairs(context):
        figures = checks.pending_vectors_are_valid(postgres.pool(), object_store.store(), collection, model_key)
        results[f"{collection}|{model_key}"] = (
            not figures["problems"],
            {"vectors_checked": figures["vectors_checked"], "dims": figures["dims"], "problems": "; ".join(figures["problems"]) or "none"},
        )
    return _combine(context, results)


@dg.asset_check(asset=vector_table, blocking=True, partitions_def=collection_model_partitions)
def no_chunk_lost(context: dg.AssetCheckExecutionContext, postgres: PostgresResource) -> dg.AssetCheckResult:
    """Every chunk of every live document has a vector in the table or an open dead letter saying
    why, and the table holds no row without a live chunk behind it."""
    results = {}
    for collection, model_key in partition_pairs(context):
        figures = checks.count_lost_chunks(postgres.pool(), collection, model_key)
        results[f"{collection}|{model_key}"] = (figures["lost"] == 0 and figures["orphans"] == 0, figures)
    return _combine(context, results)


@dg.asset_check(asset=hnsw_index, partitions_def=collection_model_partitions)
def index_recall_meets_target(
    context: dg.AssetCheckExecutionContext, postgres: PostgresResource
) -> dg.AssetCheckResult:
    """recall@10 of the HNSW index against exact search, on logged queries when there are enough
    and stored vectors otherwise (>= 100 queries), at the collection's ef_search, meets the
    collection's recall target, and the query plan really uses the index. Latency p50/p95 of
    both go in the metadata. An empty table has nothing to miss and passes, saying so."""
    pool = postgres.pool()
    results = {}
    for collection, model_key in partition_pairs(context):
        with pool.connection() as conn:
            settings = catalog.get_collection(conn, collection).settings
        figures = checks.measure_recall(pool, collection, model_key, ef_search=settings.hnsw_ef_search, sample=100)
        if figures["recall"] is None:
            passed = True
        else:
            passed = figures["recall"] >= settings.recall_target and bool(figures["uses_index"])
        metadata = {k: v for k, v in figures.items() if k != "plan" and v is not None}
        metadata["recall"] = figures["recall"] if figures["recall"] is not None else "no rows: nothing to measure"
        metadata.update(target=settings.recall_target, plan=dg.MetadataValue.md(f"```\n{figures['plan']}\n```"))
        results[f"{collection}|{model_key}"] = (passed, metadata)
    return _combine(context, results)


@dg.asset_check(asset=hnsw_index, blocking=True, partitions_def=collection_model_partitions)
def shadow_passes_quality_gate(
    context: dg.AssetCheckExecutionContext, postgres: PostgresResource, embedder: EmbedderResource
) -> dg.AssetCheckResult:
    """For an upgrade's shadow model (attached by `models upgrade`, not serving yet): recall@10
    vs exact on real logged queries >= the recall target, nDCG@10 on labelled queries no worse
    than the serving model's by more than upgrade_ndcg_margin, search p95 within
    upgrade_latency_factor of the serving model's; overlap@10 with the serving model reported.
    The result is recorded in the catalog, and the swap to this model is refused unless the
    latest result passed. The serving model, and a previous one kept for rollback, pass with
    nothing to measure."""
    pool = postgres.pool()

    def embed(spec, texts):
        return embedder.for_model(spec).embed(list(texts))

    results = {}
    for collection, model_key in partition_pairs(context):
        with pool.connection() as conn:
            state = upgrade_sql.upgrade_state(conn, collection)
        key = f"{collection}|{model_key}"
        if model_key == state.serving_model:
            results[key] = (True, {"role": "serving", "gate": "the serving model: nothing to gate"})
            continue
        if model_key == state.previous_model:
            results[key] = (True, {"role": "previous", "gate": "kept for rollback: it served before"})
            continue
        if model_key != state.upgrade_to:
            results[key] = (True, {"role": "attached", "gate": "not an upgrade target (models upgrade makes it one)"})
            continue
        recorded = gate.run_gate(pool, embed, collection, model_key, run_id=context.run.run_id)
        metadata = {"role": "shadow", "gate_id": recorded.id, "summary": recorded.summary(),
                    "reasons": "; ".join(recorded.reasons) or "none",
                    **{k: v for k, v in recorded.figures.items() if v is not None}}
        results[key] = (recorded.passed, metadata)
    return _combine(context, results)
