"""The quality gate of a model upgrade: is the shadow table good enough to serve?

Measured on the shadow (collection, new model) against the serving model, the same queries
for both:
- recall@10 of the shadow's HNSW index vs exact search, at the collection's ef_search, on
  real logged queries embedded with the new model (topped up with stored vectors) >= the
  collection's recall_target, with the query plan using the index;
- overlap@10 of the chunk ids each model returns for the logged queries (reported only:
  a new model is expected to differ);
- with labelled queries (`collections qrels`): nDCG@10 over documents (a document counts at
  its best chunk) no worse than the serving model's by more than upgrade_ndcg_margin;
- search p95 within upgrade_latency_factor of the serving model's (or under 5 ms).

The verdict and every figure are written to `quality_gates`; the swap reads them there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
from psycopg import sql
from psycopg_pool import ConnectionPool

from vector_platform import catalog, checks, clock, tables
from vector_platform.catalog import upgrades as upgrade_sql
from vector_platform.catalog.upgrades import GateResult
from vector_platform.metrics import ndcg_at_k, percentile
from vector_platform.models import ModelSpec
from vector_platform.search import active

TextEmbedder = Callable[[ModelSpec, Sequence[str]], Sequence[np.ndarray]]
LATENCY_FLOOR_MS = 5.0
LOGGED_QUERIES = 100
CHUNKS_PER_QUERY = 50  # chunks fetched per labelled query, ranked into documents


@dataclass
class Verdict:
    passed: bool
    figures: dict[str, Any]
    reasons: list[str] = field(default_factory=list)


def _unit(vectors: Sequence[np.ndarray], spec: ModelSpec) -> list[np.ndarray]:
    out = []
    for v in vectors:
        v = np.asarray(v, dtype=np.float32).reshape(-1)
        if spec.normalise:
            norm = float(np.linalg.norm(v))
            v = v / norm if norm else v
        out.append(v)
    return out


def _embed(embed: TextEmbedder, spec: ModelSpec, texts: Sequence[str], batch: int = 64) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    for start in range(0, len(texts), batch):
        out += _unit(embed(spec, list(texts[start:start + batch])), spec)
    return out


def _ranked_docs(rows: Sequence[tuple], k: int) -> list[str]:
    """Documents in the order of their best chunk."""
    seen: dict[str, None] = {}
    for row in rows:
        seen.setdefault(row[1], None)
        if len(seen) == k:
            break
    return list(seen)


def _timed_search(conn, relation, spec, vectors, k, ef_search) -> tuple[list[list[tuple]], list[float]]:
    results, latencies = [], []
    columns = sql.SQL("chunk_id, doc_id")
    for q in vectors:
        began = time.perf_counter()
        results.append(active.nearest(conn, relation, spec, q, k, exact=False, ef_search=ef_search, columns=columns))
        latencies.append((time.perf_counter() - began) * 1000)
    return results, latencies


def evaluate(pool: ConnectionPool, embed: TextEmbedder, collection: str, model_key: str) -> Verdict:
    """Measure the shadow `model_key` of `collection` against its serving model."""
    with pool.connection() as conn:
        coll = catalog.get_collection(conn, collection)
        settings = coll.settings
        shadow = catalog.get_model(conn, model_key)
        shadow_table = catalog.vector_table_name(conn, collection, model_key)
        if not tables.table_exists(conn, shadow_table):
            return Verdict(False, {"rows": 0}, [f"the shadow table of {model_key!r} does not exist yet"])
        serving = catalog.get_model(conn, coll.serving_model) if coll.serving_model else None
        serving_table = catalog.vector_table_name(conn, collection, serving.key) if serving else None
        if serving_table is not None and not tables.table_exists(conn, serving_table):
            serving, serving_table = None, None  # nothing to compare with (e.g. a cold collection)
        logged = upgrade_sql.logged_query_texts(conn, collection, LOGGED_QUERIES)
        labelled = upgrade_sql.labelled_queries(conn, collection)
        rows = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(tables.table_id(shadow_table))).fetchone()[0]

    figures: dict[str, Any] = {
        "rows": rows, "baseline_model": serving.key if serving else None, "logged_queries": len(logged),
        "labelled_queries": len(labelled), "recall_target": settings.recall_target,
        "ndcg_margin": settings.upgrade_ndcg_margin, "latency_factor": settings.upgrade_latency_factor,
        "ef_search": settings.hnsw_ef_search,
    }
    reasons: list[str] = []
    if rows == 0:
        return Verdict(False, figures, ["the shadow table is empty"])

    # recall@10 vs exact, on what users ask (embedded with the new model)
    logged_shadow = _embed(embed, shadow, logged) if logged else []
    recall = checks.measure_recall(
        pool, collection, model_key, ef_search=settings.hnsw_ef_search, sample=LOGGED_QUERIES, queries=logged_shadow
    )
    figures.update(recall=recall["recall"], recall_queries=recall["queries"], uses_index=recall["uses_index"])
    if recall["recall"] is None or recall["recall"] < settings.recall_target:
        reasons.append(f"recall@10 {recall['recall']} is below the target {settings.recall_target}")
    if not recall["uses_index"]:
        reasons.append("the shadow's search plan does not use its HNSW index")

    if serving is not None and serving.key != shadow.key:
        texts = logged or [text for _, text, _ in labelled]
        with pool.connection() as conn:
            shadow_rel, serving_rel = tables.table_id(shadow_table), tables.table_id(serving_table)
            serving_vectors = _embed(embed, serving, texts)
            shadow_vectors = logged_shadow if logged else _embed(embed, shadow, texts)
            if texts:
                new, new_ms = _timed_search(conn, shadow_rel, shadow, shadow_vectors, 10, settings.hnsw_ef_search)
                old, old_ms = _timed_search(conn, serving_rel, serving, serving_vectors, 10, settings.hnsw_ef_search)
                overlaps = [len({r[0] for r in a} & {r[0] for r in b}) / 10 for a, b in zip(new, old)]
                figures.update(
                    overlap_at_10=float(np.mean(overlaps)), overlap_queries=len(overlaps),
                    p95_ms_shadow=percentile(new_ms, 95), p95_ms_serving=percentile(old_ms, 95),
                )
                allowed = max(settings.upgrade_latency_factor * figures["p95_ms_serving"], LATENCY_FLOOR_MS)
                if figures["p95_ms_shadow"] > allowed:
                    reasons.append(
                        f"search p95 {figures['p95_ms_shadow']:.2f} ms is over {settings.upgrade_latency_factor} x the "
                        f"serving model's {figures['p95_ms_serving']:.2f} ms"
                    )
            if labelled:
                qtexts = [text for _, text, _ in labelled]
                ndcg = {}
                for name, spec, rel in ((shadow.key, shadow, shadow_rel), (serving.key, serving, serving_rel)):
                    vectors = _embed(embed, spec, qtexts)
                    hits, _ = _timed_search(conn, rel, spec, vectors, CHUNKS_PER_QUERY, max(settings.hnsw_ef_search, CHUNKS_PER_QUERY))
                    ndcg[name] = float(np.mean([ndcg_at_k(_ranked_docs(h, 10), judged, 10) for h, (_, _, judged) in zip(hits, labelled)]))
                figures.update(ndcg_shadow=ndcg[shadow.key], ndcg_serving=ndcg[serving.key])
                if ndcg[shadow.key] < ndcg[serving.key] - settings.upgrade_ndcg_margin:
                    reasons.append(
                        f"nDCG@10 {ndcg[shadow.key]:.4f} trails the serving model's {ndcg[serving.key]:.4f} by more than "
                        f"{settings.upgrade_ndcg_margin}"
                    )
    return Verdict(not reasons, figures, reasons)


def run_gate(
    pool: ConnectionPool, embed: TextEmbedder, collection: str, model_key: str, run_id: str | None = None
) -> GateResult:
    """Evaluate and record the gate of an upgrade target."""
    verdict = evaluate(pool, embed, collection, model_key)
    with pool.connection() as conn:
        spec = catalog.get_model(conn, model_key)
        return upgrade_sql.record_gate(
            conn, collection, model_key, spec.fingerprint, verdict.figures.get("baseline_model"), verdict.passed,
            verdict.figures, verdict.reasons, int(verdict.figures.get("rows", 0)), clock.now(), run_id,
        )
