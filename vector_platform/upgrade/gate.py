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
- search p95 within upgrade_latency_factor of the serving model's (or under
  upgrade_latency_floor_ms), the two models' queries interleaved and a failing round measured
  again (best of 3). Without logged or labelled queries the latency is measured with stored
  vectors (each model queried with its own vector of the same chunks).

A cold collection's upgrade is measured on its snapshots, searched exactly as cold search
searches them (`evaluate_cold`): the same comparisons, no index to measure.

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
from vector_platform.catalog import tiers as tier_sql
from vector_platform.catalog import upgrades as upgrade_sql
from vector_platform.catalog.upgrades import GateResult
from vector_platform.metrics import ndcg_at_k, percentile
from vector_platform.models import ModelSpec
from vector_platform.object_store import ObjectStore
from vector_platform.search import active, cold

TextEmbedder = Callable[[ModelSpec, Sequence[str]], Sequence[np.ndarray]]
LATENCY_ROUNDS = 3  # measurements before a slower p95 counts against the shadow
LOGGED_QUERIES = 100
STORED_QUERIES = 50  # stored vectors that time both models when no query texts exist
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


Searcher = Callable[[ModelSpec, Sequence[np.ndarray], int], tuple[list[list[tuple]], list[float]]]


def _active_searcher(conn, relation, ef_search: int, rerank_factor: int) -> Searcher:
    """Search a vector table through its index (as search does), timed per query:
    (chunk_id, doc_id) rows."""
    columns = sql.SQL("chunk_id, doc_id")

    def search(spec: ModelSpec, vectors, k: int):
        results, latencies = [], []
        for q in vectors:
            began = time.perf_counter()
            results.append(active.nearest(conn, relation, spec, q, k, exact=False, ef_search=max(ef_search, k), columns=columns,
                                          rerank_factor=rerank_factor))
            latencies.append((time.perf_counter() - began) * 1000)
        return results, latencies

    return search


def _cold_searcher(data) -> Searcher:
    """Search a loaded cold snapshot by exact brute force (as cold search does), timed per query."""

    def search(spec: ModelSpec, vectors, k: int):
        results, latencies = [], []
        for q in vectors:
            began = time.perf_counter()
            found = cold.nearest(data, spec, q, k)
            results.append([(r["chunk_id"], r["doc_id"]) for r in cold.rows_of(data, [i for i, _ in found])])
            latencies.append((time.perf_counter() - began) * 1000)
        return results, latencies

    return search


def _vector(value) -> np.ndarray:
    return np.asarray(value.to_numpy() if hasattr(value, "to_numpy") else value, np.float32)


