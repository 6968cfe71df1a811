"""End to end on real data: 500 SciFact abstracts (every one judged for a test query, and
distractors) through the assets with the real model, the embedding cache on S3 (moto over
HTTP), then platform search against exact search."""

import csv
import json

import numpy as np
import pytest

from vector_platform import catalog
from vector_platform.metrics import ndcg_at_k, recall_at_k

from .conftest import SCIFACT, scifact_docs, write_jsonl

# Every judged abstract (283) and 217 others. Embedding is nearly all of this test's time
# (~2.5 chunks an abstract, ~15-20 chunks/s on 2 CPU cores), so no more than the queries need.
SUBSET = 500


def _qrels(split="test"):
    rels: dict[str, dict[str, float]] = {}
    with (SCIFACT / "qrels" / f"{split}.tsv").open() as f:
        for row in csv.DictReader(f, delimiter="\t"):
            rels.setdefault(row["query-id"], {})[row["corpus-id"]] = float(row["score"])
    return rels


@pytest.fixture(scope="module")
def scifact_subset():
    """Every document judged relevant to a test query, topped up to SUBSET from the corpus."""
    qrels = _qrels()
    relevant = {doc for rels in qrels.values() for doc in rels}
    corpus = scifact_docs()
    chosen = [d for d in corpus if d["_id"] in relevant]
    chosen += [d for d in corpus if d["_id"] not in relevant][: SUBSET - len(chosen)]
    docs = [{"id": d["_id"], "title": d["title"], "text": d["text"]} for d in chosen]
    queries = {}
    with (SCIFACT / "queries.jsonl").open() as f:
        for line in f:
            q = json.loads(line)
            if q["_id"] in qrels:
                queries[q["_id"]] = q["text"]
    return docs, queries, qrels


def _doc_ranking(hits, k=10):
    seen = []
    for hit in hits:
        if hit.doc_id not in seen:
            seen.append(hit.doc_id)
    return seen[:k]


def test_scifact_subset_search_matches_exact_search(make_platform, s3_url, tmp_path, unique_name, scifact_subset):
    docs, queries, qrels = scifact_subset
    assert len(docs) == SUBSET
    vp = make_platform(store_url=s3_url, real_model=True)
    vp.add_collection(unique_name, write_jsonl(tmp_path / "scifact.jsonl", docs))
    runs = vp.ingest(unique_name)
    assert all(r.success for r in runs), [r.error for r in runs]
    checks = runs[1].checks
    assert checks == {"embeddings_are_valid": True, "no_chunk_lost": True, "index_recall_meets_target": True,
        "shadow_passes_quality_gate": True}
    assert runs[1].metadata["hnsw_index"]["action"] == "built"
    status = {c["name"]: c for c in vp.status()["collections"]}[unique_name]
    assert status["documents"] == SUBSET and status["vectors"] == status["chunks"] > SUBSET
    assert status["dead_letters"] == 0
    assert vp.status()["object_store"]["embedding_cache"]["minilm_l6_v2"]["bytes"] > 0  # the cache lives on S3

    # The queries embedded once, in one batch, by the serving model (as search embeds a text);
    # one search by text shows it answers what the search by its vector answers.
    with vp.pool().connection() as conn:
        spec = catalog.get_model(conn, vp.collection(unique_name).serving_model)
    qvecs = dict(zip(queries, vp.embedder.for_model(spec).embed(list(queries.values()))))
    first = next(iter(queries))
    by_text = vp.search(queries[first], [unique_name], k=10)
    assert [h.chunk_id for h in by_text.hits] == [h.chunk_id for h in vp.search(vector=qvecs[first], collections=[unique_name], k=10).hits]

    recalls, ndcg_ann, ndcg_exact, exact_top = [], [], [], {}
    for qid in queries:
        ann = vp.search(vector=qvecs[qid], collections=[unique_name], k=30)
        exact = vp.search(vector=qvecs[qid], collections=[unique_name], k=30, exact=True)
        exact_top[qid] = exact.hits[:10]  # exact search's top 10, for the cold tier below
        assert len(ann.hits) == 30 and ann.stats["exact_fallback"] == []  # k hits, from the index
        recalls.append(recall_at_k([h.chunk_id for h in ann.hits], [h.chunk_id for h in exact.hits], k=10))
        ndcg_ann.append(ndcg_at_k(_doc_ranking(ann.hits), qrels[qid]))
        ndcg_exact.append(ndcg_at_k(_doc_ranking(exact.hits), qrels[qid]))
    recall, ann_score, exact_score = np.mean(recalls), np.mean(ndcg_ann), np.mean(ndcg_exact)
    print(f"scifact {SUBSET} docs, {len(queries)} queries: recall@10={recall:.4f} nDCG@10 ann={ann_score:.4f} exact={exact_score:.4f}")
    assert len(queries) >= 300
    assert recall >= 0.95
    assert abs(ann_score - exact_score) <= 0.01
    # Real retrieval, not noise: exact search with this model scores ~0.65 on the full corpus,
    # ~0.79 on 1,000 abstracts, ~0.84 on these 500.
    assert exact_score > 0.6

    # Evicted to S3 (moto over HTTP): the test queries get the active collection's exact top-10
    # from the cold tier, with the same scores, every hit labelled cold and exact.
    run = vp.tier(unique_name, "cold")
    assert run.success, run.error
    for qid in queries:
        cold = vp.search(vector=qvecs[qid], collections=[unique_name], k=10)
        assert {(h.source_tier, h.exact) for h in cold.hits} == {("cold", True)}
        _assert_same_ranking(cold.hits, exact_top[qid])
    # Rehydrated: table, index and checks back; an ingest afterwards embeds nothing.
    run = vp.tier(unique_name, "active")
    assert run.success, run.error
    assert run.metadata["rehydrate_collection"]["recall"] >= 0.95
    runs = vp.ingest(unique_name)
    assert all(r.success for r in runs), [r.error for r in runs]
    assert runs[1].metadata["embeddings"]["embedded"] == 0
    assert runs[1].metadata["hnsw_index"]["action"] == "kept"
    assert runs[1].checks == {"embeddings_are_valid": True, "no_chunk_lost": True, "index_recall_meets_target": True,
        "shadow_passes_quality_gate": True}


def _assert_same_ranking(got, expected, tol=1e-5):
    """Same ids in the same order, and scores within `tol`; rows whose scores tie (duplicate
    abstracts embed identically) may come in either order, and a tie at the k-th may be cut."""
    assert np.allclose([h.score for h in got], [h.score for h in expected], atol=tol)
    groups: dict[float, tuple[set, set]] = {}
    for g, e in zip(got, expected):
        key = round(e.score, 6)
        groups.setdefault(key, (set(), set()))
        groups[key][0].add(g.chunk_id)
        groups[key][1].add(e.chunk_id)
    last = round(expected[-1].score, 6)
    for key, (a, b) in groups.items():
        assert a == b or key == last, (key, a, b)

