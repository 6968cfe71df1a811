"""The asset graph: source_documents -> chunks -> embeddings -> vector_table -> hnsw_index -> serving_view.

Assets write to Postgres and the object store themselves and return metadata (no IO managers).
"""


import dagster as dg

from vector_platform import catalog, pipeline, vector_sql
from vector_platform.defs.partitions import (
    collection_and_model,
    collection_model_partitions,
    collection_partitions,
)
from vector_platform.progress import reporter
from vector_platform.resources import EmbedderResource, ObjectStoreResource, PostgresResource


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


@dg.asset(
    partitions_def=collection_partitions,
    group_name="ingest",
    kinds={"postgres"},
    pool="vector_db",
)
def source_documents(context: dg.AssetExecutionContext, postgres: PostgresResource) -> dg.MaterializeResult:
    """The collection's documents as read from its source (a folder or a JSONL file): one catalog
    row per document with its content hash and source timestamp. Documents that disappeared from
    the source are soft-deleted; unreadable ones become dead letters with the reason."""
    figures = pipeline.register_documents(postgres.pool(), context.partition_key)
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": figures["live_documents"],
            "dagster/table_name": "vector_platform.documents",
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
    collection's models, with overlap). Only documents whose content changed are re-chunked."""
    collection = context.partition_key
    pool = postgres.pool()
    with pool.connection() as conn:
        coll = catalog.get_collection(conn, collection)
        specs = [catalog.get_model(conn, key) for key in coll.models]
    serving = next(s for s in specs if s.key == coll.serving_model)
    max_tokens = coll.settings.chunk_max_tokens or min(s.max_tokens for s in specs)
    chunker = embedder.chunker(serving, max_tokens, coll.settings.chunk_overlap_tokens)
    figures = pipeline.chunk_documents(pool, collection, chunker, reporter(context.log))
    return dg.MaterializeResult(
        metadata={"dagster/row_count": figures["chunks_total"], "dagster/table_name": "vector_platform.chunks", **figures}
    )


@dg.asset(
    partitions_def=collection_model_partitions,
    deps=[chunks],
    group_name="vectors",
    kinds={"python", "parquet"},
)
def embeddings(
    context: dg.AssetExecutionContext,
    postgres: PostgresResource,
    object_store: ObjectStoreResource,
    embedder: EmbedderResource,
) -> dg.MaterializeResult:
    """A valid, L2-normalised vector for every live chunk under this model, kept in the embedding
    cache (Parquet on the object store, keyed by model + chunk content hash). Only content with
    no vector yet is sent to the model; rejected vectors become dead letters with the reason."""
    collection, model_key = collection_and_model(context)
    pool = postgres.pool()
    _, spec = _attached_model(pool, collection, model_key)
    store = object_store.store()
    model = embedder.for_model(spec)
    stats = pipeline.embed_chunks(
        pool, store, model, collection, model_key, batch_size=embedder.batch_size_for(model), progress=reporter(context.log)
    )
    return dg.MaterializeResult(
        metadata={"dagster/row_count": stats.chunks, "cache": store.uri(f"embedding_cache/{model_key}"), **stats.as_metadata()}
    )


@dg.asset(
    partitions_def=collection_model_partitions,
    deps=[embeddings],
    group_name="vectors",
    kinds={"postgres", "pgvector"},
    pool="vector_db",
)
def vector_table(
    context: dg.AssetExecutionContext, postgres: PostgresResource, object_store: ObjectStoreResource
) -> dg.MaterializeResult:
    """The pgvector table of one (collection, model): a row per live chunk with text, metadata,
    source timestamp and embedding, keyed by the deterministic chunk_id. Loaded by binary COPY
    into a staging table and upserted; rows of deleted or changed documents are removed."""
    collection, model_key = collection_and_model(context)
    pool = postgres.pool()
    _attached_model(pool, collection, model_key)
    figures = pipeline.load_vectors(pool, object_store.store(), collection, model_key)
    return dg.MaterializeResult(
        metadata={"dagster/row_count": figures["rows"], "dagster/table_name": figures["table"], **figures}
    )


@dg.asset(
    partitions_def=collection_model_partitions,
    deps=[vector_table],
    group_name="vectors",
    kinds={"postgres", "pgvector"},
    pool="vector_db",
)
def hnsw_index(context: dg.AssetExecutionContext, postgres: PostgresResource) -> dg.MaterializeResult:
    """The HNSW index on the vector table, built after the bulk load with the collection's m and
    ef_construction and maintenance_work_mem sized to the graph. Kept when its parameters are
    unchanged (upserts maintain it); rebuilt concurrently when they change."""
    collection, model_key = collection_and_model(context)
    pool = postgres.pool()
    coll, spec = _attached_model(pool, collection, model_key)
    with pool.connection() as conn:
        table = catalog.vector_table_name(conn, collection, model_key)
        if not vector_sql.table_exists(conn, table):
            raise dg.Failure(f"no vector table for {collection}/{model_key}: materialize vector_table first")
        conn.commit()
        conn.autocommit = True  # CREATE INDEX CONCURRENTLY cannot run in a transaction
        try:
            report = vector_sql.ensure_hnsw(conn, table, spec, coll.settings.hnsw_m, coll.settings.hnsw_ef_construction)
        finally:
            conn.autocommit = False
    return dg.MaterializeResult(
        metadata={
            "index": report.name,
            "action": report.action,
            "build_seconds": round(report.seconds, 3),
            "bytes": report.bytes,
            "dagster/row_count": report.rows,
            "m": coll.settings.hnsw_m,
            "ef_construction": coll.settings.hnsw_ef_construction,
            "maintenance_work_mem_mb": report.maintenance_work_mem_mb,
        }
    )


@dg.asset(
    partitions_def=collection_partitions,
    deps=[hnsw_index],
    group_name="serving",
    kinds={"postgres"},
)
def serving_view(context: dg.AssetExecutionContext, postgres: PostgresResource) -> dg.MaterializeResult:
    """What search reads for a collection: a view in schema vp_serving over the serving model's
    vector table, replaced atomically in one transaction when the serving model changes."""
    collection = context.partition_key
    with postgres.pool().connection() as conn:
        coll = catalog.get_collection(conn, collection)
        table = catalog.vector_table_name(conn, collection, coll.serving_model)
        if not vector_sql.table_exists(conn, table):
            raise dg.Failure(f"serving model {coll.serving_model!r} of {collection!r} has no vector table yet")
        with conn.transaction():
            vector_sql.publish_view(conn, collection, table)
        rows = conn.execute(
            vector_sql.sql.SQL("SELECT count(*) FROM {}").format(vector_sql.view_id(collection))
        ).fetchone()[0]
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": rows,
            "dagster/table_name": f"{catalog.SERVING}.{collection}",
            "serving_model": coll.serving_model,
            "vector_table": f"{catalog.VECTORS}.{table}",
        }
    )
