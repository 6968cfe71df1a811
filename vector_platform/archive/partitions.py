"""Row archival, partitioned layout: whole months leave the hot table by `DETACH PARTITION`.

A collection with a row-archival rule keeps its vectors in month partitions (see
`vector_platform.tables`). Its archival job first runs the row batches of `archive.rows` for
every document older than the cutoff: documents, chunks and vectors are written to the
archive and verified, and the catalog rows are deleted, but the vectors of a month that lies
wholly before the cutoff stay in their partition (the batch checks that they are exactly
what its files hold). Then, as soon as the batches (in source-timestamp order) are past a
month, for that month's partition in each vector table:

1. under the collection's writer lock: if no live document has a row in the partition, it is
   detached (`DETACH PARTITION ... CONCURRENTLY`: searches and writes go on) and renamed out
   of the way, its progress recorded in `archive_partitions`. A partition still holding rows
   of live documents (say, one whose chunk was dead-lettered, never archived) is not
   detached: its archived rows are deleted by key instead, as the row layout does;
2. the detached table, frozen now, is checked against the archive: each of its rows (chunk
   id and content hash) must be in a receipted vector file of that month and model, read
   back from the object store. Rows that are in none (normally none) are written to a file
   of their own, read back and receipted first;
3. only then is the table dropped.

Exporting before detaching means a row is always somewhere search finds it: live until the
detach, in the archive from its batch's commit on. (In between, a search without the archive
can still return an archived document's row from its month's partition: only for the
seconds until the detach, or, after a kill, until the next run.) A kill at any point is finished by the
next run: a `DETACH` left waiting for `FINALIZE` is finalized, a detached table is checked and
dropped, and a table that cannot be checked (the object store is down) is kept and reported.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Callable

import pyarrow.parquet as pq
from psycopg import sql
from psycopg_pool import ConnectionPool

from vector_platform import catalog, clock, faults, tables
from vector_platform.archive.rows import ArchiveError, partitioned_tables, record_receipt, write_verified
from vector_platform.locks import writer_lock
from vector_platform.names import bounded_identifier
from vector_platform.object_store import ObjectStore
from vector_platform.tiers.snapshots import rows_by_chunk_ids


@dataclass
class PartitionReport:
    detached: list[str] = field(default_factory=list)  # parent.partition (year-month)
    dropped: int = 0
    rows_dropped: int = 0  # vector rows removed by dropping detached partitions
    rows_deleted: int = 0  # vector rows removed by key from partitions that could not be detached
    remainder_rows: int = 0
    kept: list[str] = field(default_factory=list)  # why a month stayed attached
    handled: set[str] = field(default_factory=set)  # partitions this run has dealt with already


def old_months(cutoff: dt.datetime) -> Callable[[tuple[int, int] | None], bool]:
    """Whether a month lies wholly before the cutoff (its partition can go as a whole)."""
    return lambda ym: ym is not None and tables.month_bounds(*ym)[1] <= cutoff


def finish_detached(
    pool: ConnectionPool, store: ObjectStore, dsn: str, collection: str, report: PartitionReport,
    say: Callable[[str], None] = lambda _: None,
) -> None:
    """Finish every partition an earlier run left detaching or detached (a job starts here)."""
    with pool.connection() as conn:
        unfinished = conn.execute(
            "SELECT id FROM vector_platform.archive_partitions WHERE collection = %s AND state IN ('detaching', 'detached') "
            "ORDER BY id", (collection,)).fetchall()
    for (record,) in unfinished:
        _resume(pool, store, dsn, collection, record, report, say)


def detach_old_months(
    pool: ConnectionPool, store: ObjectStore, dsn: str, collection: str, job_id: int, cutoff: dt.datetime,
    report: PartitionReport, say: Callable[[str], None] = lambda _: None,
) -> None:
    """Steps 1-3 for every month partition wholly before `cutoff` (after each of the job's
    batches, with the batch's last timestamp as the cutoff: the months it finished)."""
    is_old = old_months(cutoff)
    with pool.connection() as conn:
        todo = [(model_key, table, part, ym) for model_key, table in partitioned_tables(conn, collection).items()
                for part, ym in tables.partitions(conn, table).items() if is_old(ym) and part not in report.handled]
    for model_key, table, part, ym in todo:
        report.handled.add(part)
        record = _detach(pool, store, dsn, collection, job_id, model_key, table, part, ym, report, say)
        if record is not None:
            _check_and_drop(pool, store, collection, record, report, say)


# A vector row (alias v) whose document is live: not archived, not deleted at the source.
_LIVE_DOCUMENT = (
    "EXISTS (SELECT 1 FROM vector_platform.documents d WHERE d.collection = %s AND d.doc_id = v.doc_id AND d.deleted_at IS NULL)"
)


def _detach(pool, store, dsn, collection, job_id, model_key, table, part, ym, report: PartitionReport, say) -> int | None:
    """Step 1; the record id of the detached partition, or None when it stayed attached."""
    year, month = ym
    with writer_lock(dsn, collection, say=say), pool.connection() as conn:
        live = conn.execute(
            sql.SQL("SELECT count(*) FROM {} v WHERE " + _LIVE_DOCUMENT).format(tables.table_id(part)),
            (collection,),
        ).fetchone()[0]
        if live:
            _delete_archived_rows(conn, store, collection, job_id, model_key, part, ym, report)
            report.kept.append(f"{part}: {live} rows of live documents (not archivable yet); its archived rows were deleted by key")
            say(f"{collection}: {part} keeps {live} rows of live documents, so it stays attached")
            return None
        record = conn.execute(
            """
            INSERT INTO vector_platform.archive_partitions
                (job_id, collection, model_key, parent, partition, year, month, state, updated_at)
            VALUES (%s, %s, %s, %s, %s, %s, %s, 'detaching', %s) RETURNING id
            """,
            (job_id, collection, model_key, table, part, year, month, clock.now()),
        ).fetchone()[0]
        faults.point("archive_partitions.before_detach")
        conn.execute(sql.SQL("ALTER TABLE {} DETACH PARTITION {} CONCURRENTLY").format(
            tables.table_id(table), tables.table_id(part)))
        _rename_detached(conn, record)
    report.detached.append(f"{table}.{part} ({year:04d}-{month:02d})")
    say(f"{collection}: detached {part} ({year:04d}-{month:02d})")
    return record


def _rename_detached(conn, record: int) -> None:
    """Give a detached partition a name of its own (the month's name is free again for rows
    written later) and record it as detached."""
    (part,) = conn.execute("SELECT partition FROM vector_platform.archive_partitions WHERE id = %s", (record,)).fetchone()
    detached_as = bounded_identifier(part, suffix=f"_detached{record}")
    with conn.transaction():
        conn.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(tables.table_id(part), sql.Identifier(detached_as)))
        conn.execute(
            sql.SQL(
                "UPDATE vector_platform.archive_partitions SET state = 'detached', detached_as = %s, "
                "rows = (SELECT count(*) FROM {}), updated_at = %s WHERE id = %s"
            ).format(tables.table_id(detached_as)),
            (detached_as, clock.now(), record),
        )