def _stored_pairs(conn, shadow_table: str, serving_table: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each model's own vector of the same chunks (a random sample of STORED_QUERIES)."""
    rows = conn.execute(
        sql.SQL("SELECT s.embedding, v.embedding FROM {} s JOIN {} v USING (chunk_id) ORDER BY random() LIMIT %s").format(
            tables.table_id(shadow_table), tables.table_id(serving_table)),
        (STORED_QUERIES,),
    ).fetchall()
    return [_vector(a) for a, _ in rows], [_vector(b) for _, b in rows]


def _allowed_p95(settings, serving_p95: float) -> float:
    return max(settings.upgrade_latency_factor * serving_p95, settings.upgrade_latency_floor_ms)


def _timed_rounds(
    shadow: ModelSpec, shadow_search: Searcher, shadow_vectors, serving: ModelSpec, serving_search: Searcher,
    serving_vectors, settings,
) -> tuple[list, list, float, float, int]:
    """Each query through both models in turn, so a noisy neighbour slows both alike. Noise
    only ever adds latency, so a round over the limit is measured again (at most
    LATENCY_ROUNDS in all) and each model keeps its best p95; a model that really is slower
    stays slower in every round."""
    best_new = best_old = float("inf")
    new: list = []
    old: list = []
    rounds = 0
    while rounds < LATENCY_ROUNDS:
        rounds += 1
        new, old, new_ms, old_ms = [], [], [], []
        for a, b in zip(shadow_vectors, serving_vectors):
            hits, ms = shadow_search(shadow, [a], 10)
            new += hits
            new_ms += ms
            hits, ms = serving_search(serving, [b], 10)
            old += hits
            old_ms += ms
        best_new = min(best_new, percentile(new_ms, 95))
        best_old = min(best_old, percentile(old_ms, 95))
        if best_new <= _allowed_p95(settings, best_old):
            break
    return new, old, best_new, best_old, rounds


def _compare(
    figures: dict[str, Any], reasons: list[str], settings, embed: TextEmbedder,
    shadow: ModelSpec, shadow_search: Searcher, serving: ModelSpec, serving_search: Searcher,
    logged: list[str], labelled: list, logged_shadow: list[np.ndarray] | None = None,
    stored: tuple[list[np.ndarray], list[np.ndarray]] | None = None,
) -> None:
    """The same queries through both models: overlap@10 and p95 on the logged queries (or the
    labelled ones when none were logged), nDCG@10 on the labelled ones. Adds figures and reasons.
    `stored`: each model's own vectors of the same chunks, which time the two models when
    there are no query texts (overlap is then not reported: the queries are not users')."""
    texts = logged or [text for _, text, _ in labelled]
    figures["quality_measured"] = bool(texts)
    if not texts:
        figures["quality"] = "not measured: no logged or labelled queries (collections qrels NAME FILE adds labelled ones)"
    if texts:
        shadow_vectors = logged_shadow if (logged and logged_shadow is not None) else _embed(embed, shadow, texts)
        serving_vectors = _embed(embed, serving, texts)
    elif stored and stored[0]:
        shadow_vectors, serving_vectors = stored
        figures["latency_queries"] = f"{len(shadow_vectors)} stored vectors (no query texts)"
    else:
        figures["latency"] = "not measured: no query texts and no stored vectors"
        return
    shadow_search(shadow, shadow_vectors[:1], 10)  # warm both up: a first query pays for caches, not search
    serving_search(serving, serving_vectors[:1], 10)
    new, old, p95_new, p95_old, rounds = _timed_rounds(
        shadow, shadow_search, shadow_vectors, serving, serving_search, serving_vectors, settings,
    )
    figures.update(p95_ms_shadow=p95_new, p95_ms_serving=p95_old, latency_rounds=rounds)
    if texts:
        overlaps = [len({r[0] for r in a} & {r[0] for r in b}) / 10 for a, b in zip(new, old)]
        figures.update(overlap_at_10=float(np.mean(overlaps)), overlap_queries=len(overlaps))
    if p95_new > _allowed_p95(settings, p95_old):
        reasons.append(
            f"search p95 {p95_new:.2f} ms is over {settings.upgrade_latency_factor} x the serving model's "
            f"{p95_old:.2f} ms (and over the {settings.upgrade_latency_floor_ms} ms floor)"
        )
    if labelled:
        qtexts = [text for _, text, _ in labelled]
        ndcg = {}
        for role, spec, search in (("shadow", shadow, shadow_search), ("serving", serving, serving_search)):
            hits, _ = search(spec, _embed(embed, spec, qtexts), CHUNKS_PER_QUERY)
            ndcg[role] = float(np.mean([ndcg_at_k(_ranked_docs(h, 10), judged, 10) for h, (_, _, judged) in zip(hits, labelled)]))
        figures.update(ndcg_shadow=ndcg["shadow"], ndcg_serving=ndcg["serving"])
        if ndcg["shadow"] < ndcg["serving"] - settings.upgrade_ndcg_margin:
            reasons.append(
                f"nDCG@10 {ndcg['shadow']:.4f} trails the serving model's {ndcg['serving']:.4f} by more than "
                f"{settings.upgrade_ndcg_margin}"
            )


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
            serving, serving_table = None, None  # nothing to compare with
        logged = upgrade_sql.logged_query_texts(conn, collection, LOGGED_QUERIES)
        labelled = upgrade_sql.labelled_queries(conn, collection)
        rows = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(tables.table_id(shadow_table))).fetchone()[0]

    figures: dict[str, Any] = {
        "rows": rows, "baseline_model": serving.key if serving else None, "logged_queries": len(logged),
        "labelled_queries": len(labelled), "recall_target": settings.recall_target,
        "ndcg_margin": settings.upgrade_ndcg_margin, "latency_factor": settings.upgrade_latency_factor,
        "latency_floor_ms": settings.upgrade_latency_floor_ms,
        "ef_search": settings.hnsw_ef_search,
    }
    reasons: list[str] = []
    if rows == 0:
        return Verdict(False, figures, ["the shadow table is empty"])

    # recall@10 vs exact, on what users ask (embedded with the new model)
    logged_shadow = _embed(embed, shadow, logged) if logged else []
    recall = checks.measure_recall(
        pool, collection, model_key, ef_search=settings.hnsw_ef_search, sample=LOGGED_QUERIES, queries=logged_shadow,
        rerank_factor=settings.rerank_factor,
    )
    figures.update(recall=recall["recall"], recall_queries=recall["queries"], uses_index=recall["uses_index"])
    if recall["recall"] is None or recall["recall"] < settings.recall_target:
        reasons.append(f"recall@10 {recall['recall']} is below the target {settings.recall_target}")
    if not recall["uses_index"]:
        reasons.append("the shadow's search plan does not use its HNSW index")

    if serving is not None and serving.key != shadow.key:
        with pool.connection() as conn:
            stored = None if logged or labelled else _stored_pairs(conn, shadow_table, serving_table)
            _compare(
                figures, reasons, settings, embed,
                shadow, _active_searcher(conn, tables.table_id(shadow_table), settings.hnsw_ef_search, settings.rerank_factor),
                serving, _active_searcher(conn, tables.table_id(serving_table), settings.hnsw_ef_search, settings.rerank_factor),
                logged, labelled, logged_shadow, stored,
            )
    return Verdict(not reasons, figures, reasons)


