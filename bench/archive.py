"""Row-archive benchmark: archive the older half of a 200k-row collection to S3 and measure
what it costs and what it changes.

One run, same machine: a collection of real vectors (the shared SciFact all-MiniLM-L6-v2
vectors tiled and perturbed), one chunk per document, source timestamps spread over 36
months, loaded with the product's own loader (documents, chunks, vectors, HNSW), objects on
`moto_server` (S3 over HTTP). Printed:

- rows/s archived by the product's keyset batches (write, read back, verify, receipts, delete,
  checkpoint, then index rebuild and VACUUM) vs a bare export of the same rows (one COPY out,
  one Parquet file per month written to the same server; no verification, no delete): the
  ratio is what the guarantees cost;
- the same rows archived from a month-partitioned copy of the collection (the partitioned
  layout: the same batches and files, but whole old months leave by DETACH PARTITION, are
  checked against the files and dropped; no row delete, no VACUUM, no index rebuild), and
  its hot search p50 before and after;
- `get` latency p50 of a live document (Postgres) vs an archived one (ranged Parquet read);
- HNSW search p50 on the hot table before and after archiving half the rows;
- search p50 with the archive included (exact over the archived half, cached);
- `archive_reconciles` on the result.

Last line: `parquet_bytes_ratio=<Parquet bytes of the embedding column per vector / (4 x dims)>`
(goal <= 0.9); the whole vector files' bytes per vector (text and metadata included) are
printed above it.

    .venv/bin/python bench/archive.py [--rows 200000] [--queries 200] [--dsn DSN]
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import json
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

NOW = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)
MONTHS = 36


def dated_rows(n: int):
    """(vector rows with source timestamps and content hashes that match their text, vectors)."""
    rows, vectors = common.scifact(n)
    out = []
    for i, (chunk_id, doc_id, seq, _, text, metadata, _) in enumerate(rows):
        ts = NOW - dt.timedelta(days=30.4 * MONTHS * i / n)
        out.append((chunk_id, doc_id, seq, hashlib.sha256(text.encode()).hexdigest(), text, metadata, ts))
    return out, vectors


def load_catalog_rows(vp, name: str, rows) -> None:
    """The documents and chunks rows the vector rows belong to (one chunk per document)."""
    now = dt.datetime.now(dt.timezone.utc)
    with vp.pool().connection() as conn, conn.transaction():
        with conn.cursor().copy(
            "COPY vector_platform.documents (collection, doc_id, body, content_hash, metadata, source_ts, chunked_hash, "
            "first_seen_at, updated_at) FROM STDIN"
        ) as copy:
            for _, doc_id, _, _, text, metadata, ts in rows:
                doc_hash = hashlib.sha256(f"\x00{text}".encode()).hexdigest()
                copy.write_row((name, doc_id, text, doc_hash, json.dumps(metadata), ts, doc_hash, now, now))
        with conn.cursor().copy(
            "COPY vector_platform.chunks (chunk_id, collection, doc_id, seq, text, content_hash, token_count) FROM STDIN"
        ) as copy:
            for chunk_id, doc_id, seq, content_hash, text, _, _ in rows:
                copy.write_row((chunk_id, name, doc_id, seq, text, content_hash, len(text.split())))
        conn.execute("ANALYZE vector_platform.documents")
        conn.execute("ANALYZE vector_platform.chunks")


def timed(fn, n: int) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t0)
    return out


def bare_export(vp, table: str, cutoff: dt.datetime, prefix: str) -> tuple[int, float]:
    """The baseline: the old rows out by one COPY, one Parquet file per month to the same store."""
    from psycopg import sql

    from vector_platform import tables
    from vector_platform.tiers.snapshots import arrow_schema

    store = vp.store()
    t0 = time.perf_counter()
    with vp.pool().connection() as conn:
        from pgvector.psycopg import register_vector

        register_vector(conn)
        with conn.cursor(binary=True) as cur:
            cur.execute(sql.SQL(
                "SELECT chunk_id::text, doc_id, seq, content_hash, text, metadata::text, source_ts, updated_at, embedding "
                "FROM {} WHERE source_ts < %s ORDER BY source_ts").format(tables.table_id(table)), (cutoff,))
            rows = cur.fetchall()
    schema = arrow_schema(384)
    by_month: dict[tuple[int, int], list] = {}
    for r in rows:
        by_month.setdefault((r[6].year, r[6].month), []).append(r)
    for (year, month), month_rows in by_month.items():
        columns = list(zip(*(r[:8] for r in month_rows)))
        arrays = [pa.array(v, type=schema.field(i).type) for i, v in enumerate(columns)]
        matrix = np.vstack([r[8].to_numpy() for r in month_rows]).astype(np.float32)
        arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), 384))
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_arrays(arrays, schema=schema), buf, compression="zstd")
        store.put_bytes(f"{prefix}/year={year}/month={month:02d}.parquet", buf.getvalue())
    return len(rows), time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn")
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    f: dict[str, float] = {}
    with common.s3_bench_home():
        from vector_platform.archive import rows as archive
        from vector_platform.archive.reconcile import archive_reconciles

        with common.server(args.dsn) as dsn:
            vp = common.platform(dsn, "s3://bench/platform")
            rows, vectors = dated_rows(args.rows)
            name = "bench_archive"
            t0 = time.perf_counter()
            table = common.load_collection(vp, name, rows, vectors)
            load_catalog_rows(vp, name, rows)
            f["load_s"] = time.perf_counter() - t0
            cutoff = NOW - dt.timedelta(days=30.4 * MONTHS / 2)
            old_ids = [r[1] for r in rows if r[6] < cutoff]
            live_ids = [r[1] for r in rows if r[6] >= cutoff]
            queries = common.query_vectors(args.queries)

            def search(i, **kw):
                return vp.search(vector=queries[i % len(queries)], collections=[name], k=10, **kw)

            timed(search, 20)  # warm up
            before = timed(search, args.queries)
            get_hot = timed(lambda i: vp.get(name, live_ids[(i * 7919) % len(live_ids)]), args.queries)

            exported, f["bare_export_s"] = bare_export(vp, table, cutoff, "baseline")
            t0 = time.perf_counter()
            report = archive.archive_rows(vp.pool(), vp.store(), dsn, name, cutoff)
            f["archive_s"] = time.perf_counter() - t0
            assert report.documents == len(old_ids) == exported, (report.documents, len(old_ids), exported)

            timed(search, 20)
            after = timed(search, args.queries)
            get_archived = timed(lambda i: vp.get(name, old_ids[(i * 7919) % len(old_ids)]), args.queries)
            search(0, include_archive=True)  # fetch the archive into the local cache
            with_archive = timed(lambda i: search(i, include_archive=True), args.queries)
            reconciled = archive_reconciles(vp.pool(), vp.store(), name)
            assert not reconciled["problems"], reconciled["problems"]

            # The partitioned layout, same rows, same cutoff.
            pname = "bench_archive_parts"
            prows = [(uuid.UUID(int=uuid.UUID(str(r[0])).int + 2**96), *r[1:]) for r in rows]  # chunk ids are global
            ptable = common.load_collection(vp, pname, prows, vectors, partitioned=True)
            load_catalog_rows(vp, pname, prows)

            def psearch(i):
                return vp.search(vector=queries[i % len(queries)], collections=[pname], k=10)

            timed(psearch, 20)
            p_before = timed(psearch, args.queries)
            t0 = time.perf_counter()
            preport = archive.archive_rows(vp.pool(), vp.store(), dsn, pname, cutoff)
            f["archive_parts_s"] = time.perf_counter() - t0
            assert preport.documents == len(old_ids) and preport.partitions_dropped > 0, preport
            timed(psearch, 20)
            p_after = timed(psearch, args.queries)
            preconciled = archive_reconciles(vp.pool(), vp.store(), pname)
            assert not preconciled["problems"], preconciled["problems"]
            with vp.pool().connection() as conn:
                from vector_platform import tables as vtables

                partitions_left = len(vtables.partitions(conn, ptable))

            with vp.pool().connection() as conn:
                keys = [r[0] for r in conn.execute(
                    "SELECT key FROM vector_platform.archive_files WHERE collection = %s AND kind = 'vectors'", (name,))]
            store = vp.store()
            embedding_bytes = total_bytes = vector_rows = 0
            for key in keys:
                with store.open_input(key) as src:
                    meta = pq.ParquetFile(src).metadata
                vector_rows += meta.num_rows
                for g in range(meta.num_row_groups):
                    group = meta.row_group(g)
                    for c in range(group.num_columns):
                        column = group.column(c)
                        total_bytes += column.total_compressed_size
                        if column.path_in_schema.startswith("embedding"):
                            embedding_bytes += column.total_compressed_size
            file_bytes = sum(store.size_of(k) for k in keys)
    n_old = report.documents
    print(f"{args.rows} rows x 384 d, 1 chunk per document, {MONTHS} months; archived the older {n_old} "
          f"({report.batches} batches of {archive.BATCH_DOCUMENTS}, {report.files} files) to moto_server (S3 over HTTP)")
    print(f"load (COPY documents, chunks, vectors + HNSW) {f['load_s']:.1f} s")
    ours_rate, bare_rate = n_old / f["archive_s"], exported / f["bare_export_s"]
    print(f"archive, keyset batches: {ours_rate:8.0f} rows/s ({f['archive_s']:.1f} s, of which index rebuild + VACUUM "
          f"{report.vacuum_seconds:.1f} s)")
    print(f"bare export (1 COPY, a file a month, no verify, no delete): {bare_rate:8.0f} rows/s ({f['bare_export_s']:.1f} s)")
    batches_rate = n_old / (f["archive_s"] - report.vacuum_seconds)
    print(f"  the batches alone (before the index rebuild and VACUUM): {batches_rate:8.0f} rows/s")
    print(f"batches_over_bare_export_rate={ours_rate / bare_rate:.3f} (batches alone {batches_rate / bare_rate:.3f})")
    parts_rate = preport.documents / f["archive_parts_s"]
    print(f"archive, partitioned layout: {parts_rate:8.0f} rows/s ({f['archive_parts_s']:.1f} s: {preport.partitions_dropped} "
          f"month partitions detached, checked and dropped, {preport.partition_rows_dropped} rows; the cutoff month's "
          f"rows by key; VACUUM of that month {preport.vacuum_seconds:.1f} s)")
    print(f"partitions_over_batches_rate={parts_rate / ours_rate:.2f} (over bare export {parts_rate / bare_rate:.3f})")
    print(f"partitioned hot HNSW search p50: before {common.pct(p_before, 50):.3f} ms, after {common.pct(p_after, 50):.3f} ms "
          f"({partitions_left} partitions left)")
    print(f"get p50: live {common.pct(get_hot, 50):.2f} ms, archived {common.pct(get_archived, 50):.2f} ms "
          f"(p95 {common.pct(get_hot, 95):.2f} / {common.pct(get_archived, 95):.2f} ms)")
    print(f"hot HNSW search p50: before {common.pct(before, 50):.3f} ms ({args.rows} rows), "
          f"after {common.pct(after, 50):.3f} ms ({args.rows - n_old} rows); "
          f"with the archive included {common.pct(with_archive, 50):.2f} ms (exact over {n_old} archived rows, cached)")
    print(f"archive_reconciles: passed, {reconciled['sampled_documents']} documents and {reconciled['sampled_vectors']} vectors read back")
    print(f"vector files: {file_bytes / vector_rows:.0f} bytes per row in all (text, metadata, vector); "
          f"raw float32 vector {4 * 384} bytes")
    print(f"parquet_bytes_ratio={embedding_bytes / vector_rows / (4 * 384):.3f}")


if __name__ == "__main__":
    main()
