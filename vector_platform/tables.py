"""Vector tables (`vp_vectors`), their HNSW indexes and serving views (`vp_serving`): DDL,
bulk loading and index builds. Search reads them through `vector_platform.search`.

All statements are composed with `psycopg.sql`; names were validated by `names` first.
Index builds run on a connection in autocommit mode, reset their session settings on every
path, and check that what they built is valid (`pg_index.indisvalid`) before it counts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import psycopg
from psycopg import sql

from vector_platform.catalog.collections import announce_change
from vector_platform.catalog.schema import SERVING, VECTORS
from vector_platform.ingest.copy_binary import encode_vector_rows
from vector_platform.models import ModelSpec
from vector_platform.names import bounded_identifier

OPERATORS = {"cosine": "<=>", "l2": "<->", "inner_product": "<#>"}
OPCLASS_SUFFIX = {"cosine": "cosine_ops", "l2": "l2_ops", "inner_product": "ip_ops"}
ROW_COLUMNS = ("chunk_id", "doc_id", "seq", "content_hash", "text", "metadata", "source_ts")
COPY_TYPES = ("uuid", "text", "int4", "text", "text", "jsonb", "timestamptz", "vector")  # for write_row users


def table_id(table: str) -> sql.Composable:
    return sql.Identifier(VECTORS, table)


def view_id(collection: str) -> sql.Composable:
    return sql.Identifier(SERVING, collection)


def index_name(table: str) -> str:
    return bounded_identifier(table, suffix="_hnsw")


def column_type(spec: ModelSpec) -> sql.Composable:
    return sql.SQL("{}({})").format(sql.SQL(spec.storage_type), sql.Literal(spec.dims))


def operator(spec: ModelSpec) -> sql.Composable:
    return sql.SQL(OPERATORS[spec.distance])


def indexed_expression(spec: ModelSpec) -> sql.Composable:
    """What the HNSW index is built on: `embedding`, or `(embedding::halfvec(d))` for vector
    models too wide for a vector index. A query's ORDER BY must use this very expression."""
    if spec.index_type == spec.storage_type:
        return sql.SQL("embedding")
    return sql.SQL("(embedding::{}({}))").format(sql.SQL(spec.index_type), sql.Literal(spec.dims))


def index_opclass(spec: ModelSpec) -> sql.Composable:
    return sql.SQL(f"{spec.index_type}_{OPCLASS_SUFFIX[spec.distance]}")


def score_from_distance(spec: ModelSpec, distance: float) -> float:
    """Higher is better in every metric: cosine similarity, negated L2, inner product."""
    if spec.distance == "cosine":
        return 1.0 - distance
    return -distance


def create_table(conn: psycopg.Connection, table: str, spec: ModelSpec) -> None:
    conn.execute(
        sql.SQL(
            """
            CREATE TABLE IF NOT EXISTS {table} (
                chunk_id uuid PRIMARY KEY,
                doc_id text NOT NULL,
                seq int NOT NULL,
                content_hash text NOT NULL,
                text text NOT NULL,
                metadata jsonb NOT NULL DEFAULT '{{}}',
                source_ts timestamptz,
                embedding {vtype} NOT NULL,
                updated_at timestamptz NOT NULL DEFAULT now()
            )
            """
        ).format(table=table_id(table), vtype=column_type(spec))
    )


def table_exists(conn: psycopg.Connection, table: str) -> bool:
    return relation_exists(conn, VECTORS, table)


def existing_table_id(conn: psycopg.Connection, table: str) -> sql.Composable | None:
    """The table's identifier, or None while it does not exist yet."""
    return table_id(table) if table_exists(conn, table) else None


def view_exists(conn: psycopg.Connection, collection: str) -> bool:
    return relation_exists(conn, SERVING, collection)


def relation_exists(conn: psycopg.Connection, schema: str, name: str) -> bool:
    return conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s)",
        (schema, name),
    ).fetchone()[0]


def table_stats(conn: psycopg.Connection, table: str) -> tuple[int, int]:
    """(rows, bytes with indexes and TOAST) of a vector table."""
    return conn.execute(
        sql.SQL(
            "SELECT (SELECT count(*) FROM {t}), pg_total_relation_size(c.oid) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s"
        ).format(t=table_id(table)),
        (VECTORS, table),
    ).fetchone()