def evaluate_cold(pool: ConnectionPool, store: ObjectStore, embed: TextEmbedder, collection: str, model_key: str) -> Verdict:
    """Measure a cold collection's new snapshot (a cold upgrade's) against its serving snapshot.
    Both are searched as cold search does: by exact brute force (recall is exact by
    construction), or over IVF snapshots the nearest lists; the gate is about quality (nDCG@10,
    overlap@10) and latency."""
    with pool.connection() as conn:
        coll = catalog.get_collection(conn, collection)
        settings = coll.settings
        shadow = catalog.get_model(conn, model_key)
        serving = catalog.get_model(conn, coll.serving_model)
        served = tier_sql.cold_snapshots(conn, collection)
        new = tier_sql.get_snapshot(conn, served[model_key]) if model_key in served else None
        old = tier_sql.get_snapshot(conn, served[serving.key]) if serving.key in served else None
        logged = upgrade_sql.logged_query_texts(conn, collection, LOGGED_QUERIES)
        labelled = upgrade_sql.labelled_queries(conn, collection)
    figures: dict[str, Any] = {
        "search": "cold_exact", "rows": new.rows if new else 0, "snapshot_id": new.id if new else None,
        "baseline_model": serving.key, "baseline_snapshot_id": old.id if old else None,
        "logged_queries": len(logged), "labelled_queries": len(labelled),
        "ndcg_margin": settings.upgrade_ndcg_margin, "latency_factor": settings.upgrade_latency_factor,
        "latency_floor_ms": settings.upgrade_latency_floor_ms,
    }
    if new is None:
        return Verdict(False, figures, [f"cold collection {collection!r} has no snapshot of {model_key!r} yet"])
    if new.manifest.get("fingerprint") != shadow.fingerprint:
        return Verdict(False, figures, [f"snapshot {new.id} holds vectors of fingerprint {new.manifest.get('fingerprint')}, "
                                        f"not {model_key!r}'s {shadow.fingerprint}"])
    if new.rows == 0:
        return Verdict(False, figures, [f"snapshot {new.id} of {model_key!r} is empty"])
    if old is None:
        return Verdict(False, figures, [f"no snapshot of the serving model {serving.key!r} to compare with"])
    reasons: list[str] = []
    if new.rows < old.rows:
        reasons.append(f"snapshot {new.id} has {new.rows} rows, the serving snapshot {old.rows}: rows were left out (dead letters say why)")
    new_search, new_mode = _snapshot_searcher(store, new, settings.cold_nprobe)
    old_search, old_mode = _snapshot_searcher(store, old, settings.cold_nprobe)
    figures["search"] = "cold_exact" if new_mode == old_mode == "cold_exact" else f"{new_mode} vs serving {old_mode}"
    stored = None
    if not logged and not labelled:  # each snapshot's own vectors of the same chunks time the two
        mine = dict(_snapshot_rows(store, new, want=None, limit=STORED_QUERIES * 4))
        theirs = dict(_snapshot_rows(store, old, want=set(mine), limit=None))
        pairs = [c for c in mine if c in theirs][:STORED_QUERIES]
        stored = ([mine[c] for c in pairs], [theirs[c] for c in pairs])
    _compare(figures, reasons, settings, embed, shadow, new_search, serving, old_search, logged, labelled, stored=stored)
    return Verdict(not reasons, figures, reasons)


