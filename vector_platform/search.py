"""Search across collections: embed the query once per model, ask each collection, merge.

Every hit carries `source_tier`; stats say hits and latency per tier; warnings say what was
skipped. Every query updates the collection's `last_queried_at` and the query log.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
from psycopg import sql
from psycopg_pool import ConnectionPool

from vector_platform import catalog, clock, vector_sql
from vector_platform.metrics import percentile, recall_at_k
from vector_platform.models import ModelSpec

QueryEmbedder = Callable[[ModelSpec, str], np.ndarray]


@dataclass
class Hit:
    collection: str
    chunk_id: str
    doc_id: str
    score: float
    text: str
    metadata: dict[str, Any]
    source_tier: str

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class SearchResult:
    query: str | None
    hits: list[Hit]
    stats: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"query": self.query, "hits": [h.as_json() for h in self.hits], "stats": self.stats, "warnings": self.warnings}


def search(
    pool: ConnectionPool,
    embed_query: QueryEmbedder,
    collections: Sequence[str],
    query: str | None = None,
    vector: Sequence[float] | None = None,
    k: int = 10,
    exact: bool = False,
    filters: dict[str, Any] | None = None,
    log_query: bool = True,
) -> SearchResult:
    if (query is None) == (vector is None):
        raise ValueError("give either a query text or a vector")
    if not collections:
        raise ValueError("name at least one collection")
    if not 1 <= k <= 1000:
        raise ValueError(f"k must be between 1 and 1000, got {k}")
    result = SearchResult(query=query, hits=[])
    per_tier: dict[str, dict[str, float]] = {}
    vectors: dict[str, np.ndarray] = {}
    logged: list[tuple] = []
    with pool.connection() as conn:
        catalog.bootstrap(conn)
        for name in dict.fromkeys(collections):
            coll = catalog.get_collection(conn, name, missing_ok=True)
            if coll is None:
                result.warnings.append(f"unknown collection {name!r} skipped")
                continue
            if coll.tier != "active":
                result.warnings.append(f"collection {name!r} is {coll.tier}; only active collections are searched")
                continue
            if coll.serving_model is None or not _view_exists(conn, name):
                result.warnings.append(f"collection {name!r} has no serving view yet; ingest it first")
                continue
            spec = catalog.get_model(conn, coll.serving_model)
            if spec.key not in vectors:
                vectors[spec.key] = _query_vector(spec, query, vector, embed_query)
            qvec = vectors[spec.key]
            began = time.perf_counter()
            rows = vector_sql.nearest(
                conn, vector_sql.view_id(name), spec, qvec, k, exact, coll.settings.hnsw_ef_search, filters
            )
            elapsed = (time.perf_counter() - began) * 1000
            tier = per_tier.setdefault("active", {"hits": 0, "latency_ms": 0.0, "collections": 0})
            tier["hits"] += len(rows)
            tier["latency_ms"] += elapsed
            tier["collections"] += 1
            for chunk_id, doc_id, text, metadata, distance in rows:
                score = vector_sql.score_from_distance(spec, float(distance))
                result.hits.append(Hit(name, str(chunk_id), doc_id, score, text, metadata, "active"))
            logged.append((name, spec.key, "exact" if exact else "ann", k, elapsed, len(rows), query, qvec))
        if logged:
            with conn.transaction():
                catalog.touch_queried(conn, [entry[0] for entry in logged])
                if log_query:
                    now = clock.now()
                    with conn.cursor() as cur:
                        cur.executemany(
                            """
                            INSERT INTO vector_platform.query_stats
                                (collection, model_key, mode, k, latency_ms, hits, query_text, query_vector, queried_at)
                            VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
                            """,
                            [(*entry, now) for entry in logged],
                        )
    result.hits.sort(key=lambda h: h.score, reverse=True)
    result.hits = result.hits[:k]
    result.stats = {
        "mode": "exact" if exact else "ann",
        "k": k,
        "tiers": {t: {**v, "latency_ms": round(v["latency_ms"], 3)} for t, v in per_tier.items()},
    }
    return result


def _view_exists(conn, collection: str) -> bool:
    return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f'{catalog.SERVING}."{collection}"',)).fetchone()[0]


def _query_vector(spec: ModelSpec, query, vector, embed_query: QueryEmbedder) -> np.ndarray:
    if vector is not None:
        vec = np.asarray(vector, dtype=np.float32)
        if vec.shape != (spec.dims,) or not np.isfinite(vec).all():
            raise ValueError(f"query vector must be {spec.dims} finite numbers for model {spec.key!r}")
    else:
        if not query or not query.strip():
            raise ValueError("empty query")
        vec = np.asarray(embed_query(spec, query), dtype=np.float32).reshape(-1)
    if spec.normalise:
        norm = np.linalg.norm(vec)
        if norm == 0:
            raise ValueError("query vector has zero length")
        vec = vec / norm
    return vec


# ---------------------------------------------------------------- recall of the index

def measure_recall(
    pool: ConnectionPool,
    collection: str,
    model_key: str,
    ef_search: int,
    k: int = 10,
    sample: int = 100,
    seed: int = 7,
) -> dict[str, Any]:
    """recall@k of the HNSW index vs exact search on real logged queries, topped up with stored vectors."""
    with pool.connection() as conn:
        spec = catalog.get_model(conn, model_key)
        table = catalog.vector_table_name(conn, collection, model_key)
        relation = vector_sql.table_id(table)
        logged = conn.execute(
            """
            SELECT DISTINCT ON (query_text) query_vector FROM vector_platform.query_stats
            WHERE collection = %s AND model_key = %s AND query_vector IS NOT NULL
            ORDER BY query_text, queried_at DESC LIMIT %s
            """,
            (collection, model_key, sample),
        ).fetchall()
        queries = [np.asarray(r[0].to_numpy() if hasattr(r[0], "to_numpy") else r[0], np.float32) for r in logged]
        from_log = len(queries)
        if len(queries) < sample:
            conn.execute("SELECT setseed(%s)", (seed / 100,))
            stored = conn.execute(
                sql.SQL("SELECT embedding FROM {} ORDER BY random() LIMIT %s").format(relation),
                (sample - len(queries),),
            ).fetchall()
            queries += [np.asarray(r[0].to_numpy() if hasattr(r[0], "to_numpy") else r[0], np.float32) for r in stored]
        plan = vector_sql.explain_nearest(conn, relation, spec, queries[0], exact=False, ef_search=ef_search) if queries else ""
        recalls, ann_ms, exact_ms = [], [], []
        for q in queries:
            t0 = time.perf_counter()
            ann = vector_sql.nearest(conn, relation, spec, q, k, exact=False, ef_search=ef_search, columns=sql.SQL("chunk_id"))
            t1 = time.perf_counter()
            truth = vector_sql.nearest(conn, relation, spec, q, k, exact=True, columns=sql.SQL("chunk_id"))
            t2 = time.perf_counter()
            recalls.append(recall_at_k([r[0] for r in ann], [r[0] for r in truth], k))
            ann_ms.append((t1 - t0) * 1000)
            exact_ms.append((t2 - t1) * 1000)
    return {
        # An empty table has nothing to miss: the check reports it rather than failing.
        "recall": float(np.mean(recalls)) if recalls else 1.0,
        "queries": len(queries),
        "queries_from_log": from_log,
        "ef_search": ef_search,
        "k": k,
        "ann_p50_ms": percentile(ann_ms, 50),
        "ann_p95_ms": percentile(ann_ms, 95),
        "exact_p50_ms": percentile(exact_ms, 50),
        "exact_p95_ms": percentile(exact_ms, 95),
        "uses_index": "Index Scan" in plan if queries else True,
        "plan": plan,
    }
