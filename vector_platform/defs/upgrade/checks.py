"""The quality gate of a model upgrade, as blocking asset checks (logic: `vector_platform.upgrade.gate`).

- `shadow_passes_quality_gate` on `hnsw_index`: an active collection's shadow table;
- `snapshot_passes_quality_gate` on `cold_snapshot`: a cold collection's new snapshot.

Each measures only the collection's upgrade target (`models upgrade` sets it); the serving
model, a previous one kept for rollback and other attached models pass with nothing to
measure. Every result is recorded in the catalog, and the swap to a model is refused unless
its latest result passed.
"""

import dagster as dg

from vector_platform import catalog
from vector_platform.catalog import upgrades as upgrade_sql
from vector_platform.defs.ingest.assets import hnsw_index
from vector_platform.defs.ingest.checks import combine
from vector_platform.defs.partitions import collection_model_partitions, partition_pairs
from vector_platform.defs.resources import EmbedderResource, ObjectStoreResource, PostgresResource
from vector_platform.defs.tiers.assets import cold_snapshot
from vector_platform.upgrade import gate


def _gate(context, postgres: PostgresResource, embedder: EmbedderResource, tier: str, store=None) -> dg.AssetCheckResult:
    pool = postgres.pool()

    def embed(spec, texts):
        return embedder.for_model(spec).embed(list(texts))

    results = {}
    for collection, model_key in partition_pairs(context):
        with pool.connection() as conn:
            state = upgrade_sql.upgrade_state(conn, collection)
            current_tier = catalog.get_collection(conn, collection).tier
        key = f"{collection}|{model_key}"
        if model_key == state.serving_model:
            results[key] = (True, {"role": "serving", "gate": "the serving model: nothing to gate"})
        elif model_key == state.previous_model:
            results[key] = (True, {"role": "previous", "gate": "kept for rollback: it served before"})
        elif model_key != state.upgrade_to:
            results[key] = (True, {"role": "attached", "gate": "not an upgrade target (models upgrade makes it one)"})
        elif current_tier != tier:  # moved between the asset and its check: nothing here to measure
            other = "shadow_passes_quality_gate" if current_tier == "active" else "snapshot_passes_quality_gate"
            results[key] = (False, {"role": "shadow", "gate": f"not measured: the collection is {current_tier} now; "
                                    f"run models upgrade again ({other} gates it there)"})
        else:
            try:
                recorded = gate.run_gate(pool, embed, collection, model_key, run_id=context.run.run_id, store=store)
            except Exception as err:  # noqa: BLE001 - one partition's failure (its model's API down) leaves the others measured
                context.log.error(f"quality gate of {key} could not be measured: {err.__class__.__name__}: {err}")
                results[key] = (False, {"role": "shadow", "gate": f"not measured: {err.__class__.__name__}: {str(err)[:300]}; "
                                        "models retry measures it again"})
                continue
            metadata = {"role": "shadow", "gate_id": recorded.id, "summary": recorded.summary(),
                        "reasons": "; ".join(recorded.reasons) or "none",
                        **{k: v for k, v in recorded.figures.items() if v is not None}}
            results[key] = (recorded.passed, metadata)
    return combine(context, results)


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
    return _gate(context, postgres, embedder, "active")


@dg.asset_check(asset=cold_snapshot, blocking=True, partitions_def=collection_model_partitions)
def snapshot_passes_quality_gate(
    context: dg.AssetCheckExecutionContext,
    postgres: PostgresResource,
    embedder: EmbedderResource,
    object_store: ObjectStoreResource,
) -> dg.AssetCheckResult:
    """For a cold collection's upgrade target: its new snapshot against the serving snapshot,
    both searched exactly as cold search does: nDCG@10 on labelled queries no worse than the
    serving model's by more than upgrade_ndcg_margin, search p95 within upgrade_latency_factor;
    overlap@10 reported. Recorded in the catalog; the swap is refused unless it passed."""
    return _gate(context, postgres, embedder, "cold", store=object_store.store())