def _resume(pool, store, dsn, collection, record: int, report: PartitionReport, say) -> None:
    """Finish a partition an earlier run left: detaching (finalize a pending DETACH, or, if it
    never started, let this run's pass begin it again) or detached (check and drop)."""
    with pool.connection() as conn:
        state, table, part = conn.execute(
            "SELECT state, parent, partition FROM vector_platform.archive_partitions WHERE id = %s", (record,)).fetchone()
    if state == "detaching":
        with writer_lock(dsn, collection, say=say), pool.connection() as conn:
            attached = conn.execute(
                "SELECT i.inhdetachpending FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s",
                (tables.VECTORS, part),
            ).fetchone()
            if attached is not None and not attached[0]:
                # Killed before the DETACH began: nothing happened to the partition.
                conn.execute("DELETE FROM vector_platform.archive_partitions WHERE id = %s", (record,))
                return
            if attached is not None:  # the DETACH ... CONCURRENTLY was interrupted: finish it
                say(f"{collection}: finishing the interrupted detach of {part}")
                conn.execute(sql.SQL("ALTER TABLE {} DETACH PARTITION {} FINALIZE").format(
                    tables.table_id(table), tables.table_id(part)))
            _rename_detached(conn, record)
        report.detached.append(f"{table}.{part} (resumed)")
    _check_and_drop(pool, store, collection, record, report, say)


def _check_and_drop(pool, store: ObjectStore, collection: str, record: int, report: PartitionReport, say) -> None:
    """Steps 2-3 for a detached partition. Any failure keeps the table and records why."""
    with pool.connection() as conn:
        job_id, model_key, detached_as, year, month = conn.execute(
            "SELECT job_id, model_key, detached_as, year, month FROM vector_platform.archive_partitions WHERE id = %s",
            (record,),
        ).fetchone()
        try:
            rows = conn.execute(sql.SQL("SELECT chunk_id::text, content_hash FROM {}").format(tables.table_id(detached_as))).fetchall()
            remainder = _write_remainder(conn, store, collection, job_id, model_key, detached_as, (year, month), rows)
            faults.point("archive_partitions.before_drop")
        except Exception as err:
            conn.execute(
                "UPDATE vector_platform.archive_partitions SET error = %s, updated_at = %s WHERE id = %s",
                (f"{type(err).__name__}: {err}"[:2000], clock.now(), record),
            )
            say(f"{collection}: {detached_as} is kept, detached and unchecked: {err}")
            raise
        with conn.transaction():
            conn.execute(sql.SQL("DROP TABLE {}").format(tables.table_id(detached_as)))
            conn.execute(
                "UPDATE vector_platform.archive_partitions SET state = 'dropped', remainder_rows = remainder_rows + %s, "
                "error = NULL, updated_at = %s WHERE id = %s",
                (remainder, clock.now(), record),
            )
    report.dropped += 1
    report.rows_dropped += len(rows)
    report.remainder_rows += remainder
    say(f"{collection}: {detached_as} checked against the archive ({len(rows)} rows) and dropped")


