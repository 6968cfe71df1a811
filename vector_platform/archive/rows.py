"""Row archival, row layout: aged documents, with their chunks and vectors, leave Postgres
for Parquet files on the object store, in keyset batches, receipt before delete.

A job archives the live documents of one collection whose source timestamp is older than its
cutoff, in (source timestamp, document id) order, a batch at a time (default 500 documents),
so a batch falls in one or two source months. For each batch:

1. the batch's rows are read: documents, and each attached model's vector rows (chunk id,
   document id, text, metadata, timestamps, embedding: the snapshot columns);
2. they are written to `archive/<collection>/year=YYYY/month=MM/documents/…` and
   `…/vectors/<model>/…` (one file per source month and kind), under keys fixed by the job
   and the batch number, so a resumed job writes the same objects again;
3. every file is read back: bytes (sha256), rows, and a hash over its ids must match;
4. their receipts are committed (`archive_files`);
5. then, in one short transaction under the collection's writer lock, the rows go: vectors
   first, then chunks, then documents; `archived_documents` records where each went, and the
   job's checkpoint moves past the batch.

A kill anywhere leaves either the rows live (before 5; the re-run writes the same files and
receipts again) or the batch done and checkpointed: nothing lost, nothing twice. Ingest
leaves an archived document archived while its content is unchanged (see
`catalog.documents.drop_staged_archived`).

A month-partitioned vector table (the partitioned layout) keeps, at step 5, its rows of
months wholly before the cutoff, checked to be exactly what the files hold; once the batches
are done, `archive.partitions` detaches those months' partitions, checks them against the
files and drops them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
from psycopg import sql
from psycopg_pool import ConnectionPool

from vector_platform import catalog, clock, faults, tables
from vector_platform.locks import lock_key, writer_lock
from vector_platform.object_store import ObjectStore
from vector_platform.tiers.snapshots import rows_by_chunk_ids

BATCH_DOCUMENTS = 1000
UPLOAD_THREADS = 4
REINDEX_FRACTION = 0.2  # share of a table's rows deleted by a job from which its HNSW index is rebuilt
DOCS_PER_ROW_GROUP = 100

DOCUMENT_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("title", pa.string()),
        ("body", pa.string()),
        ("content_hash", pa.string()),
        ("metadata", pa.string()),  # jsonb's own text form
        ("source_ts", pa.timestamp("us", tz="UTC")),
        ("first_seen_at", pa.timestamp("us", tz="UTC")),
        ("updated_at", pa.timestamp("us", tz="UTC")),
    ]
)


class ArchiveError(RuntimeError):
    """An archive file could not be written or verified: nothing of its batch was deleted."""


class ArchiveStoreError(ArchiveError, OSError):
    """The object store failed while a batch's file was written or read back (still an OSError,
    as the store's own error was): nothing of the batch was deleted."""


@dataclass
class ArchiveReport:
    collection: str
    job_id: int
    cutoff: dt.datetime
    resumed: bool
    batches: int = 0
    documents: int = 0
    chunks: int = 0
    vectors: int = 0
    bytes: int = 0
    files: int = 0
    seconds: float = 0.0
    vacuum_seconds: float = 0.0
    months: list[str] = field(default_factory=list)
    layout: str = "rows"
    partitions_dropped: int = 0  # month partitions detached, checked against the archive and dropped
    partition_rows_dropped: int = 0
    partitions_kept: list[str] = field(default_factory=list)

    def as_metadata(self) -> dict[str, Any]:
        return {**{k: v for k, v in self.__dict__.items() if k != "cutoff"}, "cutoff": self.cutoff.isoformat()}


def cutoff_for(days: float, now: dt.datetime | None = None) -> dt.datetime:
    return (now or clock.now()) - dt.timedelta(days=days)


