"""Catalog rows for backups, restores and drops: a collection's definition and its catalog
rows (documents, chunks, open dead letters, labelled queries) read out in keyset pages and
copied back in, a digest of its whole state, and the removal of every row it owns.

The backup package (`vector_platform.backup`) decides the order and the files; the SQL for
these tables lives here, as for every catalog table.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import psycopg
import pyarrow as pa
from psycopg import sql
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from vector_platform import clock
from vector_platform.catalog.collections import attach_model
from vector_platform.catalog.models import get_model

TS = pa.timestamp("us", tz="UTC")


@dataclass(frozen=True)
class RowSet:
    """One catalog table's rows of a collection, as a backup holds them: the columns (without
    `collection`, which a restore sets to the target's name), and the key they are read in."""

    name: str  # the folder of its files in a backup
    table: str  # in schema vector_platform
    columns: tuple[tuple[str, pa.DataType], ...]
    key: tuple[str, ...]  # unique within a collection (keyset order)
    only: str = "true"  # which rows (a constant condition)
    page_rows: int = 2000

    @property
    def schema(self) -> pa.Schema:
        return pa.schema(list(self.columns))


DOCUMENTS = RowSet(
    "documents", "documents",
    (("doc_id", pa.string()), ("title", pa.string()), ("body", pa.string()), ("content_hash", pa.string()),
     ("metadata", pa.string()), ("source_ts", TS), ("chunked_hash", pa.string()), ("first_seen_at", TS),
     ("updated_at", TS), ("deleted_at", TS)),
    ("doc_id",), page_rows=500,  # bodies may be large
)
CHUNKS = RowSet(
    "chunks", "chunks",
    (("chunk_id", pa.string()), ("doc_id", pa.string()), ("seq", pa.int32()), ("text", pa.string()),
     ("content_hash", pa.string()), ("token_count", pa.int32())),
    ("doc_id", "seq"),
)
# Open dead letters: a live chunk without a vector must keep saying why (`no_chunk_lost`).
DEAD_LETTERS = RowSet(
    "dead_letters", "dead_letters",
    (("model_key", pa.string()), ("stage", pa.string()), ("ref", pa.string()), ("error", pa.string()),
     ("payload", pa.string()), ("attempts", pa.int32()), ("created_at", TS), ("last_seen_at", TS)),
    ("model_key", "stage", "ref"), only="resolved_at IS NULL",
)
LABELLED_QUERIES = RowSet("labelled_queries", "labelled_queries", (("query_id", pa.string()), ("text", pa.string())), ("query_id",))
QRELS = RowSet("qrels", "qrels", (("query_id", pa.string()), ("doc_id", pa.string()), ("relevance", pa.int32())), ("query_id", "doc_id"))

# In the order a restore loads them (foreign keys: documents before chunks, queries before qrels).
ROW_SETS = (DOCUMENTS, CHUNKS, DEAD_LETTERS, LABELLED_QUERIES, QRELS)


def _table(rows: RowSet) -> sql.Composable:
    return sql.Identifier("vector_platform", rows.table)


def _column(name: str, kind: pa.DataType) -> sql.Composable:
    # uuid and jsonb travel as their text form, which COPY reads back exactly.
    return sql.SQL("{}::text").format(sql.Identifier(name)) if pa.types.is_string(kind) else sql.Identifier(name)


def pages(pool: ConnectionPool, rows: RowSet, collection: str) -> Iterator[pa.Table]:
    """A collection's rows of one catalog table, a keyset page at a time (each page its own
    short read: the caller holds the writer lock, so the pages are one state)."""
    keys = sql.SQL(", ").join(map(sql.Identifier, rows.key))
    query = sql.SQL("SELECT {cols} FROM {table} WHERE collection = %(c)s AND " + rows.only + " {after} ORDER BY {keys} LIMIT %(n)s")
    first = query.format(cols=sql.SQL(", ").join(_column(n, t) for n, t in rows.columns), table=_table(rows),
                         after=sql.SQL(""), keys=keys)
    rest = query.format(
        cols=sql.SQL(", ").join(_column(n, t) for n, t in rows.columns), table=_table(rows), keys=keys,
        after=sql.SQL("AND ({}) > ({})").format(keys, sql.SQL(", ").join(sql.Placeholder(f"k{i}") for i in range(len(rows.key)))),
    )
    names = [n for n, _ in rows.columns]
    positions = [names.index(k) for k in rows.key]
    after: dict[str, Any] | None = None
    while True:
        with pool.connection() as conn:
            found = conn.execute(first if after is None else rest, {"c": collection, "n": rows.page_rows, **(after or {})}).fetchall()
        if not found:
            return
        yield pa.Table.from_pylist([dict(zip(names, r)) for r in found], schema=rows.schema)
        after = {f"k{i}": found[-1][p] for i, p in enumerate(positions)}
        if len(found) < rows.page_rows:
            return


