"""The asset graph: source_documents -> chunks -> embeddings -> vector_table -> hnsw_index -> serving_view.

Assets write to Postgres and the object store themselves and return metadata (no IO managers).
Every asset that writes a collection holds its writer lock (`vector_platform.locks`) while it
runs: a second writer of the same collection waits, says so in the run's log, and then does
only what is left.
"""

import os
from typing import Optional

import dagster as dg
from pydantic import Field

from vector_platform import catalog, tables
from vector_platform.defs.partitions import (
    collection_model_partitions,
    collection_partitions,
    partition_pairs,
    vector_backfill_policy,
)
from vector_platform.defs.resources import EmbedderResource, ObjectStoreResource, PostgresResource
from vector_platform.defs.writing import writing
from vector_platform.ingest import steps
from vector_platform.progress import notify, reporter
from vector_platform.upgrade import swap as swapping


def _attached_model(pool, collection: str, model_key: str):
    """The model spec, with a clear failure when this (collection, model) pair is not declared."""
    with pool.connection() as conn:
        coll = catalog.get_collection(conn, collection)
        if model_key not in coll.models:
            raise dg.Failure(
                f"model {model_key!r} is not attached to collection {collection!r} "
                f"(attached: {', '.join(coll.models) or 'none'})"
            )
        return coll, catalog.get_model(conn, model_key)


def for_each_partition(context: dg.AssetExecutionContext, work) -> dg.MaterializeResult:
    """Run `work(collection, model_key) -> metadata` for each partition of the run.

    One partition: its metadata. A backfill's range: each partition is tried; those that
    succeed are recorded as materialized on their own (so a retry of the backfill re-runs only
    the failed ones), and the step fails naming the partitions that failed and why.
    """
    pairs = partition_pairs(context)
    if len(pairs) == 1:
        return dg.MaterializeResult(metadata=work(*pairs[0]))
    done, failed = {}, {}
    for collection, model_key in pairs:
        try:
            done[(collection, model_key)] = work(collection, model_key)
        except Exception as err:  # noqa: BLE001 - the others still run; the step fails below
            context.log.error(f"{collection}|{model_key} failed: {err}")
            failed[(collection, model_key)] = err
    if failed:
        for (collection, model_key), metadata in done.items():
            context.log_event(dg.AssetMaterialization(
                asset_key=context.asset_key,
                partition=dg.MultiPartitionKey({"collection": collection, "model": model_key}),
                metadata=metadata,
            ))
        raise dg.Failure(
            f"{len(failed)} of {len(pairs)} partitions failed: "
            + "; ".join(f"{c}|{m}: {err}" for (c, m), err in failed.items()),
            allow_retries=False,
        )
    rows = sum(int(m.get("dagster/row_count", 0)) for m in done.values())
    return dg.MaterializeResult(metadata={
        "dagster/row_count": rows, "partitions": len(done),
        "per_partition": dg.MetadataValue.json({f"{c}|{m}": {k: v for k, v in meta.items() if isinstance(v, (int, float, str))}
                                                for (c, m), meta in done.items()}),
    })


class SourceConfig(dg.Config):
    allow_deletes: bool = Field(
        default=False,
        description="Apply the source even if it reads as empty or would soft-delete more than the "
        "collection's max_delete_fraction of its live documents.",
    )


@dg.asset(
    partitions_def=collection_partitions,
    group_name="ingest",
    kinds={"postgres"},
    pool="vector_db",
)
def source_documents(
    context: dg.AssetExecutionContext, config: SourceConfig, postgres: PostgresResource
) -> dg.MaterializeResult:
    """The collection's documents as read from its source (a folder or a JSONL file): one catalog
    row per document with its content hash and source timestamp. Documents that disappeared from
    the source are soft-deleted; unreadable ones become dead letters with the reason. A source
    that reads as missing or empty, or would delete more than max_delete_fraction of the
    documents, is refused and changes nothing (unless allow_deletes)."""
    collection = context.partition_key
    with writing(context, postgres, collection) as waited:
        try:
            figures = steps.register_documents(postgres.pool(), collection, allow_deletes=config.allow_deletes)
        except steps.SourceRefused as err:
            raise dg.Failure(str(err), allow_retries=False) from None
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": figures["live_documents"],
            "dagster/table_name": "vector_platform.documents",
            "seconds_waiting_for_writer_lock": round(waited, 3),
            **figures,
        }
    )