def archive_rows(
    pool: ConnectionPool,
    store: ObjectStore,
    dsn: str,
    collection: str,
    cutoff: dt.datetime,
    batch_documents: int = BATCH_DOCUMENTS,
    run_id: str | None = None,
    say: Callable[[str], None] = lambda _: None,
) -> ArchiveReport:
    """Archive the collection's live, fully ingested documents with a source timestamp before
    `cutoff`. An unfinished job of the collection is resumed, with the stricter of its cutoff
    and this one. Refused while another archival run of the collection is in progress."""
    started = time.perf_counter()
    with _only_job(dsn, collection):
        with pool.connection() as conn, conn.transaction():
            layout = "partitions" if partitioned_tables(conn, collection) else "rows"
            job_id, job_cutoff, resumed = _open_job(conn, collection, cutoff, run_id, layout)
        return _run_job(pool, store, dsn, collection, job_id, job_cutoff, resumed, layout, batch_documents, started, say)


def partitioned_tables(conn, collection: str) -> dict[str, str]:
    """model key -> vector table, for the collection's month-partitioned vector tables."""
    return {k: t for k, t in tables.collection_tables(conn, collection).items() if tables.is_partitioned(conn, t)}


def wholly_before(ym: tuple[int, int], cutoff: dt.datetime) -> bool:
    """Whether a source month ends before the cutoff: its partition can leave as a whole."""
    return tables.month_bounds(*ym)[1] <= cutoff


@contextlib.contextmanager
def _only_job(dsn: str, collection: str) -> Iterator[None]:
    """One archival run per collection at a time (the writer lock alone would let two runs
    interleave their batches on one job): a second is refused, saying so."""
    conn = psycopg.connect(dsn, autocommit=True, application_name=f"vector_platform archival {collection}"[:63])
    try:
        if not conn.execute("SELECT pg_try_advisory_lock(%s)", (lock_key("row_archive", collection),)).fetchone()[0]:
            raise ArchiveError(f"an archival job of {collection!r} is already running; nothing done")
        yield
    finally:
        conn.close()


def _run_job(pool, store, dsn, collection, job_id, job_cutoff, resumed, layout, batch_documents, started, say) -> ArchiveReport:
    report = ArchiveReport(collection, job_id, job_cutoff, resumed, layout=layout)
    if resumed:
        say(f"{collection}: resuming archival job {job_id} (cutoff {job_cutoff:%Y-%m-%d})")
    from vector_platform.archive import partitions  # it builds on this module

    parts = partitions.PartitionReport()
    try:
        partitions.finish_detached(pool, store, dsn, collection, parts, say)  # what a killed run left
        more = True
        while more:
            more = _archive_batch(pool, store, dsn, collection, job_id, job_cutoff, batch_documents, report, say)
            if report.layout == "partitions":
                # Keyset order: months that end before the batch's last timestamp are done, so
                # they leave now (each month's archived rows stay searchable live only until then).
                with pool.connection() as conn:
                    (last_ts,) = conn.execute("SELECT last_ts FROM vector_platform.archival_jobs WHERE id = %s", (job_id,)).fetchone()
                done = job_cutoff if not more or last_ts is None else min(job_cutoff, last_ts)
                partitions.detach_old_months(pool, store, dsn, collection, job_id, done, parts, say)
    except Exception as err:
        with pool.connection() as conn:
            conn.execute(
                "UPDATE vector_platform.archival_jobs SET status = 'failed', error = %s, updated_at = %s WHERE id = %s",
                (f"{type(err).__name__}: {err}"[:2000], clock.now(), job_id),
            )
        raise
    report.partitions_dropped = parts.dropped
    report.partition_rows_dropped = parts.rows_dropped
    report.partitions_kept = parts.kept
    with pool.connection() as conn:
        _write_manifest(conn, store, collection, job_id)  # before 'completed': a completed job always has one
        conn.execute(
            "UPDATE vector_platform.archival_jobs SET status = 'completed', error = NULL, finished_at = %s, updated_at = %s "
            "WHERE id = %s",
            (clock.now(), clock.now(), job_id),
        )
    if report.documents or report.partitions_kept:
        report.vacuum_seconds = _tidy(pool, collection, job_id, job_cutoff, say)
    report.seconds = round(time.perf_counter() - started, 3)
    return report