def copy_in(conn: psycopg.Connection, rows: RowSet, collection: str, values: Sequence[Sequence[Any]]) -> int:
    """COPY rows (the RowSet's columns, in order) into the catalog table as `collection`'s, in
    the caller's transaction."""
    columns = sql.SQL(", ").join(map(sql.Identifier, ("collection", *(n for n, _ in rows.columns))))
    with conn.cursor() as cur, cur.copy(sql.SQL("COPY {} ({}) FROM STDIN").format(_table(rows), columns)) as copy:
        for row in values:
            copy.write_row((collection, *row))
    return len(values)


# ---------------------------------------------------------------- the definition


def read_definition(conn: psycopg.Connection, name: str) -> dict[str, Any]:
    """What a collection is, apart from its rows: source, settings, tier and tier rules, serving
    and previous model, and each attached model's full spec and fingerprints (the model's and
    its vectors'). JSON-ready."""
    row = conn.execute(
        """
        SELECT name, source, settings, serving_model, tier, tier_rules, previous_model, previous_retain_until, created_at
        FROM vector_platform.collections WHERE name = %s
        """,
        (name,),
    ).fetchone()
    if row is None:
        raise KeyError(f"unknown collection {name!r}")
    models = []
    for key, table, fingerprint, cold_snapshot in conn.execute(
        "SELECT model_key, table_name, fingerprint, cold_snapshot_id FROM vector_platform.collection_models "
        "WHERE collection = %s AND retired_at IS NULL ORDER BY added_at, model_key",
        (name,),
    ).fetchall():
        spec = get_model(conn, key)
        models.append({"key": key, "spec": spec.to_row(), "fingerprint": spec.fingerprint, "vectors_fingerprint": fingerprint,
                       "table": table, "cold_snapshot_id": cold_snapshot})
    return {
        "name": row[0], "source": row[1], "settings": row[2], "serving_model": row[3], "tier": row[4], "tier_rules": row[5],
        "previous_model": row[6], "previous_retain_until": row[7].isoformat() if row[7] else None,
        "created_at": row[8].isoformat(), "models": models,
    }


def insert_collection(conn: psycopg.Connection, name: str, definition: dict[str, Any], tier: str) -> None:
    """The collection's row and its model attachments, from a backup's definition (in the
    caller's transaction). The models must be registered, with the definition's fingerprints."""
    keys = {m["key"] for m in definition["models"]}
    previous = definition.get("previous_model") if definition.get("previous_model") in keys else None
    conn.execute(
        """
        INSERT INTO vector_platform.collections
            (name, source, settings, serving_model, tier, tier_rules, tier_changed_at, previous_model, previous_retain_until)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
        """,
        (name, definition["source"], Jsonb(definition["settings"]), definition["serving_model"], tier,
         Jsonb(definition["tier_rules"] or {}), clock.now(), previous,
         definition.get("previous_retain_until") if previous else None),
    )
    for model in definition["models"]:
        attach_model(conn, name, model["key"])


# ---------------------------------------------------------------- the state digest

_DIGESTS = {
    "documents": (
        "documents", "concat_ws('|', doc_id, content_hash, chunked_hash, md5(metadata::text), md5(coalesce(title, '')), "
        "extract(epoch FROM source_ts), extract(epoch FROM updated_at), extract(epoch FROM deleted_at))", "true",
    ),
    "chunks": ("chunks", "concat_ws('|', chunk_id, doc_id, seq, content_hash, token_count)", "true"),
    "dead_letters": ("dead_letters", "concat_ws('|', model_key, stage, ref, attempts)", "resolved_at IS NULL"),
    "labelled_queries": ("labelled_queries", "concat_ws('|', query_id, md5(text))", "true"),
    "qrels": ("qrels", "concat_ws('|', query_id, doc_id, relevance)", "true"),
    "archived_documents": ("archived_documents", "concat_ws('|', doc_id, content_hash, file_id, row_group, deleted_at)", "true"),
    "archive_files": ("archive_files", "concat_ws('|', key, sha256, rows)", "true"),
}


