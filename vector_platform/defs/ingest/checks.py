"""Asset checks: the platform's guarantees, each measured on every materialization.

The logic lives in `vector_platform.checks`; this is the glue that turns figures into
results (the upgrade's quality gates are in `defs/upgrade/checks.py`). A backfill run covers a range of partitions: each
check then measures every partition and passes only if all do, with the figures per
partition in its metadata, and records each partition's own evaluation for the UI.
"""

import datetime as dt
import os

import dagster as dg

# Not exported by `dagster` itself; the type AssetCheckResult fills in for a single partition.
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData as TargetMaterialization,
)

from vector_platform import catalog, checks, clock, pictures
from vector_platform.defs.ingest.assets import embeddings, hnsw_index, vector_table
from vector_platform.defs.partitions import collection_model_partitions, partition_pairs
from vector_platform.defs.resources import ObjectStoreResource, PostgresResource


def combine(context, results: dict[str, tuple[bool, dict]], severity=dg.AssetCheckSeverity.ERROR) -> dg.AssetCheckResult:
    """One result: the partition's own, or for a range, all-passed with figures per partition."""
    if context.has_partition_key_range and not context.has_partition_key:
        _record_per_partition(context, results, severity)
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


def _record_per_partition(context, results: dict[str, tuple[bool, dict]], severity) -> None:
    """Each partition's own evaluation, logged against its partition and its materialization.

    Dagster records the result of a run over a partition range (a backfill run) against no
    partition, so the UI would show every partition's check as skipped ("0 / 1 Passed" in the
    lineage graph) although it ran and passed. The run's result (returned by the check) still
    decides whether a blocking check stops the run."""
    (spec,) = context.check_specs
    for partition, (passed, metadata) in results.items():
        context.op_execution_context.log_event(
            dg.AssetCheckEvaluation(
                asset_key=spec.asset_key, check_name=spec.name, passed=passed, metadata=metadata,
                severity=severity, blocking=spec.blocking, partition=partition,
                target_materialization_data=_latest_materialization(context, spec.asset_key, partition),
            )
        )


def _latest_materialization(context, asset_key: dg.AssetKey, partition: str) -> TargetMaterialization | None:
    """What the partition's evaluation was measured on (the UI counts it for that materialization)."""
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=asset_key, asset_partitions=[partition]), limit=1
    ).records
    if not records:
        return None
    return TargetMaterialization(storage_id=records[0].storage_id, run_id=records[0].run_id, timestamp=records[0].timestamp)


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
    return combine(context, results)


@dg.asset_check(asset=vector_table, blocking=True, partitions_def=collection_model_partitions)
def no_chunk_lost(context: dg.AssetCheckExecutionContext, postgres: PostgresResource) -> dg.AssetCheckResult:
    """Every chunk of every live document has a vector in the table or an open dead letter saying
    why, and the table holds no row without a live chunk behind it."""
    results = {}
    for collection, model_key in partition_pairs(context):
        figures = checks.count_lost_chunks(postgres.pool(), collection, model_key)
        results[f"{collection}|{model_key}"] = (figures["lost"] == 0 and figures["orphans"] == 0, figures)
    return combine(context, results)


RECALL_SAMPLE = 100  # queries per measurement


@dg.asset_check(asset=hnsw_index, partitions_def=collection_model_partitions)
def index_recall_meets_target(
    context: dg.AssetCheckExecutionContext, postgres: PostgresResource
) -> dg.AssetCheckResult:
    """recall@10 of the HNSW index against exact search, on a sample of the real queries logged
    in the last VP_RECALL_QUERY_DAYS (default 30) days, topped up with stored vectors (>= 100
    queries), at the collection's ef_search, meets the collection's recall target, and the
    query plan really uses the index. Also measured on the same queries: recall at other
    ef_search values (the trade-off curve). Each measurement is kept (recall_history): the
    metadata shows recall vs ef_search and recall over time. recall_monitoring_schedule runs this
    check weekly on each serving index, on a new sample of queries each week. While the table's
    rows, its indexes, ef_search and the logged queries it samples are all unchanged since the last
    measurement (a re-ingest that changed nothing), that measurement stands and is not taken
    again; the plan is explained anew every time. An empty table has nothing to miss and
    passes, saying so."""
    pool = postgres.pool()
    now = clock.now()
    since = now - dt.timedelta(days=float(os.environ.get("VP_RECALL_QUERY_DAYS", "30")))
    week = now.strftime("%G-W%V")  # a new sample of logged queries each ISO week
    results = {}
    for collection, model_key in partition_pairs(context):
        with pool.connection() as conn:
            settings = catalog.get_collection(conn, collection).settings
            ef = settings.hnsw_ef_search
            state = checks.recall_state(conn, collection, model_key, ef, RECALL_SAMPLE, since, week, settings.rerank_factor)
            reused = checks.measurement_of_state(conn, collection, model_key, state) if state else None
        if reused is not None:
            # Nothing it measured has changed since: its figures stand; the plan is explained anew.
            plan, uses_index = checks.current_plan(pool, collection, model_key, ef)
            figures = {**reused, "plan": plan, "uses_index": uses_index, **checks.storage_of(pool, collection, model_key)}
        else:
            figures = checks.measure_recall(
                pool, collection, model_key, ef_search=ef, sample=RECALL_SAMPLE,
                curve=sorted({10, 20, 40, ef // 2, ef, ef * 2} - {0}), logged_since=since, salt=week,
                rerank_factor=settings.rerank_factor,
            )
        if figures["recall"] is None:
            passed = True
        else:
            passed = figures["recall"] >= settings.recall_target and bool(figures["uses_index"])
            with pool.connection() as conn:
                if reused is None:
                    checks.record_recall(conn, collection, model_key, figures, now, state)
                history = checks.recall_history(conn, collection, model_key)
        metadata = {k: v for k, v in figures.items() if k not in ("plan", "curve", "measured_at") and v is not None}
        if reused is not None:
            metadata["measured"] = (f"{reused['measured_at'].astimezone(dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC, reused: the table's rows, its indexes, "
                                    "ef_search and the logged queries it samples are unchanged since")
        metadata["recall"] = figures["recall"] if figures["recall"] is not None else "no rows: nothing to measure"
        metadata.update(target=settings.recall_target, plan=dg.MetadataValue.md(f"```\n{figures['plan']}\n```"))
        if figures["recall"] is not None:
            metadata["recall_vs_ef_search"] = dg.MetadataValue.md(pictures.bar_table(
                ["ef_search", f"recall@{figures['k']}"], figures["curve"].items(), values=figures["curve"].values(), top=1.0))
            metadata["recall_over_time"] = dg.MetadataValue.md(pictures.bar_table(
                ["measured (UTC)", "recall", "ef_search", "queries (logged)"],
                [(f"{h['measured_at']:%Y-%m-%d %H:%M}", h["recall"], h["ef_search"], f"{h['queries']} ({h['queries_from_log']})")
                 for h in history], values=[h["recall"] for h in history], top=1.0))
        results[f"{collection}|{model_key}"] = (passed, metadata)
    return combine(context, results)