def _tidy(pool: ConnectionPool, collection: str, job_id: int, cutoff: dt.datetime, say) -> float:
    """After a job deleted rows: an HNSW index keeps deleted rows in its graph until a vacuum
    repairs it (scans walk past them and can come back short of k), and repairing is slow
    when much was deleted. As pgvector advises, a table that lost REINDEX_FRACTION of its
    rows or more gets its index rebuilt first (REINDEX CONCURRENTLY; a failed rebuild's own
    leftover is dropped and the old index kept), then VACUUM (ANALYZE). Searches and ingest go
    on meanwhile. A failure here comes after the job completed: nothing is lost, and the next
    job tidies again.

    A partitioned table lost whole months by DROP, which leaves nothing to repair: only its
    partitions from the cutoff's month on (where rows were deleted by key) are vacuumed."""
    began = time.perf_counter()
    with pool.connection() as conn:
        coll = catalog.get_collection(conn, collection)
        deleted = dict(conn.execute(
            "SELECT model_key, sum(rows) FROM vector_platform.archive_files WHERE job_id = %s AND kind = 'vectors' "
            "GROUP BY model_key", (job_id,)).fetchall())
        for model_key in coll.models:
            table = catalog.vector_table_name(conn, collection, model_key)
            if not tables.table_exists(conn, table):
                continue
            if tables.is_partitioned(conn, table):
                touched = months_touched(conn, job_id, model_key)
                for part, ym in tables.partitions(conn, table).items():
                    if ym is not None and f"{ym[0]:04d}-{ym[1]:02d}" in touched:
                        conn.execute(sql.SQL("VACUUM (ANALYZE) {}").format(tables.table_id(part)))
                conn.execute(sql.SQL("ANALYZE {}").format(tables.table_id(table)))
                continue
            left = tables.table_stats(conn, table)[0]
            gone = int(deleted.get(model_key) or 0)
            index = tables.current_index(conn, table)
            if index and gone and gone / (gone + left) >= REINDEX_FRACTION:
                spec = catalog.get_model(conn, model_key)
                work_mem_mb = int(min(1024, max(64, tables.graph_bytes_estimate(left, spec, index["m"]) * 1.3 / 2**20)))
                try:
                    conn.execute("SELECT set_config('maintenance_work_mem', %s, false)", (f"{work_mem_mb}MB",))
                    conn.execute(sql.SQL("REINDEX INDEX CONCURRENTLY {}").format(sql.Identifier(tables.VECTORS, index["name"])))
                except psycopg.Error as err:
                    say(f"{collection}/{model_key}: rebuilding the index failed ({err}); vacuuming it instead")
                    # Only this rebuild's own leftover (PostgreSQL names it <index>_ccnew): an
                    # index another run is building right now is not ours to drop.
                    for (leftover,) in conn.execute(
                        "SELECT i.relname FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid "
                        "JOIN pg_namespace n ON n.oid = i.relnamespace WHERE n.nspname = %s AND NOT x.indisvalid "
                        "AND i.relname LIKE %s", (tables.VECTORS, index["name"] + "\\_ccnew%")).fetchall():
                        conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(tables.VECTORS, leftover)))
                        say(f"{collection}/{model_key}: dropped the failed rebuild's leftover {leftover}")
                finally:
                    conn.execute("RESET maintenance_work_mem")
            conn.execute(sql.SQL("VACUUM (ANALYZE) {}").format(tables.table_id(table)))
    seconds = round(time.perf_counter() - began, 3)
    say(f"{collection}: vector tables tidied after the archival in {seconds:.1f} s")
    return seconds