@dg.asset(
    partitions_def=collection_partitions,
    deps=[source_documents],
    group_name="ingest",
    kinds={"postgres"},
    pool="vector_db",
)
def chunks(
    context: dg.AssetExecutionContext, postgres: PostgresResource, embedder: EmbedderResource
) -> dg.MaterializeResult:
    """Token-aware chunks of every live document, cut with the serving model's own tokenizer
    (paragraph, then sentence, then word boundaries, up to the smallest max input of the
    collection's models, with overlap). Only documents whose content or chunking settings
    changed are re-chunked, in batches that each commit on their own."""
    collection = context.partition_key
    pool = postgres.pool()
    with writing(context, postgres, collection):
        # Settings are read under the lock: a `collections set` waits for this step, or this for it.
        with pool.connection() as conn:
            coll = catalog.get_collection(conn, collection)
            specs = [catalog.get_model(conn, key) for key in coll.models]
        serving = next(s for s in specs if s.key == coll.serving_model)
        max_tokens = coll.settings.chunk_max_tokens or min(s.max_tokens for s in specs)
        chunker = embedder.for_model(serving).make_chunker(max_tokens, coll.settings.chunk_overlap_tokens)
        figures = steps.chunk_documents(pool, collection, chunker, reporter(context.log))
    return dg.MaterializeResult(
        metadata={"dagster/row_count": figures["chunks_total"], "dagster/table_name": "vector_platform.chunks", **figures}
    )


@dg.asset(
    partitions_def=collection_model_partitions,
    deps=[chunks],
    group_name="vectors",
    kinds={"python", "parquet"},
    backfill_policy=vector_backfill_policy,
)
def embeddings(
    context: dg.AssetExecutionContext,
    postgres: PostgresResource,
    object_store: ObjectStoreResource,
    embedder: EmbedderResource,
) -> dg.MaterializeResult:
    """A valid, L2-normalised vector for every live chunk under this model, kept in the embedding
    cache (Parquet on the object store, keyed by the model's fingerprint and the chunk's content
    hash, indexed in the catalog). Only content with no vector yet is sent to the model;
    rejected vectors become dead letters with the reason."""
    pool = postgres.pool()
    store = object_store.cache_store()

    def work(collection: str, model_key: str) -> dict:
        _, spec = _attached_model(pool, collection, model_key)
        model = embedder.for_model(spec)
        with writing(context, postgres, collection, model_key):
            stats = steps.embed_chunks(
                pool, store, model, collection, model_key, batch_size=model.batch_size(embedder.batch_size),
                progress=reporter(context.log),
            )
        return {
            "dagster/row_count": stats.chunks,
            "cache": store.uri(f"embedding_cache/{spec.cache_fingerprint}"),
            "model_fingerprint": spec.fingerprint,
            **stats.as_metadata(),
        }

    return for_each_partition(context, work)


@dg.asset(
    partitions_def=collection_model_partitions,
    deps=[embeddings],
    group_name="vectors",
    kinds={"postgres", "pgvector"},
    pool="vector_db",
    backfill_policy=vector_backfill_policy,
)
def vector_table(
    context: dg.AssetExecutionContext, postgres: PostgresResource, object_store: ObjectStoreResource
) -> dg.MaterializeResult:
    """The pgvector table of one (collection, model): a row per live chunk with text, metadata,
    source timestamp and embedding, keyed by the deterministic chunk_id. Missing rows are
    loaded by binary COPY, one transaction per batch; rows of deleted or changed documents
    are removed."""
    pool = postgres.pool()

    def work(collection: str, model_key: str) -> dict:
        _, spec = _attached_model(pool, collection, model_key)
        with writing(context, postgres, collection, model_key):
            figures = steps.load_vectors(pool, object_store.cache_store(), collection, model_key, progress=reporter(context.log))
        return {
            "dagster/row_count": figures["rows"],
            "dagster/table_name": figures["table"],
            "model_fingerprint": spec.fingerprint,
            **figures,
        }

    return for_each_partition(context, work)