def copy_upsert(
    conn: psycopg.Connection,
    table: str,
    spec: ModelSpec,
    rows: Sequence[Sequence[Any]],
    vectors: np.ndarray,
    assume_new: bool = False,
) -> int:
    """Write rows (ROW_COLUMNS order) + vectors by binary COPY; rows whose chunk_id exists are updated.

    `assume_new`: the caller selected rows missing from the table (the bulk-load case). They are
    COPied straight into it inside a savepoint, which writes each row once instead of twice; if
    a concurrent writer got there first, the unique violation rolls the savepoint back and the
    batch takes the staged path: COPY into a temp table, then INSERT ... ON CONFLICT DO UPDATE.
    Runs in the caller's transaction: all rows land or none do.
    """
    if not len(rows):
        return 0
    payload = encode_vector_rows(rows, vectors)
    columns = sql.SQL(", ").join(map(sql.Identifier, ROW_COLUMNS + ("embedding",)))
    if assume_new and spec.storage_type == "vector":
        try:
            with conn.transaction(), conn.cursor() as cur:
                with cur.copy(sql.SQL("COPY {} ({}) FROM STDIN WITH (FORMAT BINARY)").format(table_id(table), columns)) as copy:
                    copy.write(payload)
            return len(rows)
        except psycopg.errors.UniqueViolation:
            pass
    stage = sql.Identifier("vp_stage")
    conn.execute(
        sql.SQL(
            "CREATE TEMP TABLE IF NOT EXISTS {stage} (chunk_id uuid, doc_id text, seq int, content_hash text, "
            "text text, metadata jsonb, source_ts timestamptz, embedding vector({dims})) ON COMMIT DROP"
        ).format(stage=stage, dims=sql.Literal(spec.dims))
    )
    with conn.cursor() as cur:
        with cur.copy(sql.SQL("COPY {} ({}) FROM STDIN WITH (FORMAT BINARY)").format(stage, columns)) as copy:
            copy.write(payload)
        cast = sql.SQL("embedding::{}").format(column_type(spec))
        cur.execute(
            sql.SQL(
                """
                INSERT INTO {table} AS t (chunk_id, doc_id, seq, content_hash, text, metadata, source_ts, embedding)
                SELECT chunk_id, doc_id, seq, content_hash, text, metadata, source_ts, {cast} FROM {stage}
                ON CONFLICT (chunk_id) DO UPDATE SET
                    doc_id = excluded.doc_id, seq = excluded.seq, metadata = excluded.metadata,
                    source_ts = excluded.source_ts, embedding = excluded.embedding, updated_at = now()
                """
            ).format(table=table_id(table), cast=cast, stage=stage)
        )
        written = cur.rowcount
        cur.execute(sql.SQL("DROP TABLE {}").format(stage))
    return written


# ---------------------------------------------------------------- HNSW

@dataclass
class IndexReport:
    name: str
    action: str  # built | rebuilt | kept
    seconds: float
    bytes: int
    rows: int
    maintenance_work_mem_mb: int
    dropped_invalid: list[str] = field(default_factory=list)


def graph_bytes_estimate(rows: int, spec: ModelSpec, m: int) -> int:
    """Roughly what pgvector's in-memory HNSW graph needs: vectors + 2m neighbours on layer 0."""
    vector_bytes = spec.dims * (2 if spec.index_type == "halfvec" else 4) + 8
    neighbour_bytes = 2 * m * 10 + 64
    return rows * (vector_bytes + neighbour_bytes)


def _hnsw_indexes(conn: psycopg.Connection, table: str) -> list[tuple[str, list[str], int, bool]]:
    return conn.execute(
        """
        SELECT i.relname, coalesce(i.reloptions, '{}'), pg_relation_size(i.oid), x.indisvalid
        FROM pg_index x
        JOIN pg_class t ON t.oid = x.indrelid
        JOIN pg_namespace n ON n.oid = t.relnamespace
        JOIN pg_class i ON i.oid = x.indexrelid
        JOIN pg_am am ON am.oid = i.relam
        WHERE n.nspname = %s AND t.relname = %s AND am.amname = 'hnsw'
        ORDER BY i.relname
        """,
        (VECTORS, table),
    ).fetchall()


def current_index(conn: psycopg.Connection, table: str) -> dict[str, Any] | None:
    """The table's valid HNSW index: name, m, ef_construction, bytes (None when there is none)."""
    for name, options, size, valid in _hnsw_indexes(conn, table):
        if valid:
            opts = dict(opt.split("=", 1) for opt in options)
            return {"name": name, "m": int(opts.get("m", 16)), "ef_construction": int(opts.get("ef_construction", 64)), "bytes": size}
    return None


def drop_invalid_indexes(conn: psycopg.Connection, table: str) -> list[str]:
    """Drop HNSW indexes left invalid by an interrupted CREATE INDEX CONCURRENTLY."""
    dropped = []
    for name, _, _, valid in _hnsw_indexes(conn, table):
        if not valid:
            conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(VECTORS, name)))
            dropped.append(name)
    return dropped


def _index_is_valid(conn: psycopg.Connection, name: str) -> bool:
    row = conn.execute(
        "SELECT x.indisvalid FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid "
        "JOIN pg_namespace n ON n.oid = i.relnamespace WHERE n.nspname = %s AND i.relname = %s",
        (VECTORS, name),
    ).fetchone()
    return bool(row and row[0])


class InvalidIndex(RuntimeError):
    """An index build finished but PostgreSQL marked the index invalid."""