def months_touched(conn, job_id: int, model_key: str) -> set[str]:
    """The source months ('YYYY-MM') a job wrote vector files of, for one model."""
    return {f"{y:04d}-{m:02d}" for y, m in conn.execute(
        "SELECT DISTINCT year, month FROM vector_platform.archive_files WHERE job_id = %s AND model_key = %s",
        (job_id, model_key)).fetchall()}


def manifest_key(collection: str, job_id: int) -> str:
    return f"archive/{collection}/manifests/job-{job_id:06d}.json"


def _write_manifest(conn, store: ObjectStore, collection: str, job_id: int) -> None:
    """The job's manifest next to its files: cutoff, counts, and every file with its checksum,
    rows, model and fingerprint, so the archive can be read without the catalog."""
    job = conn.execute(
        "SELECT cutoff, started_at, documents, chunks, vectors, bytes, batches, layout FROM vector_platform.archival_jobs "
        "WHERE id = %s",
        (job_id,),
    ).fetchone()
    columns = ("batch", "kind", "model_key", "fingerprint", "dims", "storage_type", "year", "month", "first_key", "last_key",
               "key", "sha256", "bytes", "rows", "row_groups", "id_hash")
    query = sql.SQL("SELECT {} FROM vector_platform.archive_files WHERE job_id = %s ORDER BY id").format(
        sql.SQL(", ").join(map(sql.Identifier, columns)))
    files = [dict(zip(columns, row)) for row in conn.execute(query, (job_id,))]
    manifest = {
        "format": 1, "collection": collection, "job_id": job_id, "layout": job[7], "cutoff": job[0].isoformat(),
        "started_at": job[1].isoformat(), "documents": job[2], "chunks": job[3], "vectors": job[4], "bytes": job[5],
        "batches": job[6], "files": files,
        "partitions": [dict(zip(("model_key", "partition", "year", "month", "rows", "remainder_rows", "state"), r))
                       for r in conn.execute(
                           "SELECT model_key, partition, year, month, rows, remainder_rows, state "
                           "FROM vector_platform.archive_partitions WHERE job_id = %s ORDER BY id", (job_id,))],
    }
    store.put_bytes(manifest_key(collection, job_id), json.dumps(manifest, indent=1, sort_keys=True).encode())


def _open_job(conn, collection: str, cutoff: dt.datetime, run_id: str | None, layout: str) -> tuple[int, dt.datetime, bool]:
    row = conn.execute(
        "SELECT id, cutoff FROM vector_platform.archival_jobs WHERE collection = %s AND status <> 'completed' FOR UPDATE",
        (collection,),
    ).fetchone()
    now = clock.now()
    if row is not None:
        # The stricter of the job's cutoff and today's: never archive what the rule now keeps.
        kept = min(row[1], cutoff)
        conn.execute(
            "UPDATE vector_platform.archival_jobs SET status = 'running', cutoff = %s, updated_at = %s, run_id = %s WHERE id = %s",
            (kept, now, run_id, row[0]),
        )
        return row[0], kept, True
    job_id = conn.execute(
        """
        INSERT INTO vector_platform.archival_jobs (collection, layout, cutoff, status, started_at, updated_at, run_id)
        VALUES (%s, %s, %s, 'running', %s, %s, %s) RETURNING id
        """,
        (collection, layout, cutoff, now, now, run_id),
    ).fetchone()[0]
    return job_id, cutoff, False