def _delete_archived_rows(conn, store, collection, job_id, model_key, part, ym, report: PartitionReport) -> None:
    """A partition that stays attached: delete its rows of documents no longer live, each
    checked to be in the archive first (under the writer lock the caller holds)."""
    rows = conn.execute(
        sql.SQL("SELECT chunk_id::text, content_hash FROM {} v WHERE NOT " + _LIVE_DOCUMENT).format(tables.table_id(part)),
        (collection,),
    ).fetchall()
    if not rows:
        return
    report.remainder_rows += _write_remainder(conn, store, collection, job_id, model_key, part, ym, rows)
    with conn.transaction():
        gone = conn.execute(sql.SQL("DELETE FROM {} WHERE chunk_id = ANY(%s::uuid[])").format(tables.table_id(part)),
                            ([r[0] for r in rows],)).rowcount
        if gone != len(rows):
            raise ArchiveError(f"{part}: the delete would remove {gone} rows, {len(rows)} were checked; nothing deleted")
    report.rows_deleted += gone


def covered_rows(conn, store: ObjectStore, collection: str, model_key: str, ym: tuple[int, int]) -> set[tuple[str, str]]:
    """(chunk id, content hash) of every row the month's receipted vector files of this model
    hold, read back from the object store (two columns: ranged reads). A file missing or of
    another size than its receipt says raises."""
    held: set[tuple[str, str]] = set()
    for key, nbytes in conn.execute(
        "SELECT key, bytes FROM vector_platform.archive_files WHERE collection = %s AND kind IN ('vectors', 'partition_rows') "
        "AND model_key = %s AND year = %s AND month = %s ORDER BY id",
        (collection, model_key, *ym),
    ).fetchall():
        with store.open_input(key) as f:
            if f.size() != nbytes:
                raise ArchiveError(f"{store.uri(key)} has {f.size()} bytes, its receipt says {nbytes}")
            table = pq.read_table(f, columns=["chunk_id", "content_hash"])
        held.update(zip(table.column("chunk_id").to_pylist(), table.column("content_hash").to_pylist()))
    return held


def _write_remainder(conn, store, collection, job_id, model_key, source: str, ym, rows: list[tuple[str, str]]) -> int:
    """Write the rows of `source` that no receipted file holds to a file of their own (read back,
    receipted); how many there were."""
    held = covered_rows(conn, store, collection, model_key, ym)
    missing = [chunk_id for chunk_id, content_hash in rows if (chunk_id, content_hash) not in held]
    if not missing:
        return 0
    spec = catalog.get_model(conn, model_key)
    fingerprint = catalog.table_fingerprint(conn, collection, model_key)
    page = rows_by_chunk_ids(conn, source, spec.dims, missing)
    year, month = ym
    key = f"archive/{collection}/year={year:04d}/month={month:02d}/vectors/{model_key}/job-{job_id:06d}-{source}-rest.parquet"
    receipt = write_verified(store, key, page, "chunk_id", None, dict(
        kind="partition_rows", model_key=model_key, fingerprint=fingerprint, year=year, month=month,
        first_key=missing[0], last_key=missing[-1], batch=-1))
    with conn.transaction():
        conn.execute("DELETE FROM vector_platform.archive_files WHERE key = %s", (key,))  # a re-run writes it again
        record_receipt(conn, job_id, collection, store, receipt, spec)
    return len(missing)


def partition_summary(conn, collection: str) -> dict[str, Any]:
    """Detached partitions not yet dropped (with why), and how many were dropped (status)."""
    rows = conn.execute(
        "SELECT state, coalesce(detached_as, partition), year, month, error FROM vector_platform.archive_partitions "
        "WHERE collection = %s ORDER BY id", (collection,)).fetchall()
    return {
        "dropped": sum(1 for r in rows if r[0] == "dropped"),
        "pending": [{"table": r[1], "month": f"{r[2]:04d}-{r[3]:02d}", "state": r[0], "error": r[4]}
                    for r in rows if r[0] in ("detaching", "detached")],
    }
