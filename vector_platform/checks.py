"""The logic of every asset check, as plain functions (the Dagster glue is in `defs/`).

- `pending_vectors_are_valid`  -> embeddings_are_valid (blocking)
- `count_lost_chunks`          -> no_chunk_lost (blocking)
- `measure_recall`             -> index_recall_meets_target (each measurement kept by `record_recall`)
- `snapshot_matches_table`     -> snapshot_matches_table
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any, Sequence

import numpy as np
from psycopg import sql
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from vector_platform import catalog, tables
from vector_platform.catalog import documents as docs_sql
from vector_platform.catalog.queries import logged_query_vectors, logged_sample_digest
from vector_platform.ingest import embedding_cache
from vector_platform.ingest.validation import check_matrix
from vector_platform.metrics import percentile, recall_at_k
from vector_platform.object_store import ObjectStore
from vector_platform.search import active


def pending_vectors_are_valid(
    pool: ConnectionPool, store: ObjectStore, collection: str, model_key: str, page_rows: int = 20_000
) -> dict[str, Any]:
    """The vectors about to be loaded (cached, for chunks with no row yet): right dimensions,
    finite, unit length for cosine models. Read in pages, as the load will read them."""
    with pool.connection() as conn:
        spec = catalog.get_model(conn, model_key)
        tid = tables.existing_table_id(conn, catalog.vector_table_name(conn, collection, model_key))
    checked = 0
    problems: list[str] = []
    for page in docs_sql.pages_of_missing_chunks(pool, collection, tid, page_rows):
        found = embedding_cache.lookup(pool, store, spec.fingerprint, {r[3] for r in page})
        if found:
            problems += check_matrix(np.vstack(list(found.values())), spec.dims, unit=spec.normalise)
            checked += len(found)
    return {"vectors_checked": checked, "dims": spec.dims, "problems": problems}


def count_lost_chunks(pool: ConnectionPool, collection: str, model_key: str) -> dict[str, int]:
    """Live chunks with neither a vector nor an open dead letter, and rows with no live chunk."""
    with pool.connection() as conn:
        table = catalog.vector_table_name(conn, collection, model_key)
        dead = catalog.count_open(conn, collection, model_key)
        if not tables.table_exists(conn, table):
            live = docs_sql.count_chunks_missing(conn, collection, None)
            return {"lost": live, "orphans": 0, "live_chunks": live, "dead_letters": dead, "table_exists": False}
        figures = docs_sql.count_lost(conn, collection, model_key, tables.table_id(table))
    return {**figures, "dead_letters": dead, "table_exists": True}


def measure_recall(
    pool: ConnectionPool,
    collection: str,
    model_key: str,
    ef_search: int,
    k: int = 10,
    sample: int = 100,
    seed: int = 7,
    queries: list[np.ndarray] | None = None,
    curve: Sequence[int] = (),
    logged_since: dt.datetime | None = None,
    salt: str = "",
    rerank_factor: int | None = None,
) -> dict[str, Any]:
    """recall@k of the HNSW index vs exact search on real logged queries, topped up with stored vectors.

    `queries`: query vectors to use instead of the ones logged for this model (a shadow model
    has none logged: its gate passes the logged texts embedded with it). `logged_since`, `salt`:
    which logged queries (`logged_query_vectors`). `curve`: more ef_search values to measure on
    the same queries against the same exact answers (figures["curve"]: {ef_search: recall}).
    `rerank_factor`: a binary-stored model's candidates per result (default: the collection's
    setting). The figures say the storage type and the bytes per vector it costs."""
    with pool.connection() as conn:
        spec = catalog.get_model(conn, model_key)
        if rerank_factor is None:
            rerank_factor = catalog.get_collection(conn, collection).settings.rerank_factor
        table = catalog.vector_table_name(conn, collection, model_key)
        relation = tables.table_id(table)
        if queries is not None:
            queries = list(queries[:sample])
        else:
            queries = logged_query_vectors(conn, collection, model_key, sample, since=logged_since, salt=salt)
        from_log = len(queries)
        if len(queries) < sample:
            with conn.transaction():
                conn.execute("SELECT setseed(%s)", (seed / 100,))
                stored = conn.execute(
                    sql.SQL("SELECT embedding FROM {} ORDER BY random() LIMIT %s").format(relation),
                    (sample - len(queries),),
                ).fetchall()
            queries += [np.asarray(r[0].to_numpy() if hasattr(r[0], "to_numpy") else r[0], np.float32) for r in stored]
        plan = active.explain_nearest(conn, relation, spec, queries[0], exact=False, ef_search=ef_search) if queries else ""
        storage = tables.bytes_per_vector(conn, table)
        recalls, ann_ms, exact_ms = [], [], []
        at_ef: dict[int, list[float]] = {ef: [] for ef in curve if ef != ef_search}
        for q in queries:
            t0 = time.perf_counter()
            ann = active.nearest(conn, relation, spec, q, k, exact=False, ef_search=ef_search, columns=sql.SQL("chunk_id"),
                                 rerank_factor=rerank_factor)
            t1 = time.perf_counter()
            truth = active.nearest(conn, relation, spec, q, k, exact=True, columns=sql.SQL("chunk_id"))
            t2 = time.perf_counter()
            truth_ids = [r[0] for r in truth]
            recalls.append(recall_at_k([r[0] for r in ann], truth_ids, k))
            ann_ms.append((t1 - t0) * 1000)
            exact_ms.append((t2 - t1) * 1000)
            for ef, found in at_ef.items():
                other = active.nearest(conn, relation, spec, q, k, exact=False, ef_search=ef, columns=sql.SQL("chunk_id"),
                                       rerank_factor=rerank_factor)
                found.append(recall_at_k([r[0] for r in other], truth_ids, k))
    measured = {ef: float(np.mean(found)) for ef, found in at_ef.items() if found}
    if recalls and curve:
        measured[ef_search] = float(np.mean(recalls))
    return {
        "curve": dict(sorted(measured.items())),
        "recall": float(np.mean(recalls)) if recalls else None,
        "queries": len(queries),
        "queries_from_log": from_log,
        "ef_search": ef_search,
        "k": k,
        "ann_p50_ms": percentile(ann_ms, 50),
        "ann_p95_ms": percentile(ann_ms, 95),
        "exact_p50_ms": percentile(exact_ms, 50),
        "exact_p95_ms": percentile(exact_ms, 95),
        "uses_index": "Index Scan" in plan and "hnsw" in plan.lower() if queries else None,
        "plan": plan,
        "storage_type": spec.storage_type,
        **({"rerank_factor": rerank_factor} if spec.reranked else {}),
        **storage,
    }


def storage_of(pool: ConnectionPool, collection: str, model_key: str) -> dict[str, Any]:
    """The storage type of a (collection, model) table and what a vector costs in it (see
    tables.bytes_per_vector): the figures a recall measurement carries, measured now."""
    with pool.connection() as conn:
        spec = catalog.get_model(conn, model_key)
        table = catalog.vector_table_name(conn, collection, model_key)
        return {"storage_type": spec.storage_type, **tables.bytes_per_vector(conn, table)}


def current_plan(pool: ConnectionPool, collection: str, model_key: str, ef_search: int) -> tuple[str, bool | None]:
    """(plan, uses_index) of an ANN search of the table now, for a stored vector ("" and None
    for an empty table)."""
    with pool.connection() as conn:
        spec = catalog.get_model(conn, model_key)
        relation = tables.table_id(catalog.vector_table_name(conn, collection, model_key))
        row = conn.execute(sql.SQL("SELECT embedding FROM {} LIMIT 1").format(relation)).fetchone()
        if row is None:
            return "", None
        vector = np.asarray(row[0].to_numpy() if hasattr(row[0], "to_numpy") else row[0], np.float32)
        plan = active.explain_nearest(conn, relation, spec, vector, exact=False, ef_search=ef_search)
    return plan, "Index Scan" in plan and "hnsw" in plan.lower()


def snapshot_matches_table(pool: ConnectionPool, store: ObjectStore, collection: str, model_key: str) -> dict[str, Any]:
    """Active: the newest snapshot's rows and digest equal the table's, its files are present.
    Cold: the snapshot that serves the collection, read back in full, matches its receipt."""
    from vector_platform.catalog import tiers as tier_sql
    from vector_platform.tiers import snapshots

    problems: list[str] = []
    with pool.connection() as conn:
        tier = catalog.get_collection(conn, collection).tier
        table = catalog.vector_table_name(conn, collection, model_key)
        if tier == "cold":
            serving = tier_sql.cold_snapshots(conn, collection).get(model_key)
            receipt = tier_sql.get_snapshot(conn, serving) if serving else None
            table_rows = None
        else:
            receipt = tier_sql.latest_snapshot(conn, collection, model_key)
            table_rows, digest = snapshots.table_digest(conn, table) if tables.table_exists(conn, table) else (None, None)
    if receipt is None:
        return {"tier": tier, "snapshot_id": None, "problems": ["no snapshot recorded"]}
    try:
        if tier == "cold":
            snapshots.verify_receipt(store, receipt)
        else:
            snapshots.verify_present(store, receipt)
            if table_rows is None:
                problems.append(f"the table {table} does not exist")
            elif digest != receipt.table_digest:
                problems.append(f"the table changed since snapshot {receipt.id} ({table_rows} rows now, {receipt.rows} in the snapshot)")
    except snapshots.SnapshotError as err:
        problems.append(str(err))
    return {
        "tier": tier,
        "snapshot_id": receipt.id,
        "snapshot_rows": receipt.rows,
        "table_rows": table_rows if table_rows is not None else "no table",
        "full_read_back": tier == "cold",
        "problems": problems,
    }


def recall_state(
    conn, collection: str, model_key: str, ef_search: int, sample: int, logged_since: dt.datetime | None, salt: str,
    rerank_factor: int | None = None,
) -> str | None:
    """What a recall measurement (`measure_recall` with these arguments) measures: the table's
    rows (count and digest: any row added, removed or rewritten changes it), its valid indexes
    (a rebuilt index is a new one), the ef_search (and a binary model's rerank factor) and the
    logged queries it would sample.
    None when the table does not exist."""
    from vector_platform.tiers.snapshots import table_digest

    table = catalog.vector_table_name(conn, collection, model_key)
    if not tables.table_exists(conn, table):
        return None
    _, digest = table_digest(conn, table)
    indexes = conn.execute(
        "SELECT coalesce(string_agg(indexrelid::text, ',' ORDER BY indexrelid), '') FROM pg_index "
        "WHERE indisvalid AND indrelid = (SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s)",
        (catalog.VECTORS, table),
    ).fetchone()[0]
    logged = logged_sample_digest(conn, collection, model_key, sample, since=logged_since, salt=salt)
    rerank = f"; rerank_factor {rerank_factor}" if catalog.get_model(conn, model_key).reranked else ""
    return f"rows {digest}; indexes {indexes}; ef_search {ef_search}{rerank}; sample {sample} {salt} logged {logged}"


def measurement_of_state(conn, collection: str, model_key: str, state: str) -> dict[str, Any] | None:
    """The latest kept measurement taken in exactly `state` (see recall_state), if any."""
    row = conn.execute(
        """
        SELECT measured_at, recall, k, ef_search, queries, queries_from_log, ann_p95_ms, curve, uses_index
        FROM vector_platform.recall_history
        WHERE collection = %s AND model_key = %s AND measured_state = %s
        ORDER BY measured_at DESC, id DESC LIMIT 1
        """,
        (collection, model_key, state),
    ).fetchone()
    if row is None:
        return None
    keys = ("measured_at", "recall", "k", "ef_search", "queries", "queries_from_log", "ann_p95_ms", "curve", "uses_index")
    found = dict(zip(keys, row))
    found["curve"] = {int(ef): r for ef, r in (found["curve"] or {}).items()}
    return found


def record_recall(conn, collection: str, model_key: str, figures: dict[str, Any], at: dt.datetime, state: str | None = None) -> None:
    """Keep one measurement of `measure_recall` in recall_history (recall over time, vp_recall),
    with the `recall_state` it was taken in."""
    if figures.get("recall") is None:
        return
    conn.execute(
        """
        INSERT INTO vector_platform.recall_history
            (collection, model_key, measured_at, recall, k, ef_search, queries, queries_from_log, ann_p95_ms, curve,
             measured_state, uses_index)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
        """,
        (collection, model_key, at, figures["recall"], figures["k"], figures["ef_search"], figures["queries"],
         figures["queries_from_log"], figures.get("ann_p95_ms"), Jsonb({str(ef): r for ef, r in figures.get("curve", {}).items()}),
         state, figures.get("uses_index")),
    )


def recall_history(conn, collection: str, model_key: str, limit: int = 12) -> list[dict[str, Any]]:
    """The latest measurements of an index, oldest first."""
    rows = conn.execute(
        """
        SELECT measured_at, recall, ef_search, queries, queries_from_log FROM (
            SELECT * FROM vector_platform.recall_history WHERE collection = %s AND model_key = %s
            ORDER BY measured_at DESC, id DESC LIMIT %s) latest
        ORDER BY measured_at, id
        """,
        (collection, model_key, limit),
    ).fetchall()
    return [dict(zip(("measured_at", "recall", "ef_search", "queries", "queries_from_log"), r)) for r in rows]
