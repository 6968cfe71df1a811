"""Catalog rows for documents and chunks, and the queries that join them with a vector table.

Everything that walks a collection does it in keyset pages (ordered by document id, then
chunk sequence), so memory stays flat however large the collection, and each page is its
own short transaction.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Iterable, Iterator, Sequence

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from vector_platform import clock

STAGE = sql.Identifier("vp_source_stage")
REJECTED = sql.Identifier("vp_source_rejected")
FAILING = sql.Identifier("vp_source_failing")
_STAGE_COLUMNS = ("doc_id", "title", "body", "content_hash", "metadata", "source_ts", "position")

# ---------------------------------------------------------------- source snapshot (source_documents)


def create_source_stage(conn: psycopg.Connection) -> None:
    """Temporary tables for one read of a source; they vanish with the transaction."""
    conn.execute(
        sql.SQL(
            "CREATE TEMP TABLE {} (doc_id text NOT NULL, title text, body text NOT NULL, content_hash text NOT NULL, "
            "metadata jsonb NOT NULL, source_ts timestamptz, position bigint NOT NULL) ON COMMIT DROP"
        ).format(STAGE)
    )
    conn.execute(sql.SQL("CREATE TEMP TABLE {} (doc_id text NOT NULL) ON COMMIT DROP").format(REJECTED))
    # The refs of this read's dead letters: every other open source dead letter is resolved.
    conn.execute(sql.SQL("CREATE TEMP TABLE {} (ref text NOT NULL) ON COMMIT DROP").format(FAILING))


def stage_documents(conn: psycopg.Connection, docs: Sequence[Any]) -> list[tuple[Any, str]]:
    """COPY documents into the stage. Returns (document, reason) for any the database refused.

    The source reader already refuses what PostgreSQL cannot store; if the database still
    refuses a batch, it is retried a row at a time so that only the offending rows fail.
    """
    rows = [
        (d.doc_id, d.title, d.body, d.content_hash, Jsonb(d.metadata), d.source_ts, d.position) for d in docs
    ]
    copy_sql = sql.SQL("COPY {} ({}) FROM STDIN").format(STAGE, sql.SQL(", ").join(map(sql.Identifier, _STAGE_COLUMNS)))
    try:
        with conn.transaction(), conn.cursor() as cur, cur.copy(copy_sql) as copy:
            for row in rows:
                copy.write_row(row)
        return []
    except psycopg.DataError:
        pass
    refused = []
    insert = sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
        STAGE, sql.SQL(", ").join(map(sql.Identifier, _STAGE_COLUMNS)), sql.SQL(", ").join(sql.Placeholder() * len(_STAGE_COLUMNS))
    )
    for doc, row in zip(docs, rows):
        try:
            with conn.transaction():
                conn.execute(insert, row)
        except psycopg.DataError as err:
            refused.append((doc, f"the database cannot store this document: {err.diag.message_primary or err}"))
    return refused


def stage_rejected_ids(conn: psycopg.Connection, doc_ids: Iterable[str]) -> None:
    """Documents whose new record was rejected: their last good version stays live."""
    with conn.cursor() as cur, cur.copy(sql.SQL("COPY {} (doc_id) FROM STDIN").format(REJECTED)) as copy:
        for doc_id in doc_ids:
            copy.write_row((doc_id,))


def stage_failing_refs(conn: psycopg.Connection, refs: Iterable[str]) -> None:
    with conn.cursor() as cur, cur.copy(sql.SQL("COPY {} (ref) FROM STDIN").format(FAILING)) as copy:
        for ref in refs:
            copy.write_row((ref,))


def resolve_source_letters_not_failing(conn: psycopg.Connection, collection: str, resolution: str) -> int:
    """Resolve the open source dead letters whose ref did not fail again in this read."""
    return conn.execute(
        sql.SQL(
            """
            UPDATE vector_platform.dead_letters dl SET resolved_at = %s, resolution = %s
            WHERE dl.collection = %s AND dl.stage = 'source' AND dl.resolved_at IS NULL
              AND NOT EXISTS (SELECT 1 FROM {failing} f WHERE f.ref = dl.ref)
            """
        ).format(failing=FAILING),
        (clock.now(), resolution, collection),
    ).rowcount


def drop_staged_duplicates(conn: psycopg.Connection) -> list[tuple[str, int, int]]:
    """Remove every staged record whose id appeared earlier in the source: (id, position, kept position)."""
    return conn.execute(
        sql.SQL(
            """
            WITH ranked AS (
                SELECT ctid, doc_id, position, first_value(position) OVER (PARTITION BY doc_id ORDER BY position) AS kept
                FROM {stage}
            )
            DELETE FROM {stage} s USING ranked r
            WHERE s.ctid = r.ctid AND r.position <> r.kept
            RETURNING r.doc_id, r.position, r.kept
            """
        ).format(stage=STAGE)
    ).fetchall()


def drop_staged_archived(conn: psycopg.Connection, collection: str, now: dt.datetime) -> int:
    """Remove staged records of documents the row archive holds with the same content: an
    archived document stays archived (the source still has it); a changed one comes back live.
    Archived documents the source no longer has (and did not fail to read) are marked deleted,
    and unmarked when it has them again. Runs in the source's transaction: a refused source
    (empty, or deleting too much) rolls this back too."""
    conn.execute(
        sql.SQL(
            "UPDATE vector_platform.archived_documents a SET deleted_at = CASE WHEN EXISTS "
            "(SELECT 1 FROM {stage} s WHERE s.doc_id = a.doc_id) THEN NULL ELSE %s END "
            "WHERE a.collection = %s AND NOT EXISTS (SELECT 1 FROM {rejected} r WHERE r.doc_id = a.doc_id) "
            "AND (a.deleted_at IS NULL) = NOT EXISTS (SELECT 1 FROM {stage} s WHERE s.doc_id = a.doc_id)"
        ).format(stage=STAGE, rejected=REJECTED),
        (now, collection),
    )
    return conn.execute(
        sql.SQL(
            "DELETE FROM {stage} s USING vector_platform.archived_documents a "
            "WHERE a.collection = %s AND a.doc_id = s.doc_id AND a.content_hash = s.content_hash "
            # a document revived by a change is live again: the source decides about it as usual
            "AND NOT EXISTS (SELECT 1 FROM vector_platform.documents d WHERE d.collection = a.collection AND d.doc_id = a.doc_id)"
        ).format(stage=STAGE),
        (collection,),
    ).rowcount


def forget_revived_archived(conn: psycopg.Connection, collection: str) -> int:
    """A document the archive held that came back live (its content changed at the source)
    is live, not archived: its index row goes (the old version stays in its archive file,
    under its receipt), so `get` and archive search never return the old version."""
    return conn.execute(
        "DELETE FROM vector_platform.archived_documents a WHERE a.collection = %s AND EXISTS "
        "(SELECT 1 FROM vector_platform.documents d WHERE d.collection = a.collection AND d.doc_id = a.doc_id)",
        (collection,),
    ).rowcount


def plan_source(conn: psycopg.Connection, collection: str) -> dict[str, int]:
    """What applying the stage would do, counted before anything changes."""
    row = conn.execute(
        sql.SQL(
            """
            SELECT
                (SELECT count(*) FROM {stage}),
                count(*) FILTER (WHERE d.doc_id IS NULL),
                count(*) FILTER (WHERE d.deleted_at IS NOT NULL),
                count(*) FILTER (WHERE d.deleted_at IS NULL AND d.content_hash <> s.content_hash),
                count(*) FILTER (WHERE d.deleted_at IS NULL AND d.content_hash = s.content_hash),
                (SELECT count(*) FROM vector_platform.documents WHERE collection = %(c)s AND deleted_at IS NULL),
                (SELECT count(*) FROM vector_platform.documents x
                  WHERE x.collection = %(c)s AND x.deleted_at IS NULL
                    AND NOT EXISTS (SELECT 1 FROM {stage} y WHERE y.doc_id = x.doc_id)
                    AND NOT EXISTS (SELECT 1 FROM {rejected} r WHERE r.doc_id = x.doc_id))
            FROM {stage} s
            LEFT JOIN vector_platform.documents d ON d.collection = %(c)s AND d.doc_id = s.doc_id
            """
        ).format(stage=STAGE, rejected=REJECTED),
        {"c": collection},
    ).fetchone()
    keys = ("read", "added", "restored", "changed", "unchanged", "live_before", "deleted")
    return dict(zip(keys, row))


def apply_source(conn: psycopg.Connection, collection: str, now: dt.datetime) -> None:
    """Upsert the staged documents and soft-delete the live ones the source no longer has."""
    conn.execute(
        sql.SQL(
            """
            INSERT INTO vector_platform.documents
                (collection, doc_id, title, body, content_hash, metadata, source_ts, first_seen_at, updated_at)
            SELECT %(c)s, doc_id, title, body, content_hash, metadata, source_ts, %(now)s, %(now)s FROM {stage}
            ON CONFLICT (collection, doc_id) DO UPDATE SET
                title = excluded.title, body = excluded.body, content_hash = excluded.content_hash,
                metadata = excluded.metadata, source_ts = excluded.source_ts, deleted_at = NULL,
                updated_at = excluded.updated_at
            WHERE (documents.content_hash, documents.metadata, documents.source_ts, documents.deleted_at IS NULL)
                  IS DISTINCT FROM (excluded.content_hash, excluded.metadata, excluded.source_ts, true)
            """
        ).format(stage=STAGE),
        {"c": collection, "now": now},
    )
    conn.execute(
        sql.SQL(
            """
            UPDATE vector_platform.documents d SET deleted_at = %(now)s, updated_at = %(now)s
            WHERE d.collection = %(c)s AND d.deleted_at IS NULL
              AND NOT EXISTS (SELECT 1 FROM {stage} s WHERE s.doc_id = d.doc_id)
              AND NOT EXISTS (SELECT 1 FROM {rejected} r WHERE r.doc_id = d.doc_id)
            """
        ).format(stage=STAGE, rejected=REJECTED),
        {"c": collection, "now": now},
    )


def live_document_count(conn: psycopg.Connection, collection: str) -> int:
    return conn.execute(
        "SELECT count(*) FROM vector_platform.documents WHERE collection = %s AND deleted_at IS NULL", (collection,)
    ).fetchone()[0]


# ---------------------------------------------------------------- chunks


def drop_chunks_of_deleted_documents(conn: psycopg.Connection, collection: str) -> tuple[int, list[str]]:
    """Delete chunks of soft-deleted documents; returns (chunks dropped, documents affected)."""
    rows = conn.execute(
        """
        DELETE FROM vector_platform.chunks c USING vector_platform.documents d
        WHERE c.collection = %s AND d.collection = c.collection AND d.doc_id = c.doc_id
          AND d.deleted_at IS NOT NULL
        RETURNING c.doc_id
        """,
        (collection,),
    ).fetchall()
    conn.execute(
        "UPDATE vector_platform.documents SET chunked_hash = NULL "
        "WHERE collection = %s AND deleted_at IS NOT NULL AND chunked_hash IS NOT NULL",
        (collection,),
    )
    return len(rows), sorted({r[0] for r in rows})


def count_documents_to_chunk(conn: psycopg.Connection, collection: str) -> int:
    return conn.execute(
        "SELECT count(*) FROM vector_platform.documents "
        "WHERE collection = %s AND deleted_at IS NULL AND chunked_hash IS DISTINCT FROM content_hash",
        (collection,),
    ).fetchone()[0]


def documents_to_chunk(conn: psycopg.Connection, collection: str, after: str | None, limit: int) -> list[tuple]:
    """(doc_id, title, body, content_hash) of live documents not chunked at their current content."""
    return conn.execute(
        """
        SELECT doc_id, title, body, content_hash FROM vector_platform.documents
        WHERE collection = %s AND deleted_at IS NULL AND chunked_hash IS DISTINCT FROM content_hash
          AND (%s::text IS NULL OR doc_id > %s)
        ORDER BY doc_id LIMIT %s
        """,
        (collection, after, after, limit),
    ).fetchall()


def replace_chunks(conn: psycopg.Connection, collection: str, done: Sequence[tuple[str, str, Sequence[Any]]]) -> int:
    """Swap in new chunks for (doc_id, content_hash, chunks) and mark those documents chunked.

    The caller runs this in one transaction per batch: a kill leaves each batch all old or all new.
    """
    if not done:
        return 0
    doc_ids = [doc_id for doc_id, _, _ in done]
    conn.execute(
        "DELETE FROM vector_platform.chunks WHERE collection = %s AND doc_id = ANY(%s)", (collection, doc_ids)
    )
    written = 0
    with conn.cursor() as cur, cur.copy(
        "COPY vector_platform.chunks (chunk_id, collection, doc_id, seq, text, content_hash, token_count) FROM STDIN"
    ) as copy:
        for doc_id, _, chunks in done:
            for ch in chunks:
                copy.write_row((ch.chunk_id, collection, doc_id, ch.seq, ch.text, ch.content_hash, ch.token_count))
                written += 1
    conn.execute(
        """
        UPDATE vector_platform.documents d SET chunked_hash = u.hash
        FROM unnest(%s::text[], %s::text[]) AS u(doc_id, hash)
        WHERE d.collection = %s AND d.doc_id = u.doc_id
        """,
        (doc_ids, [h for _, h, _ in done], collection),
    )
    return written


def resolve_superseded_embed_letters(conn: psycopg.Connection, collection: str) -> int:
    """Embedding dead letters of chunks that no longer exist (their document changed or went)."""
    return conn.execute(
        """
        UPDATE vector_platform.dead_letters dl SET resolved_at = %s,
            resolution = 'chunk no longer exists (its document changed or was deleted)'
        WHERE dl.collection = %s AND dl.stage = 'embed' AND dl.resolved_at IS NULL
          AND NOT EXISTS (SELECT 1 FROM vector_platform.chunks c WHERE c.chunk_id::text = dl.ref)
        """,
        (clock.now(), collection),
    ).rowcount


def chunk_totals(conn: psycopg.Connection, collection: str) -> tuple[int, int]:
    """(chunks, largest token count) of a collection."""
    return conn.execute(
        "SELECT count(*), coalesce(max(token_count), 0) FROM vector_platform.chunks WHERE collection = %s",
        (collection,),
    ).fetchone()


# ---------------------------------------------------------------- chunks against a vector table

_LIVE_CHUNKS = """
    FROM vector_platform.chunks c JOIN vector_platform.documents d USING (collection, doc_id)
    WHERE c.collection = %(c)s AND d.deleted_at IS NULL