def _snapshot_searcher(store: ObjectStore, receipt, cold_nprobe: int) -> tuple[Searcher, str]:
    """Search a snapshot as cold search does: every row of a flat snapshot (loaded whole, as
    search loads it), the nearest `cold_nprobe` lists of an IVF one (memory bounded by the
    list cache, whatever the snapshot's size)."""
    from vector_platform.search import cold_cache, cold_ivf, ivf_cache  # search's caches, shared with it

    if receipt.manifest.get("layout") != "ivf":
        data, _ = cold_cache.get(store, receipt)
        return _cold_searcher(data), "cold_exact"

    def search(spec: ModelSpec, vectors, k: int):
        results, latencies = [], []
        for q in vectors:
            began = time.perf_counter()
            answer = cold_ivf.search(ivf_cache, store, receipt, spec, q, k, None, (None, None), cold_nprobe)
            results.append([(row["chunk_id"], row["doc_id"]) for _, row in answer.found])
            latencies.append((time.perf_counter() - began) * 1000)
        return results, latencies

    return search, "cold_pruned"


def _snapshot_rows(store: ObjectStore, receipt, want: set[str] | None, limit: int | None):
    """(chunk_id, vector) of a snapshot's rows, verified as search reads them: the rows in
    `want` (None: any), at most `limit`. An IVF snapshot is read list by list through the
    list cache (memory stays bounded), stopping once every wanted row is found."""
    from vector_platform.search import cold_cache, ivf_cache

    if receipt.manifest.get("layout") != "ivf":
        datas = iter([cold_cache.get(store, receipt)[0]])
    else:
        datas = (ivf_cache.list_data(store, receipt, list_id)[0] for list_id in range(receipt.manifest["ivf"]["lists"]))
    found, left = 0, (len(want) if want is not None else None)
    if left == 0:
        return
    for data in datas:
        if data is None:
            continue
        for i, chunk_id in enumerate(data.rows.column("chunk_id").to_pylist()):
            if want is None or chunk_id in want:
                yield chunk_id, data.vectors[i].copy()  # not a view: it would hold its whole list
                found += 1
                if left is not None:
                    left -= 1
                if (limit is not None and found >= limit) or left == 0:
                    return


def run_gate(
    pool: ConnectionPool, embed: TextEmbedder, collection: str, model_key: str, run_id: str | None = None,
    store: ObjectStore | None = None,
) -> GateResult:
    """Evaluate and record the gate of an upgrade target (a cold collection's on its snapshots:
    `store` is needed to read them)."""
    with pool.connection() as conn:
        tier = catalog.get_collection(conn, collection).tier
    if tier == "cold":
        if store is None:
            raise ValueError("the gate of a cold collection reads its snapshots: pass the object store")
        verdict = evaluate_cold(pool, store, embed, collection, model_key)
    else:
        verdict = evaluate(pool, embed, collection, model_key)
    with pool.connection() as conn:
        spec = catalog.get_model(conn, model_key)
        return upgrade_sql.record_gate(
            conn, collection, model_key, spec.fingerprint, verdict.figures.get("baseline_model"), verdict.passed,
            verdict.figures, verdict.reasons, int(verdict.figures.get("rows", 0)), clock.now(), run_id,
        )
