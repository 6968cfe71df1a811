"""Row archival, row layout: aged documents, with their chunks and vectors, leave Postgres
for Parquet files on the object store, in keyset batches, receipt before delete.

A job archives the live documents of one collection whose source timestamp is older than its
cutoff, in document-id order, a batch at a time (default 500 documents). For each batch:

1. the batch's rows are read: documents, and each attached model's vector rows (chunk id,
   document id, text, metadata, timestamps, embedding: the snapshot columns);
2. they are written to `archive/<collection>/year=YYYY/month=MM/documents/…` and
   `…/vectors/<model>/…` (one file per source month and kind), under keys fixed by the job
   and the batch's first document, so a resumed job writes the same objects again;
3. every file is read back: bytes (sha256), rows, and a hash over its ids must match;
4. their receipts are committed (`archive_files`);
5. then, in one short transaction under the collection's writer lock, the rows go: vectors
   first, then chunks, then documents; `archived_documents` records where each went, and the
   job's checkpoint moves past the batch.

A kill anywhere leaves either the rows live (before 5; the re-run writes the same files and
receipts again) or the batch done and checkpointed: nothing lost, nothing twice. Ingest
leaves an archived document archived while its content is unchanged (see
`catalog.documents.drop_staged_archived`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq
from psycopg import sql
from psycopg_pool import ConnectionPool

from vector_platform import catalog, clock, faults, tables
from vector_platform.locks import writer_lock
from vector_platform.object_store import ObjectStore
from vector_platform.tiers.snapshots import rows_by_chunk_ids

BATCH_DOCUMENTS = 500
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
    months: list[str] = field(default_factory=list)

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
    """Archive the collection's live documents with a source timestamp before `cutoff` (an
    unfinished job of the collection is resumed with its own cutoff)."""
    started = time.perf_counter()
    with pool.connection() as conn, conn.transaction():
        job_id, job_cutoff, resumed = _open_job(conn, collection, cutoff, run_id)
    report = ArchiveReport(collection, job_id, job_cutoff, resumed)
    if resumed:
        say(f"{collection}: resuming archival job {job_id} (cutoff {job_cutoff:%Y-%m-%d})")
    try:
        while _archive_batch(pool, store, dsn, collection, job_id, job_cutoff, batch_documents, report, say):
            pass
    except Exception as err:
        with pool.connection() as conn:
            conn.execute(
                "UPDATE vector_platform.archival_jobs SET status = 'failed', error = %s, updated_at = %s WHERE id = %s",
                (f"{type(err).__name__}: {err}"[:2000], clock.now(), job_id),
            )
        raise
    with pool.connection() as conn:
        conn.execute(
            "UPDATE vector_platform.archival_jobs SET status = 'completed', error = NULL, finished_at = %s, updated_at = %s "
            "WHERE id = %s",
            (clock.now(), clock.now(), job_id),
        )
    report.seconds = round(time.perf_counter() - started, 3)
    return report


def _open_job(conn, collection: str, cutoff: dt.datetime, run_id: str | None) -> tuple[int, dt.datetime, bool]:
    row = conn.execute(
        "SELECT id, cutoff FROM vector_platform.archival_jobs WHERE collection = %s AND status <> 'completed' FOR UPDATE",
        (collection,),
    ).fetchone()
    now = clock.now()
    if row is not None:
        conn.execute(
            "UPDATE vector_platform.archival_jobs SET status = 'running', updated_at = %s, run_id = %s WHERE id = %s",
            (now, run_id, row[0]),
        )
        return row[0], row[1], True
    job_id = conn.execute(
        """
        INSERT INTO vector_platform.archival_jobs (collection, layout, cutoff, status, started_at, updated_at, run_id)
        VALUES (%s, 'rows', %s, 'running', %s, %s, %s) RETURNING id
        """,
        (collection, cutoff, now, now, run_id),
    ).fetchone()[0]
    return job_id, cutoff, False


def _archive_batch(pool, store, dsn, collection, job_id, cutoff, batch_documents, report: ArchiveReport, say) -> bool:
    """One batch; False when nothing is left."""
    with writer_lock(dsn, collection, say=say), pool.connection() as conn:
        last_key = conn.execute("SELECT last_key FROM vector_platform.archival_jobs WHERE id = %s", (job_id,)).fetchone()[0]
        docs = conn.execute(
            """
            SELECT doc_id, title, body, content_hash, metadata::text, source_ts, first_seen_at, updated_at
            FROM vector_platform.documents
            WHERE collection = %s AND deleted_at IS NULL AND source_ts < %s AND (%s::text IS NULL OR doc_id > %s)
            ORDER BY doc_id LIMIT %s
            """,
            (collection, cutoff, last_key, last_key, batch_documents),
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
        coll = catalog.get_collection(conn, collection)
        models = {}
        for model_key in coll.models:
            table = catalog.vector_table_name(conn, collection, model_key)
            if tables.table_exists(conn, table):
                models[model_key] = (table, catalog.get_model(conn, model_key), catalog.table_fingerprint(conn, collection, model_key))

        # 1-3: write and verify every file of the batch, month by month.
        by_month: dict[tuple[int, int], list[tuple]] = {}
        for doc in docs:
            by_month.setdefault((doc[5].year, doc[5].month), []).append(doc)
        tag = f"job-{job_id:06d}-{hashlib.sha1(doc_ids[0].encode()).hexdigest()[:12]}"
        receipts: list[dict[str, Any]] = []
        vectors_total = 0
        for (year, month), month_docs in sorted(by_month.items()):
            base = f"archive/{collection}/year={year:04d}/month={month:02d}"
            ids = [d[0] for d in month_docs]
            table = pa.Table.from_pylist(
                [dict(zip(DOCUMENT_SCHEMA.names, d)) for d in month_docs], schema=DOCUMENT_SCHEMA
            )
            receipts.append(_write_verified(store, f"{base}/documents/{tag}.parquet", table, "doc_id", DOCS_PER_ROW_GROUP,
                                            dict(kind="documents", model_key="", fingerprint=None, year=year, month=month,
                                                 first_key=ids[0], last_key=ids[-1])))
            for model_key, (vtable, spec, fingerprint) in models.items():
                page = rows_by_chunk_ids(conn, vtable, spec.dims, [c for d in ids for c in chunks_of.get(d, [])])
                vectors_total += page.num_rows
                receipts.append(_write_verified(store, f"{base}/vectors/{model_key}/{tag}.parquet", page, "chunk_id", None,
                                                dict(kind="vectors", model_key=model_key, fingerprint=fingerprint, year=year,
                                                     month=month, first_key=ids[0], last_key=ids[-1])))
        faults.point("archive_rows.after_upload")

        # 4: the receipts, before anything is deleted.
        with conn.transaction():
            file_ids = {r["key"]: _record_receipt(conn, job_id, collection, store, r) for r in receipts}
        faults.point("archive_rows.after_receipts")

        # 5: the delete, vectors before chunks before documents, with the checkpoint.
        with conn.transaction():
            for vtable, _, _ in models.values():
                conn.execute(sql.SQL("DELETE FROM {} WHERE chunk_id = ANY(%s)").format(tables.table_id(vtable)), (chunk_ids,))
            conn.execute("DELETE FROM vector_platform.chunks WHERE collection = %s AND doc_id = ANY(%s)", (collection, doc_ids))
            now = clock.now()
            for r in receipts:
                if r["kind"] != "documents":
                    continue
                for position, doc_id in enumerate(r["ids"]):
                    doc = next(d for d in docs if d[0] == doc_id)
                    conn.execute(
                        """
                        INSERT INTO vector_platform.archived_documents
                            (collection, doc_id, content_hash, source_ts, file_id, row_group, archived_at)
                        VALUES (%s, %s, %s, %s, %s, %s, %s)
                        ON CONFLICT (collection, doc_id) DO UPDATE SET content_hash = excluded.content_hash,
                            source_ts = excluded.source_ts, file_id = excluded.file_id, row_group = excluded.row_group,
                            archived_at = excluded.archived_at
                        """,
                        (collection, doc_id, doc[3], doc[5], file_ids[r["key"]], position // DOCS_PER_ROW_GROUP, now),
                    )
            conn.execute("DELETE FROM vector_platform.documents WHERE collection = %s AND doc_id = ANY(%s)", (collection, doc_ids))
            nbytes = sum(r["bytes"] for r in receipts)
            conn.execute(
                """
                UPDATE vector_platform.archival_jobs SET last_key = %s, batches = batches + 1, documents = documents + %s,
                    chunks = chunks + %s, vectors = vectors + %s, bytes = bytes + %s, updated_at = %s
                WHERE id = %s
                """,
                (doc_ids[-1], len(doc_ids), len(chunk_ids), vectors_total, nbytes, now, job_id),
            )
    report.batches += 1
    report.documents += len(doc_ids)
    report.chunks += len(chunk_ids)
    report.vectors += vectors_total
    report.bytes += nbytes
    report.files += len(receipts)
    report.months = sorted(set(report.months) | {f"{y:04d}-{m:02d}" for y, m in by_month})
    say(f"{collection}: archived {report.documents} documents so far ({report.batches} batches)")
    return len(docs) == batch_documents


def _id_hash(ids) -> str:
    return hashlib.sha256(b"".join(str(i).encode() + b"\n" for i in sorted(ids))).hexdigest()


def _write_verified(store: ObjectStore, key: str, table: pa.Table, id_column: str, row_group_rows: int | None,
                    receipt: dict[str, Any]) -> dict[str, Any]:
    """Write one Parquet file, read it back, and return its receipt (not yet recorded)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=row_group_rows or max(1, table.num_rows),
                   use_byte_stream_split=["embedding.list.element"] if "embedding" in table.column_names else False)
    data = buf.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    ids = table.column(id_column).to_pylist()
    store.put_bytes(key, data)
    back = store.get_bytes(key)
    if hashlib.sha256(back).hexdigest() != sha or len(back) != len(data):
        raise ArchiveError(f"{key}: read back {len(back)} bytes that differ from the {len(data)} written; nothing deleted")
    parquet = pq.ParquetFile(io.BytesIO(back))
    read_ids = parquet.read(columns=[id_column]).column(id_column).to_pylist()
    if parquet.metadata.num_rows != table.num_rows or _id_hash(read_ids) != _id_hash(ids):
        raise ArchiveError(f"{key}: the rows read back differ from the rows written; nothing deleted")
    return {**receipt, "key": key, "sha256": sha, "bytes": len(data), "rows": table.num_rows,
            "row_groups": parquet.metadata.num_row_groups, "id_hash": _id_hash(ids), "ids": ids}


def _record_receipt(conn, job_id: int, collection: str, store: ObjectStore, r: dict[str, Any]) -> int:
    return conn.execute(
        """
        INSERT INTO vector_platform.archive_files
            (job_id, collection, kind, model_key, fingerprint, year, month, first_key, last_key, key, uri, sha256, bytes,
             rows, row_groups, id_hash, verified_at)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
        ON CONFLICT (key) DO UPDATE SET sha256 = excluded.sha256, bytes = excluded.bytes, rows = excluded.rows,
            row_groups = excluded.row_groups, id_hash = excluded.id_hash, verified_at = excluded.verified_at,
            first_key = excluded.first_key, last_key = excluded.last_key
        RETURNING id
        """,
        (job_id, collection, r["kind"], r["model_key"], r["fingerprint"], r["year"], r["month"], r["first_key"],
         r["last_key"], r["key"], store.uri(r["key"]), r["sha256"], r["bytes"], r["rows"], r["row_groups"], r["id_hash"],
         clock.now()),
    ).fetchone()[0]