"""


def _not_in_table(table: sql.Composable | None) -> sql.Composable:
    if table is None:
        return sql.SQL("")
    return sql.SQL("AND NOT EXISTS (SELECT 1 FROM {} v WHERE v.chunk_id = c.chunk_id)").format(table)


def count_chunks_missing(conn: psycopg.Connection, collection: str, table: sql.Composable | None) -> int:
    """Live chunks with no row in `table` (all live chunks when there is no table yet)."""
    query = sql.SQL("SELECT count(*) " + _LIVE_CHUNKS + " {}").format(_not_in_table(table))
    return conn.execute(query, {"c": collection}).fetchone()[0]


def chunks_missing(
    conn: psycopg.Connection,
    collection: str,
    table: sql.Composable | None,
    after: tuple[str, int] | None,
    limit: int,
) -> tuple[list[tuple], tuple[str, int] | None]:
    """One keyset page of a collection's chunks, in (doc_id, seq) order after `after`: the live
    ones missing from `table` as (chunk_id, doc_id, seq, content_hash, text, metadata, source_ts),
    and the key to continue from (None after the last page).

    The page is cut from the chunks index first (a materialized CTE), then checked against the
    documents and the table by key: each page costs the same however large the table grows."""
    missing = (
        sql.SQL("NOT EXISTS (SELECT 1 FROM {} v WHERE v.chunk_id = c.chunk_id)").format(table)
        if table is not None
        else sql.SQL("true")
    )
    query = sql.SQL(
        """
        WITH page AS MATERIALIZED (
            SELECT c.chunk_id, c.collection, c.doc_id, c.seq, c.content_hash, c.text FROM vector_platform.chunks c
            WHERE c.collection = %(c)s
              AND (%(after_doc)s::text IS NULL OR (c.doc_id, c.seq) > (%(after_doc)s, %(after_seq)s))
            ORDER BY c.doc_id, c.seq LIMIT %(limit)s
        ), checked AS (
            SELECT c.*, d.metadata, d.source_ts, d.deleted_at IS NULL AND {missing} AS wanted
            FROM page c JOIN vector_platform.documents d USING (collection, doc_id)
        )
        SELECT chunk_id, doc_id, seq, content_hash, CASE WHEN wanted THEN text END,
               CASE WHEN wanted THEN metadata END, source_ts, wanted
        FROM checked ORDER BY doc_id, seq
        """
    ).format(missing=missing)
    after_doc, after_seq = after if after else (None, 0)
    rows = conn.execute(query, {"c": collection, "after_doc": after_doc, "after_seq": after_seq, "limit": limit}).fetchall()
    following = (rows[-1][1], rows[-1][2]) if len(rows) == limit else None
    return [r[:7] for r in rows if r[7]], following


def pages_of_missing_chunks(pool, collection: str, table: sql.Composable | None, page_rows: int) -> Iterator[list[tuple]]:
    """Every live chunk missing from `table`, a page at a time (each page its own connection)."""
    after = None
    while True:
        with pool.connection() as conn:
            rows, after = chunks_missing(conn, collection, table, after, page_rows)
        if rows:
            yield rows
        if after is None:
            return


def sync_row_metadata(conn: psycopg.Connection, collection: str, table: sql.Composable) -> int:
    """Copy changed document metadata, source timestamps and chunk order onto existing rows."""
    return conn.execute(
        sql.SQL(
            """
            UPDATE {t} v SET doc_id = c.doc_id, seq = c.seq, metadata = d.metadata,
                source_ts = d.source_ts, updated_at = now()
            FROM vector_platform.chunks c JOIN vector_platform.documents d USING (collection, doc_id)
            WHERE v.chunk_id = c.chunk_id AND c.collection = %s AND d.deleted_at IS NULL
              AND (v.seq, v.metadata, v.source_ts) IS DISTINCT FROM (c.seq, d.metadata, d.source_ts)
            """
        ).format(t=table),
        (collection,),
    ).rowcount


def source_months(conn: psycopg.Connection, collection: str) -> list[dt.datetime]:
    """The first instant (UTC) of every month a live document of the collection is dated in."""
    return [r[0] for r in conn.execute(
        "SELECT DISTINCT date_trunc('month', source_ts, 'UTC') FROM vector_platform.documents "
        "WHERE collection = %s AND deleted_at IS NULL AND source_ts IS NOT NULL",
        (collection,),
    )]


# A row whose chunk is not live. Rows of archived documents are not orphans: a month-
# partitioned table keeps them, already in the archive, until their month's partition is
# detached (see vector_platform.archive.partitions).
_ORPHAN = """
    NOT EXISTS (SELECT 1 FROM vector_platform.chunks c JOIN vector_platform.documents d USING (collection, doc_id)
                WHERE c.chunk_id = v.chunk_id AND c.collection = %(c)s AND d.deleted_at IS NULL)
    AND NOT EXISTS (SELECT 1 FROM vector_platform.archived_documents a WHERE a.collection = %(c)s AND a.doc_id = v.doc_id)