def ensure_hnsw(
    conn: psycopg.Connection,
    table: str,
    spec: ModelSpec,
    m: int,
    ef_construction: int,
    max_work_mem_mb: int = 1024,
    parallel_workers: int = 1,
) -> IndexReport:
    """Build the HNSW index after the bulk load; rebuild it (concurrently) if m/ef changed.

    `conn` must be in autocommit mode (CREATE INDEX CONCURRENTLY). Invalid leftovers of an
    interrupted build are dropped first; the new index must be valid before it replaces the old.
    """
    if not conn.autocommit:
        raise ValueError("ensure_hnsw needs a connection in autocommit mode")
    rows = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table_id(table))).fetchone()[0]
    dropped = drop_invalid_indexes(conn, table)
    existing = current_index(conn, table)
    name = index_name(table)
    if existing and (existing["m"], existing["ef_construction"]) == (m, ef_construction):
        return IndexReport(existing["name"], "kept", 0.0, existing["bytes"], rows, 0, dropped)
    work_mem_mb = int(min(max_work_mem_mb, max(64, graph_bytes_estimate(rows, spec, m) * 1.3 / 2**20)))
    opclass, expression = index_opclass(spec), indexed_expression(spec)
    params = sql.SQL("WITH (m = {}, ef_construction = {})").format(sql.Literal(m), sql.Literal(ef_construction))
    started = time.perf_counter()
    try:
        conn.execute("SELECT set_config('maintenance_work_mem', %s, false)", (f"{work_mem_mb}MB",))
        conn.execute("SELECT set_config('max_parallel_maintenance_workers', %s, false)", (str(parallel_workers),))
        if existing is None:
            conn.execute(
                sql.SQL("CREATE INDEX {} ON {} USING hnsw ({} {}) {}").format(
                    sql.Identifier(name), table_id(table), expression, opclass, params
                )
            )
            if not _index_is_valid(conn, name):
                raise InvalidIndex(f"index {name} on {VECTORS}.{table} was built invalid")
            action = "built"
        else:
            # Search keeps using the old index until the new one is valid.
            tmp = bounded_identifier(table, suffix="_hnsw_new")
            conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(VECTORS, tmp)))
            conn.execute(
                sql.SQL("CREATE INDEX CONCURRENTLY {} ON {} USING hnsw ({} {}) {}").format(
                    sql.Identifier(tmp), table_id(table), expression, opclass, params
                )
            )
            if not _index_is_valid(conn, tmp):
                conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(VECTORS, tmp)))
                raise InvalidIndex(f"the rebuilt index on {VECTORS}.{table} came out invalid; the old one still serves")
            with conn.transaction():
                conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(VECTORS, existing["name"])))
                conn.execute(sql.SQL("ALTER INDEX {} RENAME TO {}").format(sql.Identifier(VECTORS, tmp), sql.Identifier(name)))
            action = "rebuilt"
    finally:
        conn.execute("RESET maintenance_work_mem")
        conn.execute("RESET max_parallel_maintenance_workers")
    seconds = time.perf_counter() - started
    conn.execute(sql.SQL("ANALYZE {}").format(table_id(table)))
    size = current_index(conn, table)["bytes"]
    return IndexReport(name, action, seconds, size, rows, work_mem_mb, dropped)


# ---------------------------------------------------------------- serving view

def publish_view(conn: psycopg.Connection, collection: str, table: str) -> None:
    """Point the collection's serving view at `table`, atomically (in the caller's transaction).

    The view carries the fingerprint of the table's vectors as a constant column: search asks
    for its query's fingerprint (`WHERE fingerprint = ...`, folded by the planner into a
    one-time filter), so a query embedded for one model never ranks another model's vectors,
    even while a swap replaces the view under it and the dimensions are equal."""
    row = conn.execute(
        "SELECT fingerprint FROM vector_platform.collection_models WHERE collection = %s AND table_name = %s",
        (collection, table),
    ).fetchone()
    if row is None or not row[0]:
        raise ValueError(f"{VECTORS}.{table} is not a vector table of collection {collection!r}")
    conn.execute(sql.SQL("DROP VIEW IF EXISTS {}").format(view_id(collection)))
    conn.execute(
        sql.SQL(
            "CREATE VIEW {} AS SELECT chunk_id, doc_id, seq, content_hash, text, metadata, source_ts, embedding, "
            "{}::text AS fingerprint FROM {}"
        ).format(view_id(collection), sql.Literal(row[0]), table_id(table))
    )
    announce_change(conn, collection)


def drop_view(conn: psycopg.Connection, collection: str) -> None:
    """Stop serving a collection from Postgres (in the caller's transaction)."""
    conn.execute(sql.SQL("DROP VIEW IF EXISTS {}").format(view_id(collection)))
    announce_change(conn, collection)


def drop_table(conn: psycopg.Connection, table: str) -> None:
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(table_id(table)))