@dg.asset(
    partitions_def=collection_model_partitions,
    deps=[vector_table],
    group_name="vectors",
    kinds={"postgres", "pgvector"},
    pool="vector_db",
    backfill_policy=vector_backfill_policy,
)
def hnsw_index(context: dg.AssetExecutionContext, postgres: PostgresResource) -> dg.MaterializeResult:
    """The HNSW index on the vector table, built after the bulk load with the collection's m and
    ef_construction and maintenance_work_mem sized to the graph. Kept when its parameters are
    unchanged (upserts maintain it); rebuilt concurrently, the old one serving meanwhile, when
    they change. Every build is checked valid; an invalid leftover is dropped and rebuilt.
    Models over 2,000 dimensions are indexed as a halfvec expression."""
    pool = postgres.pool()

    def work(collection: str, model_key: str) -> dict:
        coll, spec = _attached_model(pool, collection, model_key)
        with writing(context, postgres, collection, model_key), pool.connection() as conn:
            table = catalog.vector_table_name(conn, collection, model_key)
            if not tables.table_exists(conn, table):
                raise dg.Failure(f"no vector table for {collection}/{model_key}: materialize vector_table first")
            report = tables.ensure_hnsw(
                conn, table, spec, coll.settings.hnsw_m, coll.settings.hnsw_ef_construction,
                max_work_mem_mb=int(os.environ.get("VP_HNSW_MAX_WORK_MEM_MB", "1024")),
            )
        return {
            "index": report.name,
            "action": report.action,
            "index_type": spec.index_type,
            "build_seconds": round(report.seconds, 3),
            "bytes": report.bytes,
            "dagster/row_count": report.rows,
            "m": coll.settings.hnsw_m,
            "ef_construction": coll.settings.hnsw_ef_construction,
            "maintenance_work_mem_mb": report.maintenance_work_mem_mb,
            "dropped_invalid_indexes": ", ".join(report.dropped_invalid) or "none",
        }

    return for_each_partition(context, work)


class ServingConfig(dg.Config):
    swap_to: Optional[str] = Field(
        default=None,
        description="Serve this model instead: an upgrade's shadow whose quality gate passed (refused otherwise, "
        "with the gate's numbers).",
    )
    rollback: bool = Field(default=False, description="Serve the previous model again (while its table is retained).")


@dg.asset(
    partitions_def=collection_partitions,
    deps=[hnsw_index],
    group_name="serving",
    kinds={"postgres"},
)
def serving_view(context: dg.AssetExecutionContext, config: ServingConfig, postgres: PostgresResource) -> dg.MaterializeResult:
    """What search reads for a collection: a view in schema vp_serving over the serving model's
    vector table, carrying the fingerprint of its vectors. A swap to an upgrade's shadow model
    (config swap_to) needs that model's quality gate to have passed; the view, the serving
    model and the swap's record change in one transaction, so readers see the old model or the
    new, never neither. `rollback` returns to the previous model while it is retained."""
    collection = context.partition_key
    pool = postgres.pool()
    if config.swap_to or config.rollback:
        if config.swap_to and config.rollback:
            raise dg.Failure("give swap_to or rollback, not both", allow_retries=False)

        def say(message: str) -> None:
            context.log.warning(message)
            notify(message)

        try:
            if config.rollback:
                report = swapping.rollback(pool, postgres.resolved_dsn(), collection, "dagster", context.run.run_id, say)
            else:
                report = swapping.swap(pool, postgres.resolved_dsn(), collection, config.swap_to, "dagster", context.run.run_id, say)
        except swapping.SwapRefused as err:
            raise dg.Failure(str(err), allow_retries=False) from None
        with pool.connection() as conn:
            table = catalog.vector_table_name(conn, collection, report.to_model)
            tier = catalog.get_collection(conn, collection).tier
        where = {"dagster/table_name": f"{catalog.SERVING}.{collection}", "vector_table": f"{catalog.VECTORS}.{table}"}
        if tier == "cold":  # no view or table: cold search reads the serving model's snapshot
            where = {"served_from": "the serving model's cold snapshot"}
        return dg.MaterializeResult(
            metadata={"dagster/row_count": report.rows, "serving_model": report.to_model, "tier": tier, **where,
                      **report.as_metadata()}
        )
    with writing(context, postgres, collection), pool.connection() as conn:
        coll = catalog.get_collection(conn, collection)
        table = catalog.vector_table_name(conn, collection, coll.serving_model)
        if not tables.table_exists(conn, table):
            raise dg.Failure(f"serving model {coll.serving_model!r} of {collection!r} has no vector table yet")
        with conn.transaction():
            tables.publish_view(conn, collection, table)
        rows, _ = tables.table_stats(conn, table)
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": rows,
            "dagster/table_name": f"{catalog.SERVING}.{collection}",
            "serving_model": coll.serving_model,
            "vector_table": f"{catalog.VECTORS}.{table}",
        }
    )