def _archive_batch(pool, store, dsn, collection, job_id, cutoff, batch_documents, report: ArchiveReport, say) -> bool:
    """One batch; False when nothing is left."""
    with writer_lock(dsn, collection, say=say), pool.connection() as conn:
        coll = catalog.get_collection(conn, collection)
        if coll.tier != "active":  # evicted or archived since the job began: its rows are not ours to move
            raise ArchiveError(f"collection {collection!r} is {coll.tier}: row archival works on active collections")
        models = {}
        for model_key in coll.models:
            table = catalog.vector_table_name(conn, collection, model_key)
            if not tables.table_exists(conn, table):
                raise ArchiveError(f"{collection}/{model_key} has no vector table (ingest it first); nothing archived")
            models[model_key] = (table, catalog.get_model(conn, model_key), catalog.table_fingerprint(conn, collection, model_key))
        batch_no, last_ts, last_key = conn.execute(
            "SELECT batches, last_ts, last_key FROM vector_platform.archival_jobs WHERE id = %s", (job_id,)).fetchone()
        _forget_unfinished_batch(conn, store, collection, job_id, batch_no, sweep=report.resumed and report.batches == 0)
        docs = conn.execute(
            sql.SQL(
                """
                SELECT doc_id, title, body, content_hash, metadata::text, source_ts, first_seen_at, updated_at
                FROM vector_platform.documents d
                WHERE collection = %(c)s AND deleted_at IS NULL AND source_ts < %(cutoff)s
                  AND (%(after_ts)s::timestamptz IS NULL OR (source_ts, doc_id) > (%(after_ts)s, %(after)s))
                  AND chunked_hash = content_hash {complete}
                ORDER BY source_ts, doc_id LIMIT %(n)s
                """
            ).format(complete=sql.SQL("").join(
                # Only documents ingest has finished: every chunk has its vector under every model.
                sql.SQL(
                    " AND NOT EXISTS (SELECT 1 FROM vector_platform.chunks c WHERE c.collection = d.collection "
                    "AND c.doc_id = d.doc_id AND NOT EXISTS (SELECT 1 FROM {} v WHERE v.chunk_id = c.chunk_id "
                    "AND v.content_hash = c.content_hash))"
                ).format(tables.table_id(vtable)) for vtable, _, _ in models.values()
            )),
            {"c": collection, "cutoff": cutoff, "after_ts": last_ts, "after": last_key, "n": batch_documents},
        ).fetchall()
        if not docs:
            return False
        doc_ids = [d[0] for d in docs]
        chunks_of: dict[str, list] = {}
        for chunk_id, doc_id in conn.execute(
            "SELECT chunk_id, doc_id FROM vector_platform.chunks WHERE collection = %s AND doc_id = ANY(%s)", (collection, doc_ids)
        ):
            chunks_of.setdefault(doc_id, []).append(chunk_id)
        chunk_ids = [c for ids in chunks_of.values() for c in ids]

        # 1-3: write and verify every file of the batch, month by month.
        by_month: dict[tuple[int, int], list[tuple]] = {}
        for doc in docs:
            by_month.setdefault(tables.month_of(doc[5]), []).append(doc)
        tag = f"job-{job_id:06d}-batch-{batch_no:06d}"  # fixed by the checkpoint: a resumed batch rewrites it
        writes: list[tuple] = []
        vectors_total = 0
        for (year, month), month_docs in sorted(by_month.items()):
            base = f"archive/{collection}/year={year:04d}/month={month:02d}"
            ids = [d[0] for d in month_docs]
            table = pa.Table.from_pylist(
                [dict(zip(DOCUMENT_SCHEMA.names, d)) for d in month_docs], schema=DOCUMENT_SCHEMA
            )
            writes.append((f"{base}/documents/{tag}.parquet", table, "doc_id", DOCS_PER_ROW_GROUP,
                           dict(kind="documents", model_key="", fingerprint=None, year=year, month=month,
                                first_key=ids[0], last_key=ids[-1], batch=batch_no)))
            for model_key, (vtable, spec, fingerprint) in models.items():
                page = rows_by_chunk_ids(conn, vtable, spec.dims, [c for d in ids for c in chunks_of.get(d, [])])
                vectors_total += page.num_rows
                writes.append((f"{base}/vectors/{model_key}/{tag}.parquet", page, "chunk_id", None,
                               dict(kind="vectors", model_key=model_key, fingerprint=fingerprint, year=year,
                                    month=month, first_key=ids[0], last_key=ids[-1], batch=batch_no)))
        # Object stores answer each request slowly but many at once: the batch's files are
        # written and read back side by side. Any failure fails the batch before its receipts.
        with ThreadPoolExecutor(max_workers=UPLOAD_THREADS) as pool_of_uploads:
            receipts = list(pool_of_uploads.map(lambda w: write_verified(store, *w), writes))
        faults.point("archive_rows.after_upload")

        # 4: the receipts, before anything is deleted.
        with conn.transaction():
            file_ids = {r["key"]: record_receipt(conn, job_id, collection, store, r, spec_of(models, r)) for r in receipts}
        faults.point("archive_rows.after_receipts")

        # 5: the delete, vectors before chunks before documents, with the checkpoint.
        with conn.transaction():
            # What is deleted must be exactly what the files hold, or nothing is (the rollback).
            held = {r["key"]: r["rows"] for r in receipts}
            # A partitioned table keeps its rows in partitions of months wholly before the
            # cutoff (by the row's own timestamp, which is where the row is): those partitions
            # leave whole once the batches are past them (archive.partitions).
            keep_before = tables.month_bounds(*tables.month_of(cutoff))[0]
            archived_vectors = 0
            for model_key, (vtable, _, _) in models.items():
                if tables.is_partitioned(conn, vtable):
                    old_month = sql.SQL(tables.PARTITION_KEY + " < %(before)s")
                    kept = conn.execute(
                        sql.SQL("SELECT count(*) FROM {} WHERE chunk_id = ANY(%(ids)s) AND {}").format(tables.table_id(vtable), old_month),
                        {"ids": chunk_ids, "before": keep_before},
                    ).fetchone()[0]
                    gone = conn.execute(
                        sql.SQL("DELETE FROM {} WHERE chunk_id = ANY(%(ids)s) AND NOT ({})").format(tables.table_id(vtable), old_month),
                        {"ids": chunk_ids, "before": keep_before},
                    ).rowcount
                else:
                    kept = 0
                    gone = conn.execute(
                        sql.SQL("DELETE FROM {} WHERE chunk_id = ANY(%s)").format(tables.table_id(vtable)), (chunk_ids,)
                    ).rowcount
                written = sum(held[r["key"]] for r in receipts if r["model_key"] == model_key)
                archived_vectors += gone + kept
                if gone + kept != written:
                    raise ArchiveError(f"{collection}/{model_key}: the delete would remove {gone} vectors and keep {kept} "
                                       f"for their partition's detach, the files hold {written}; nothing deleted")
            gone_chunks = conn.execute(
                "DELETE FROM vector_platform.chunks WHERE collection = %s AND doc_id = ANY(%s)", (collection, doc_ids)
            ).rowcount
            if gone_chunks != len(chunk_ids):
                raise ArchiveError(f"{collection}: {gone_chunks} chunks to delete, {len(chunk_ids)} read; nothing deleted")
            now = clock.now()
            by_id = {d[0]: d for d in docs}
            placed = [(doc_id, file_ids[r["key"]], position // DOCS_PER_ROW_GROUP)
                      for r in receipts if r["kind"] == "documents" for position, doc_id in enumerate(r["ids"])]
            conn.execute(
                """
                INSERT INTO vector_platform.archived_documents
                    (collection, doc_id, content_hash, source_ts, file_id, row_group, archived_at)
                SELECT %s, doc_id, content_hash, source_ts, file_id, row_group, %s
                FROM unnest(%s::text[], %s::text[], %s::timestamptz[], %s::bigint[], %s::int[])
                    AS p(doc_id, content_hash, source_ts, file_id, row_group)
                ON CONFLICT (collection, doc_id) DO UPDATE SET content_hash = excluded.content_hash,
                    source_ts = excluded.source_ts, file_id = excluded.file_id, row_group = excluded.row_group,
                    archived_at = excluded.archived_at
                """,
                (collection, now, [p[0] for p in placed], [by_id[p[0]][3] for p in placed], [by_id[p[0]][5] for p in placed],
                 [p[1] for p in placed], [p[2] for p in placed]),
            )
            gone_docs = conn.execute(
                "DELETE FROM vector_platform.documents WHERE collection = %s AND doc_id = ANY(%s)", (collection, doc_ids)
            ).rowcount
            if gone_docs != sum(held[r["key"]] for r in receipts if r["kind"] == "documents"):
                raise ArchiveError(f"{collection}: {gone_docs} documents to delete, the files hold another count; nothing deleted")
            nbytes = sum(r["bytes"] for r in receipts)
            conn.execute(
                """
                UPDATE vector_platform.archival_jobs SET last_ts = %s, last_key = %s, batches = batches + 1,
                    documents = documents + %s,
                    chunks = chunks + %s, vectors = vectors + %s, bytes = bytes + %s, updated_at = %s
                WHERE id = %s
                """,
                (docs[-1][5], doc_ids[-1], gone_docs, gone_chunks, archived_vectors, nbytes, now, job_id),  # what the deletes removed
            )
    report.batches += 1
    report.documents += len(doc_ids)
    report.chunks += len(chunk_ids)
    report.vectors += vectors_total
    report.bytes += nbytes
    report.files += len(receipts)
    report.months = sorted(set(report.months) | {f"{y:04d}-{m:02d}" for y, m in by_month})
    say(f"{collection}: archived {report.documents} documents so far ({report.batches} batches)")
    faults.point("archive_rows.after_batch")
    return len(docs) == batch_documents


def _id_hash(ids) -> str:
    return hashlib.sha256(b"".join(str(i).encode() + b"\n" for i in sorted(ids))).hexdigest()


def write_verified(store: ObjectStore, key: str, table: pa.Table, id_column: str, row_group_rows: int | None,
                    receipt: dict[str, Any]) -> dict[str, Any]:
    """Write one Parquet file, read it back, and return its receipt (not yet recorded)."""
    buf = io.BytesIO()
    vectors = "embedding" in table.column_names
    # Dictionary encoding, when on, wins over byte-stream-split: the vectors get neither (a
    # float32 vector then takes about 0.85 of its raw bytes instead of about 1.1 to 1.45).
    pq.write_table(table, buf, compression="zstd", row_group_size=row_group_rows or max(1, table.num_rows),
                   use_dictionary=[c for c in table.column_names if c != "embedding"],
                   use_byte_stream_split=["embedding.list.element"] if vectors else False)
    data = buf.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    ids = table.column(id_column).to_pylist()
    try:
        store.put_bytes(key, data)
        back = store.get_bytes(key)
    except OSError as err:  # the store's own text may name neither the file nor what it means for the rows
        raise ArchiveStoreError(
            f"{key}: the object store failed while the file was written and read back ({err}); nothing of its batch "
            "was deleted, and the next run resumes the job"
        ) from err
    if hashlib.sha256(back).hexdigest() != sha or len(back) != len(data):
        raise ArchiveError(f"{key}: read back {len(back)} bytes that differ from the {len(data)} written; nothing deleted")
    parquet = pq.ParquetFile(io.BytesIO(back))
    read_ids = parquet.read(columns=[id_column]).column(id_column).to_pylist()
    if parquet.metadata.num_rows != table.num_rows or _id_hash(read_ids) != _id_hash(ids):
        raise ArchiveError(f"{key}: the rows read back differ from the rows written; nothing deleted")
    return {**receipt, "key": key, "sha256": sha, "bytes": len(data), "rows": table.num_rows,
            "row_groups": parquet.metadata.num_row_groups, "id_hash": _id_hash(ids), "ids": ids}


def spec_of(models: dict, receipt: dict[str, Any]):
    return models[receipt["model_key"]][1] if receipt["model_key"] else None


def record_receipt(conn, job_id: int, collection: str, store: ObjectStore, r: dict[str, Any], spec) -> int:
    return conn.execute(
        """
        INSERT INTO vector_platform.archive_files
            (job_id, batch, collection, kind, model_key, fingerprint, dims, storage_type, year, month, first_key, last_key,
             key, uri, sha256, bytes, rows, row_groups, id_hash, verified_at)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
        RETURNING id
        """,
        (job_id, r["batch"], collection, r["kind"], r["model_key"], r["fingerprint"], spec.dims if spec else None,
         spec.storage_type if spec else None, r["year"], r["month"], r["first_key"], r["last_key"], r["key"],
         store.uri(r["key"]), r["sha256"], r["bytes"], r["rows"], r["row_groups"], r["id_hash"], clock.now()),
    ).fetchone()[0]


def _forget_unfinished_batch(conn, store: ObjectStore, collection: str, job_id: int, batch_no: int, sweep: bool) -> None:
    """Receipts of batch `batch_no` exist only if a run died before that batch's delete
    committed (the commit moves the checkpoint past it): its rows are all still live, so its
    files and receipts are dropped, and the batch is written afresh from what is live now.
    `sweep` (a resumed job's first batch) also removes that batch's files that never got a
    receipt (a kill between upload and receipt)."""
    if sweep:
        name = f"job-{job_id:06d}-batch-{batch_no:06d}.parquet"
        for key in store.list(f"archive/{collection}"):
            if key.endswith("/" + name):
                store.delete(key, missing_ok=True)
    for file_id, key in conn.execute(
        "SELECT id, key FROM vector_platform.archive_files WHERE job_id = %s AND batch = %s", (job_id, batch_no)
    ).fetchall():
        store.delete(key, missing_ok=True)
        conn.execute("DELETE FROM vector_platform.archive_files WHERE id = %s", (file_id,))


def archive_summary(conn, collection: str, jobs: int = 5) -> dict[str, Any]:
    """What the row archive holds for a collection, and its last jobs (status, asset metadata)."""
    documents = conn.execute(
        "SELECT count(*) FROM vector_platform.archived_documents WHERE collection = %s", (collection,)).fetchone()[0]
    files, nbytes, vector_rows = conn.execute(
        "SELECT count(*), coalesce(sum(bytes), 0), coalesce(sum(rows) FILTER (WHERE kind = 'vectors'), 0) "
        "FROM vector_platform.archive_files WHERE collection = %s",
        (collection,),
    ).fetchone()
    last = conn.execute(
        "SELECT id, status, cutoff, documents, vectors, bytes, batches, started_at, finished_at, error "
        "FROM vector_platform.archival_jobs WHERE collection = %s ORDER BY id DESC LIMIT %s",
        (collection, jobs),
    ).fetchall()
    keys = ("id", "status", "cutoff", "documents", "vectors", "bytes", "batches", "started_at", "finished_at", "error")
    from vector_platform.archive.partitions import partition_summary

    parts = partition_summary(conn, collection)
    return {
        "documents": documents, "vector_rows": int(vector_rows), "files": files, "bytes": int(nbytes),
        "partitions_dropped": parts["dropped"], "partitions_pending": parts["pending"],
        "jobs": [{k: (v.isoformat() if isinstance(v, dt.datetime) else v) for k, v in zip(keys, row)} for row in last],
    }


def jobs_markdown(jobs: list[dict[str, Any]]) -> str:
    """The last jobs as a Markdown table (asset metadata in the UI)."""
    lines = ["| job | status | cutoff | documents | vectors | MiB | finished |", "|---|---|---|---|---|---|---|"]
    for j in jobs:
        lines.append(
            f"| {j['id']} | {j['status']} | {j['cutoff'][:10]} | {j['documents']} | {j['vectors']} | "
            f"{j['bytes'] / 2**20:.2f} | {(j['finished_at'] or '-')[:19]} |"
        )
    return "\n".join(lines)
