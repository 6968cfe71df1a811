"""Cold-tier benchmark: exact search over a 100k x 384 snapshot on an S3 server vs bare numpy.

One run, same machine: a collection of 100,000 real vectors (the shared SciFact
all-MiniLM-L6-v2 vectors tiled and perturbed) is loaded and indexed, searched active (HNSW,
for contrast), evicted to `moto_server` over HTTP, searched cold and rehydrated. Printed:
evict and rehydrate wall time; the first cold query (fetch from S3, verify, convert, search)
vs pyarrow reading the same files from the same server; p50/p95 of cached cold search
through `Platform.search` vs a bare numpy matrix-vector product on the same matrix (one BLAS
thread each, order alternated). Last line: `cold_vs_numpy_p50=<ours / numpy>`.

    .venv/bin/python bench/cold_search.py [--rows 100000] [--queries 300] [--dsn DSN]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=300)
    args = parser.parse_args()
    figures: dict[str, float] = {}
    with common.s3_bench_home():
        from vector_platform.search import cold_cache, flush_query_log

        with common.server(args.dsn) as dsn:
            vp = common.platform(dsn, "s3://bench/platform")
            rows, vectors = common.scifact(args.rows)
            name = "bench_cold"
            started = time.perf_counter()
            common.load_collection(vp, name, rows, vectors)
            figures["load_and_index_s"] = time.perf_counter() - started
            queries = common.query_vectors(args.queries)
            active_times = []
            for q in queries:
                t0 = time.perf_counter()
                vp.search(vector=q, collections=[name], k=10)
                active_times.append(time.perf_counter() - t0)
            exact_active = {i: [h.chunk_id for h in vp.search(vector=queries[i], collections=[name], k=10, exact=True).hits] for i in range(20)}

            t0 = time.perf_counter()
            run = vp.tier(name, "cold")
            figures["evict_s"] = time.perf_counter() - t0
            assert run.success, run.error

            # First cold query: nothing cached in memory or on local disk.
            cold_cache.forget()
            shutil.rmtree(cold_cache.root, ignore_errors=True)
            t0 = time.perf_counter()
            first = vp.search(vector=queries[0], collections=[name], k=10)
            figures["first_cold_query_s"] = time.perf_counter() - t0
            assert first.stats["tiers"]["cold"]["data_from"][name] == "object_store", first.stats
            store = vp.store()
            snapshot_id = first.hits[0].snapshot_id
            with vp.pool().connection() as conn:
                from vector_platform.catalog import tiers as tier_sql

                receipt = tier_sql.get_snapshot(conn, snapshot_id)
            t0 = time.perf_counter()
            for entry in receipt.manifest["files"]:
                with store.open_input(entry["key"]) as f:
                    pq.read_table(f)
            figures["pyarrow_read_s"] = time.perf_counter() - t0
            figures["snapshot_bytes"] = receipt.bytes

            for i, ids in exact_active.items():  # the same answers cold as exact active
                assert [h.chunk_id for h in vp.search(vector=queries[i], collections=[name], k=10).hits] == ids

            matrix = cold_cache.get(store, receipt)[0].vectors
            ours, bare = [], []
            for i, q in enumerate(queries):
                pair = [("ours", lambda: vp.search(vector=q, collections=[name], k=10)), ("numpy", lambda: matrix @ q)]
                for label, fn in pair if i % 2 == 0 else pair[::-1]:
                    with threadpool_limits(limits=1, user_api="blas"):
                        t0 = time.perf_counter()
                        fn()
                        (ours if label == "ours" else bare).append(time.perf_counter() - t0)
            flush_query_log(vp.pool())

            t0 = time.perf_counter()
            run = vp.tier(name, "active")
            figures["rehydrate_s"] = time.perf_counter() - t0
            assert run.success, run.error
    mib = figures["snapshot_bytes"] / 2**20
    print(f"{args.rows} rows x 384 d; snapshot {mib:.1f} MiB on moto_server (S3 over HTTP); {args.queries} queries, k 10")
    print(f"active HNSW (ef_search 100)    p50 {common.pct(active_times, 50):8.3f} ms  p95 {common.pct(active_times, 95):8.3f} ms")
    print(f"cold, cached (Platform.search) p50 {common.pct(ours, 50):8.3f} ms  p95 {common.pct(ours, 95):8.3f} ms")
    print(f"bare numpy matrix @ vector     p50 {common.pct(bare, 50):8.3f} ms  p95 {common.pct(bare, 95):8.3f} ms")
    print(f"first cold query (S3 fetch + verify + convert + search) {figures['first_cold_query_s']:.2f} s; "
          f"pyarrow reading the same files {figures['pyarrow_read_s']:.2f} s "
          f"(x{figures['first_cold_query_s'] / figures['pyarrow_read_s']:.2f})")
    print(f"load + index {figures['load_and_index_s']:.1f} s; evict {figures['evict_s']:.1f} s; rehydrate {figures['rehydrate_s']:.1f} s")
    print(f"cold_vs_numpy_p50={common.pct(ours, 50) / common.pct(bare, 50):.3f}")


if __name__ == "__main__":
    main()
