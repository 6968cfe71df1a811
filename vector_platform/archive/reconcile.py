"""`archive_reconciles`: the row archive holds what left Postgres, and nothing is in both.

For one collection:
- every completed job's counts (documents and vectors its deletes removed, each delete
  refused unless it removes what the batch's files hold) equal the rows of its receipts;
- every receipt's file is on the object store with the size the receipt says, and every
  completed job's manifest is there;
- no document is both live and archived, and no chunk or vector row of an archived document
  is still in Postgres (vectors: while no job runs, since a partitioned table keeps them
  until the job's partition detach); no partition is left detached and not dropped;
- a sample of archived documents (1 %, at least 20) is read back from Parquet (their row
  group, as `get` reads it): each must be where the index says, its content must hash to the
  content_hash it was archived with, and its chunks must be in the vector files of its batch
  under every model, each chunk's text hashing to its own content_hash, with a finite vector
  of the receipt's dimensions.
"""

from __future__ import annotations

import hashlib
import math
import random
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from psycopg import sql
from psycopg_pool import ConnectionPool

from vector_platform import tables
from vector_platform.archive.rows import manifest_key
from vector_platform.object_store import ObjectStore

SAMPLE_FRACTION = 0.01
MIN_SAMPLE = 20
MAX_PROBLEMS = 20  # listed in the result; the count says how many there were


def archive_reconciles(
    pool: ConnectionPool, store: ObjectStore, collection: str, sample_fraction: float = SAMPLE_FRACTION,
    min_sample: int = MIN_SAMPLE, seed: int | None = None,
) -> dict[str, Any]:
    problems: list[str] = []
    with pool.connection() as conn:
        jobs = conn.execute(
            """
            SELECT j.id, j.status, j.documents, j.vectors, j.error,
                   coalesce(sum(f.rows) FILTER (WHERE f.kind = 'documents'), 0),
                   coalesce(sum(f.rows) FILTER (WHERE f.kind = 'vectors'), 0)
            FROM vector_platform.archival_jobs j LEFT JOIN vector_platform.archive_files f ON f.job_id = j.id
            WHERE j.collection = %s GROUP BY j.id ORDER BY j.id
            """,
            (collection,),
        ).fetchall()
        files = conn.execute(
            "SELECT id, job_id, batch, kind, model_key, dims, year, month, key, bytes, rows FROM vector_platform.archive_files "
            "WHERE collection = %s",
            (collection,),
        ).fetchall()
        live_and_archived = conn.execute(
            "SELECT count(*) FROM vector_platform.archived_documents a JOIN vector_platform.documents d "
            "ON d.collection = a.collection AND d.doc_id = a.doc_id WHERE a.collection = %s",
            (collection,),
        ).fetchone()[0]
        chunks_left = conn.execute(
            "SELECT count(*) FROM vector_platform.chunks c JOIN vector_platform.archived_documents a "
            "ON a.collection = c.collection AND a.doc_id = c.doc_id WHERE c.collection = %s",
            (collection,),
        ).fetchone()[0]
        running = any(j[1] == "running" for j in jobs)
        # Between a job's batches and its partitions' detach, a partitioned table still holds
        # archived documents' vectors: checked when no job runs.
        vectors_left = 0 if running else sum(
            conn.execute(
                sql.SQL(
                    "SELECT count(*) FROM {} v JOIN vector_platform.archived_documents a ON a.collection = %s "
                    "AND a.doc_id = v.doc_id WHERE NOT EXISTS (SELECT 1 FROM vector_platform.documents d "
                    "WHERE d.collection = a.collection AND d.doc_id = a.doc_id)"
                ).format(tables.table_id(table)),
                (collection,),
            ).fetchone()[0]
            for table in tables.collection_tables(conn, collection).values()
        )
        pending = [] if running else conn.execute(
            "SELECT coalesce(detached_as, partition), year, month, state, error FROM vector_platform.archive_partitions "
            "WHERE collection = %s AND state IN ('detaching', 'detached') ORDER BY id",
            (collection,),
        ).fetchall()
        archived = conn.execute(
            "SELECT a.doc_id, a.content_hash, a.row_group, f.key, f.job_id, f.batch, f.year, f.month "
            "FROM vector_platform.archived_documents a JOIN vector_platform.archive_files f ON f.id = a.file_id "
            "WHERE a.collection = %s ORDER BY a.doc_id",
            (collection,),
        ).fetchall()

    for job_id, status, documents, vectors, error, doc_rows, vector_rows in jobs:
        if status == "running":  # checked again when it completes
            continue
        if status != "completed":
            problems.append(f"job {job_id} is {status}" + (f": {error}" if error else "") + " (the next run resumes it)")
            continue
        if documents != doc_rows or vectors != vector_rows:
            problems.append(
                f"job {job_id} deleted {documents} documents and {vectors} vectors; its receipts hold {doc_rows} and {vector_rows}"
            )

    on_store = store.sizes(f"archive/{collection}")
    for job_id, status, *_ in jobs:
        if status == "completed" and manifest_key(collection, job_id) not in on_store:
            problems.append(f"completed job {job_id} has no manifest ({manifest_key(collection, job_id)})")
    for _, _, _, _, _, _, _, _, key, nbytes, _ in files:
        if key not in on_store:
            problems.append(f"{key} has a receipt but is not on the object store")
        elif on_store[key] != nbytes:
            problems.append(f"{key} is {on_store[key]} bytes on the store, its receipt says {nbytes}")
    if live_and_archived:
        problems.append(f"{live_and_archived} documents are both live and archived")
    if chunks_left:
        problems.append(f"{chunks_left} chunks of archived documents are still in Postgres")
    if vectors_left:
        problems.append(f"{vectors_left} vectors of archived documents are still in Postgres")
    for table, year, month, state, error in pending:
        problems.append(f"partition {table} ({year:04d}-{month:02d}) is {state}, not yet checked against the archive and "
                        f"dropped" + (f": {error}" if error else "") + " (the next run finishes it)")

    size = min(len(archived), max(min_sample, math.ceil(sample_fraction * len(archived))))
    sample = random.Random(seed).sample(archived, size) if size else []
    checked = _read_back(store, files, sample, problems)
    return {
        "jobs": len(jobs),
        "completed_jobs": sum(1 for j in jobs if j[1] == "completed"),
        "files": len(files),
        "bytes_on_store": sum(f[9] for f in files),
        "archived_documents": len(archived),
        "live_and_archived": live_and_archived,
        "chunks_of_archived_still_live": chunks_left,
        "vectors_of_archived_still_live": vectors_left,
        "partitions_pending": len(pending),
        "sampled_documents": len(sample),
        "sampled_vectors": checked,
        "problem_count": len(problems),
        "problems": problems[:MAX_PROBLEMS],
    }


