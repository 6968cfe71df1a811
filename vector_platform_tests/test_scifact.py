"""End to end on real data: 1,000 SciFact abstracts through the assets with the real model,
the embedding cache on S3 (moto over HTTP), then platform search against exact search."""

import csv
import json

import numpy as np
import pytest

from vector_platform.metrics import ndcg_at_k, recall_at_k

from .conftest import SCIFACT, scifact_docs, write_jsonl

SUBSET = 1000


def _qrels(split="test"):
    rels: dict[str, dict[str, float]] = {}
    with (SCIFACT / "qrels" / f"{split}.tsv").open() as f:
        for row in csv.DictReader(f, delimiter="\t"):
            rels.setdefault(row["query-id"], {})[row["corpus-id"]] = float(row["score"])
    return rels


@pytest.fixture(scope="module")
def scifact_subset():
    """Every document judged relevant to a test query, topped up to 1,000 from the corpus."""
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
    assert checks == {"embeddings_are_valid": True, "no_chunk_lost": True, "index_recall_meets_target": True}
    assert runs[1].metadata["hnsw_index"]["action"] == "built"
    status = {c["name"]: c for c in vp.status()["collections"]}[unique_name]
    assert status["documents"] == SUBSET and status["vectors"] == status["chunks"] > SUBSET
    assert status["dead_letters"] == 0
    assert vp.status()["object_store"]["embedding_cache"]["minilm_l6_v2"]["bytes"] > 0  # the cache lives on S3

    recalls, ndcg_ann, ndcg_exact = [], [], []
    for qid, text in queries.items():
        ann = vp.search(text, [unique_name], k=30)
        exact = vp.search(text, [unique_name], k=30, exact=True)
        assert len(ann.hits) == 30 and ann.stats["exact_fallback"] == []  # k hits, from the index
        recalls.append(recall_at_k([h.chunk_id for h in ann.hits], [h.chunk_id for h in exact.hits], k=10))
        ndcg_ann.append(ndcg_at_k(_doc_ranking(ann.hits), qrels[qid]))
        ndcg_exact.append(ndcg_at_k(_doc_ranking(exact.hits), qrels[qid]))
    recall, ann_score, exact_score = np.mean(recalls), np.mean(ndcg_ann), np.mean(ndcg_exact)
    print(f"scifact {SUBSET} docs, {len(queries)} queries: recall@10={recall:.4f} nDCG@10 ann={ann_score:.4f} exact={exact_score:.4f}")
    assert len(queries) >= 300
    assert recall >= 0.95
    assert abs(ann_score - exact_score) <= 0.01
    # Real retrieval, not noise: exact search with this model scores ~0.65 on the full corpus.
    assert exact_score > 0.6
