"""Search across collections: embed the query once per model, ask each collection, merge.

Usable on its own (a pool and a query embedder; no Dagster `Definitions`): the CLI, the
Python API and the HTTP API all call `search`. Every hit carries `source_tier`; stats say
hits and latency per tier and how the lists were merged; warnings say what was skipped or
why fewer than k hits came back. Every query updates the collection's `last_queried_at`
and the query log. Tiers other than active slot in beside `active` as they arrive.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
from psycopg_pool import ConnectionPool

from vector_platform import catalog, tables
from vector_platform.catalog.queries import log_queries
from vector_platform.models import ModelSpec
from vector_platform.search import active, merge
from vector_platform.search.active import MAX_K

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
    if not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise ValueError(f"k must be between 1 and {MAX_K} (pgvector's largest hnsw.ef_search), got {k}")
    if filters is not None and not isinstance(filters, dict):
        raise ValueError("filters must be a JSON object, e.g. {\"year\": 2024}")
    result = SearchResult(query=query, hits=[])
    per_tier: dict[str, dict[str, float]] = {}
    vectors: dict[str, np.ndarray] = {}
    lists: list[list[Hit]] = []
    fingerprints: dict[str, str] = {}
    logged: list[tuple] = []
    exact_fallbacks: list[str] = []
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
            if coll.serving_model is None or not tables.view_exists(conn, name):
                result.warnings.append(f"collection {name!r} has no serving view yet; ingest it first")
                continue
            spec = catalog.get_model(conn, coll.serving_model)
            if spec.key not in vectors:
                vectors[spec.key] = _query_vector(spec, query, vector, embed_query)
            qvec = vectors[spec.key]
            relation = tables.view_id(name)
            began = time.perf_counter()
            rows = active.nearest(conn, relation, spec, qvec, k, exact, coll.settings.hnsw_ef_search, filters)
            mode = "exact" if exact else "ann"
            if len(rows) < k and not exact and active.count_matching(conn, relation, filters, k) > len(rows):
                # The index scan stopped short of k rows that exist (a very selective filter):
                # exact search finds them all.
                rows = active.nearest(conn, relation, spec, qvec, k, True, filters=filters)
                mode = "exact_fallback"
                exact_fallbacks.append(name)
            elapsed = (time.perf_counter() - began) * 1000
            tier = per_tier.setdefault("active", {"hits": 0, "latency_ms": 0.0, "collections": 0})
            tier["hits"] += len(rows)
            tier["latency_ms"] += elapsed
            tier["collections"] += 1
            lists.append(
                [
                    Hit(name, str(chunk_id), doc_id, tables.score_from_distance(spec, float(distance)), text, metadata, "active")
                    for chunk_id, doc_id, text, metadata, distance in rows
                ]
            )
            fingerprints[name] = catalog.table_fingerprint(conn, name, spec.key)
            logged.append((name, spec.key, mode, k, elapsed, len(rows), query, qvec))
        if logged:
            with conn.transaction():
                catalog.touch_queried(conn, [entry[0] for entry in logged])
                if log_query:
                    log_queries(conn, logged)
    distinct = set(fingerprints.values())
    if len(distinct) <= 1:
        result.hits = merge.by_score(lists, lambda h: h.score, k)
        merged_by = "score"
    else:
        result.hits = [hit for _, hit in merge.reciprocal_rank_fusion(lists, k)]
        merged_by = "reciprocal_rank_fusion"
        result.warnings.append(
            "collections use different models or distances (fingerprints "
            + ", ".join(f"{c}={f}" for c, f in fingerprints.items())
            + "): results merged by reciprocal rank fusion, not by score"
        )
    total_available = sum(len(hits) for hits in lists)
    if len(result.hits) < k and lists:
        result.warnings.append(
            f"{len(result.hits)} hits for k={k}: the searched collections hold no more"
            + (" that match the filters" if filters else "")
        )
    result.stats = {
        "mode": "exact" if exact else "ann",
        "k": k,
        "merge": merged_by,
        "exact_fallback": exact_fallbacks,
        "candidates": total_available,
        "tiers": {t: {**v, "latency_ms": round(v["latency_ms"], 3)} for t, v in per_tier.items()},
    }
    return result


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
