"""Scale-out benchmark (issue 12), one run, same machine.

Storage types on the same rows: 100,000 real vectors (the shared SciFact all-MiniLM-L6-v2
vectors, tiled and perturbed) loaded into a `vector`, a `halfvec` and a `binary` table by the
product's loader and index builder; per storage type the bytes per vector (table and HNSW
index, measured by PostgreSQL), recall@10 against exact search (numpy over the same
vectors) and the search p50 through the product's nearest-neighbour query, binary with and
without its full-precision re-rank. The queries of every storage type are interleaved, so
that they share the same minutes of a noisy machine.

    .venv/bin/python bench/scale_out.py [--rows 100000] [--queries 300] [--dsn DSN]

Still to come in this benchmark (issue 12, next sessions): cold search over a 1M-row
snapshot with partition-pruned reads vs a full scan, and search on a replica vs the primary.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

KINDS = ("vector", "halfvec", "binary")


def storage_types(dsn: str, rows: int, queries: int, ef_search: int) -> dict[str, dict]:
    import psycopg
    from pgvector.psycopg import register_vector
    from psycopg import sql

    from vector_platform import catalog, tables
    from vector_platform.metrics import recall_at_k
    from vector_platform.models import MINILM
    from vector_platform.search import active
    from vector_platform.search.active import DEFAULT_RERANK_FACTOR

    data_rows, vectors = common.scifact(rows)
    qs = common.query_vectors(queries)
    truth = np.argsort(-(qs @ vectors.T), axis=1)[:, :10]
    position = {row[0].int - 1: i for i, row in enumerate(data_rows)}
    out: dict[str, dict] = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        catalog.bootstrap(conn)  # the extension and the platform's schemas
        register_vector(conn)
        relations = {}
        for kind in KINDS:
            spec = MINILM.with_storage(kind)
            table = f"bench_storage_{kind}"
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(tables.table_id(table)))
            tables.create_table(conn, table, spec)
            started = time.perf_counter()
            for start in range(0, rows, 20_000):
                with conn.transaction():
                    tables.copy_upsert(conn, table, spec, data_rows[start:start + 20_000], vectors[start:start + 20_000],
                                       assume_new=True)
            loaded = time.perf_counter() - started
            report = tables.ensure_hnsw(conn, table, spec, 16, 64)
            conn.execute(sql.SQL("VACUUM ANALYZE {}").format(tables.table_id(table)))
            relations[kind] = (spec, tables.table_id(table))
            out[kind] = {"load_s": loaded, "index_s": report.seconds, **tables.bytes_per_vector(conn, table)}
            print(f"  {kind}: loaded {loaded:.1f} s, index {report.seconds:.1f} s", flush=True)
        runs = {kind: (kind, DEFAULT_RERANK_FACTOR, ef_search) for kind in KINDS}
        runs["binary, no re-rank"] = ("binary", 1, ef_search)
        # binary's index scan walks rerank_factor x k candidates: vector at that ef_search too
        wide_ef = DEFAULT_RERANK_FACTOR * 10
        runs[f"vector, ef_search {wide_ef}"] = ("vector", DEFAULT_RERANK_FACTOR, wide_ef)
        found: dict[str, list[float]] = {label: [] for label in runs}
        times: dict[str, list[float]] = {label: [] for label in runs}
        labels = list(runs)
        for i, q in enumerate(qs):
            for label in labels[i % len(labels):] + labels[: i % len(labels)]:  # order rotated per query
                kind, factor, ef = runs[label]
                spec, relation = relations[kind]
                t0 = time.perf_counter()
                got = active.nearest(conn, relation, spec, q, 10, exact=False, ef_search=ef,
                                     columns=sql.SQL("chunk_id"), rerank_factor=factor)
                times[label].append(time.perf_counter() - t0)
                found[label].append(recall_at_k([position[r[0].int - 1] for r in got], list(truth[i]), 10))
        for label, (kind, factor, ef) in runs.items():
            out.setdefault(label, dict(out[kind]))
            out[label].update(recall=float(np.mean(found[label])), p50_ms=common.pct(times[label], 50),
                              p95_ms=common.pct(times[label], 95), rerank_factor=factor if kind == "binary" else None,
                              ef_search=max(ef, factor * 10) if kind == "binary" else ef)
        for kind in KINDS:
            conn.execute(sql.SQL("DROP TABLE {}").format(relations[kind][1]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--ef-search", type=int, default=100)
    args = parser.parse_args()
    with common.server(args.dsn) as dsn:
        print(f"storage types on {args.rows:,} rows x 384 d, {args.queries} queries, ef_search {args.ef_search}:", flush=True)
        figures = storage_types(dsn, args.rows, args.queries, args.ef_search)
    print()
    print("| storage | table B/vector | HNSW index B/vector | ef_search | recall@10 | p50 ms | p95 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, f in figures.items():
        print(f"| {label} | {f['table_bytes_per_vector']:,.0f} | {f['index_bytes_per_vector']:,.0f} | {f['ef_search']} "
              f"| {f['recall']:.4f} | {f['p50_ms']:.2f} | {f['p95_ms']:.2f} |")
    vector, binary = figures["vector"], figures["binary"]
    print(f"binary_index_bytes_over_vector={binary['index_bytes_per_vector'] / vector['index_bytes_per_vector']:.3f}")
    print(f"binary_recall_minus_vector={binary['recall'] - vector['recall']:+.4f}")


if __name__ == "__main__":
    main()
