"""Two real embedding spaces for model-upgrade tests: all-MiniLM-L6-v2 (the precomputed SciFact
vectors, documents and queries) and fixed linear maps of it (another model's coordinates,
with or without more dimensions), each served by an OpenAI-compatible test server."""

from __future__ import annotations

import csv
import json
from functools import lru_cache

import numpy as np

from vector_platform.models import ModelSpec

from .fault_server import FaultServer
from .scifact import SCIFACT


@lru_cache(maxsize=1)
def minilm_space() -> dict[str, np.ndarray]:
    """text -> MiniLM vector, for every SciFact document ("title\\n\\ntext") and query."""
    ids = json.loads((SCIFACT / "minilm_ids.json").read_text())
    docs = dict(zip(ids["corpus_ids"], np.load(SCIFACT / "corpus_minilm.npy")))
    queries = dict(zip(ids["query_ids"], np.load(SCIFACT / "queries_minilm.npy")))
    known = {}
    with (SCIFACT / "corpus.jsonl").open() as f:
        for line in f:
            doc = json.loads(line)
            known[f"{doc['title']}\n\n{doc['text']}"] = docs[doc["_id"]]
    with (SCIFACT / "queries.jsonl").open() as f:
        for line in f:
            q = json.loads(line)
            known[q["text"]] = queries[q["_id"]]
    return known


def rotation(dims_in: int = 384, dims_out: int = 384, seed: int = 11):
    """A fixed random orthonormal map (a rotation when dims are equal): the same cosines in
    other coordinates, so a query embedded for one space finds nothing sensible in the other."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((dims_out, dims_in)))
    matrix = q[:, :dims_in].astype(np.float32)

    def apply(vec: np.ndarray) -> np.ndarray:
        out = matrix @ np.asarray(vec, np.float32)
        return out / np.linalg.norm(out)

    return apply


def server(space=None, dims: int = 384) -> FaultServer:
    return FaultServer(dims=dims, known=minilm_space(), space=space).start()


def spec(key: str, srv: FaultServer, dims: int = 384, storage_type: str = "vector", **options) -> ModelSpec:
    return ModelSpec(key, "openai", f"test-{key}", dims, storage_type=storage_type, max_tokens=8191, options={
        "base_url": srv.base_url, "max_inputs_per_request": 64, "timeout_s": 5.0, "backoff_base_s": 0.05,
        "breaker_cooldown_s": 0.5, **options})


def qrels(split: str = "test") -> dict[str, dict[str, int]]:
    rels: dict[str, dict[str, int]] = {}
    with (SCIFACT / "qrels" / f"{split}.tsv").open() as f:
        for row in csv.DictReader(f, delimiter="\t"):
            rels.setdefault(row["query-id"], {})[row["corpus-id"]] = int(row["score"])
    return rels


def queries() -> dict[str, str]:
    out = {}
    with (SCIFACT / "queries.jsonl").open() as f:
        for line in f:
            q = json.loads(line)
            out[q["_id"]] = q["text"]
    return out


def docs_with_judged(n: int, offset: int = 0) -> list[dict]:
    """Every document judged for a test query, then others, `n` in all (from `offset` of the rest)."""
    judged = {doc for rels in qrels().values() for doc in rels}
    corpus = []
    with (SCIFACT / "corpus.jsonl").open() as f:
        for line in f:
            corpus.append(json.loads(line))
    chosen = [d for d in corpus if d["_id"] in judged]
    chosen += [d for d in corpus if d["_id"] not in judged][offset: offset + max(0, n - len(chosen))]
    return [{"id": d["_id"], "title": d["title"], "text": d["text"]} for d in chosen[:n]]