def catalog_state(conn: psycopg.Connection, name: str) -> dict[str, str]:
    """`rows:sum` of a row hash per catalog table of the collection, plus its definition's hash
    (bookkeeping such as last_queried_at and tier_changed_at left out): equal digests, equal
    catalog state. Order-independent and constant memory, as `snapshots.table_digest`."""
    out = {}
    for label, (table, expression, only) in _DIGESTS.items():
        rows, total = conn.execute(
            sql.SQL("SELECT count(*), coalesce(sum(hashtextextended(" + expression + ", 0)::numeric), 0) FROM {} "
                    "WHERE collection = %s AND " + only).format(sql.Identifier("vector_platform", table)),
            (name,),
        ).fetchone()
        out[label] = f"{rows}:{total}"
    definition = read_definition(conn, name)
    for model in definition["models"]:
        model.pop("cold_snapshot_id")  # the snapshot's rows count (in the vectors' digest), not its id
    definition.pop("created_at")
    out["definition"] = hashlib.sha256(json.dumps(definition, sort_keys=True, default=str).encode()).hexdigest()
    return out


def row_archive_counts(conn: psycopg.Connection, name: str) -> dict[str, int]:
    """Documents and files in the collection's row archive (Parquet on the primary store)."""
    documents = conn.execute(
        "SELECT count(*) FROM vector_platform.archived_documents WHERE collection = %s", (name,)).fetchone()[0]
    files, nbytes = conn.execute(
        "SELECT count(*), coalesce(sum(bytes), 0) FROM vector_platform.archive_files WHERE collection = %s", (name,)).fetchone()
    return {"documents": documents, "files": files, "bytes": int(nbytes)}


# ---------------------------------------------------------------- drops


def relations_of(conn: psycopg.Connection, name: str) -> list[str]:
    """Every vector table the collection may still have (schema vp_vectors): each attachment's
    table, retired ones included, and month partitions row archival detached but did not drop."""
    found = [r[0] for r in conn.execute(
        "SELECT table_name FROM vector_platform.collection_models WHERE collection = %s ORDER BY table_name", (name,))]
    found += [r[0] for r in conn.execute(
        "SELECT coalesce(detached_as, partition) FROM vector_platform.archive_partitions "
        "WHERE collection = %s AND state IN ('detaching', 'detached') ORDER BY id", (name,))]
    return found


def delete_collection(conn: psycopg.Connection, name: str) -> None:
    """Every catalog row of the collection, in the caller's transaction: the collection row
    (its attachments, documents, chunks, gates, swaps, labelled queries and row-archive
    receipts go with it by cascade), then the rows keyed by name alone."""
    conn.execute("DELETE FROM vector_platform.collections WHERE name = %s", (name,))
    for table in ("snapshots", "dead_letters", "tier_events", "query_stats"):
        conn.execute(sql.SQL("DELETE FROM {} WHERE collection = %s").format(sql.Identifier("vector_platform", table)), (name,))


def record_drop(conn: psycopg.Connection, name: str, backup_uri: str | None, forced: bool, details: dict[str, Any]) -> int:
    return conn.execute(
        "INSERT INTO vector_platform.dropped_collections (collection, dropped_at, backup_uri, forced, details) "
        "VALUES (%s, %s, %s, %s, %s) RETURNING id",
        (name, clock.now(), backup_uri, forced, Jsonb(details)),
    ).fetchone()[0]


def drops_with_files_left(conn: psycopg.Connection, name: str) -> list[int]:
    """Drops of `name` whose object-store files may still be there (the drop stopped after its commit)."""
    return [r[0] for r in conn.execute(
        "SELECT id FROM vector_platform.dropped_collections WHERE collection = %s AND files_removed_at IS NULL ORDER BY id",
        (name,),
    )]


def mark_files_removed(conn: psycopg.Connection, drop_ids: Sequence[int], when: dt.datetime | None = None) -> None:
    conn.execute(
        "UPDATE vector_platform.dropped_collections SET files_removed_at = %s WHERE id = ANY(%s)",
        (when or clock.now(), list(drop_ids)),
    )