"""


def delete_orphan_rows(conn: psycopg.Connection, collection: str, table: sql.Composable) -> int:
    """Remove rows whose chunk is gone (document deleted or re-chunked)."""
    return conn.execute(sql.SQL("DELETE FROM {t} v WHERE " + _ORPHAN).format(t=table), {"c": collection}).rowcount


def count_lost(conn: psycopg.Connection, collection: str, model_key: str, table: sql.Composable) -> dict[str, int]:
    """Live chunks with neither a row nor an open dead letter, and rows with no live chunk."""
    lost, live = conn.execute(
        sql.SQL(
            """
            SELECT count(*) FILTER (WHERE v.chunk_id IS NULL AND dl.id IS NULL), count(*)
            FROM vector_platform.chunks c
            JOIN vector_platform.documents d USING (collection, doc_id)
            LEFT JOIN {t} v ON v.chunk_id = c.chunk_id
            LEFT JOIN vector_platform.dead_letters dl ON dl.collection = c.collection AND dl.model_key = %(m)s
                 AND dl.stage = 'embed' AND dl.ref = c.chunk_id::text AND dl.resolved_at IS NULL
            WHERE c.collection = %(c)s AND d.deleted_at IS NULL
            """
        ).format(t=table),
        {"c": collection, "m": model_key},
    ).fetchone()
    orphans = conn.execute(
        sql.SQL("SELECT count(*) FROM {t} v WHERE " + _ORPHAN).format(t=table), {"c": collection}
    ).fetchone()[0]
    return {"lost": lost, "orphans": orphans, "live_chunks": live}


def collection_counts(conn: psycopg.Connection, collection: str) -> dict[str, int]:
    """Documents (live and deleted), chunks and their catalog bytes, for status."""
    documents, deleted, doc_bytes = conn.execute(
        "SELECT count(*) FILTER (WHERE deleted_at IS NULL), count(*) FILTER (WHERE deleted_at IS NOT NULL), "
        "coalesce(sum(pg_column_size(d.*)), 0) FROM vector_platform.documents d WHERE collection = %s",
        (collection,),
    ).fetchone()
    chunks, chunk_bytes = conn.execute(
        "SELECT count(*), coalesce(sum(pg_column_size(c.*)), 0) FROM vector_platform.chunks c WHERE collection = %s",
        (collection,),
    ).fetchone()
    return {
        "documents": documents,
        "documents_deleted": deleted,
        "chunks": chunks,
        "catalog_bytes": int(doc_bytes + chunk_bytes),
    }