def _read_back(store: ObjectStore, files: list[tuple], sample: list[tuple], problems: list[str]) -> int:
    """Read the sampled documents back as `get` does, and their vectors from their batch's
    files; returns how many vector rows were checked."""
    vector_files: dict[tuple, list[tuple]] = {}
    for f in files:
        if f[3] == "vectors":
            vector_files.setdefault((f[1], f[2], f[6], f[7]), []).append(f)
    wanted: dict[tuple, dict[str, str]] = {}  # vector file -> {doc_id: what to expect}
    for doc_id, content_hash, row_group, key, job_id, batch, year, month in sample:
        try:
            with store.open_input(key) as src:
                group = pq.ParquetFile(src).read_row_group(row_group)
        except (OSError, ValueError) as err:
            problems.append(f"{doc_id}: {key} row group {row_group} could not be read ({err})")
            continue
        rows = group.to_pylist()
        row = next((r for r in rows if r["doc_id"] == doc_id), None)
        if row is None:
            problems.append(f"{doc_id}: not in {key} row group {row_group}, where the index says it is")
            continue
        actual = hashlib.sha256(f"{row['title'] or ''}\x00{row['body']}".encode()).hexdigest()
        if actual != content_hash or row["content_hash"] != content_hash:
            problems.append(f"{doc_id}: the archived content does not hash to its content_hash")
        for f in vector_files.get((job_id, batch, year, month), []):
            wanted.setdefault(f, {})[doc_id] = content_hash
    checked = 0
    for f, docs in wanted.items():
        _, _, _, _, model_key, dims, _, _, key, _, _ = f
        try:
            with store.open_input(key) as src:
                table = pq.read_table(src, columns=["doc_id", "content_hash", "text", "embedding"])
        except (OSError, ValueError) as err:
            problems.append(f"{key} could not be read ({err})")
            continue
        found = {doc_id: 0 for doc_id in docs}
        for row in table.to_pylist():
            if row["doc_id"] not in docs:
                continue
            found[row["doc_id"]] += 1
            checked += 1
            vector = np.asarray(row["embedding"], dtype=np.float32)
            if hashlib.sha256(row["text"].encode()).hexdigest() != row["content_hash"]:
                problems.append(f"{row['doc_id']}: a chunk's text in {key} does not hash to its content_hash")
            if vector.shape != (dims,) or not np.isfinite(vector).all():
                problems.append(f"{row['doc_id']}: a vector in {key} is not {dims} finite numbers")
        problems.extend(f"{doc_id}: no chunk under model {model_key!r} in {key}" for doc_id, n in found.items() if n == 0)
    return checked
