"""SQL for vector tables (`vp_vectors`), their HNSW indexes and serving views (`vp_serving`).

All statements are composed with `psycopg.sql`; names were validated by `names` first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from vector_platform.catalog import SERVING, VECTORS
from vector_platform.copy_binary import encode_vector_rows
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
    return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f'{VECTORS}."{table}"',)).fetchone()[0]


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


def graph_bytes_estimate(rows: int, spec: ModelSpec, m: int) -> int:
    """Roughly what pgvector's in-memory HNSW graph needs: vectors + 2m neighbours on layer 0."""
    vector_bytes = spec.dims * (2 if spec.storage_type == "halfvec" else 4) + 8
    neighbour_bytes = 2 * m * 10 + 64
    return rows * (vector_bytes + neighbour_bytes)


def current_index(conn: psycopg.Connection, table: str) -> dict[str, Any] | None:
    row = conn.execute(
        """
        SELECT i.relname, coalesce(i.reloptions, '{}'), pg_relation_size(i.oid)
        FROM pg_index x
        JOIN pg_class t ON t.oid = x.indrelid
        JOIN pg_namespace n ON n.oid = t.relnamespace
        JOIN pg_class i ON i.oid = x.indexrelid
        JOIN pg_am am ON am.oid = i.relam
        WHERE n.nspname = %s AND t.relname = %s AND am.amname = 'hnsw' AND x.indisvalid
        """,
        (VECTORS, table),
    ).fetchone()
    if row is None:
        return None
    options = dict(opt.split("=", 1) for opt in row[1])
    return {"name": row[0], "m": int(options.get("m", 16)), "ef_construction": int(options.get("ef_construction", 64)), "bytes": row[2]}


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

    `conn` must be in autocommit mode (CREATE INDEX CONCURRENTLY).
    """
    rows = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table_id(table))).fetchone()[0]
    existing = current_index(conn, table)
    name = index_name(table)
    if existing and (existing["m"], existing["ef_construction"]) == (m, ef_construction):
        return IndexReport(existing["name"], "kept", 0.0, existing["bytes"], rows, 0)
    work_mem_mb = int(min(max_work_mem_mb, max(64, graph_bytes_estimate(rows, spec, m) * 1.3 / 2**20)))
    conn.execute(sql.SQL("SET maintenance_work_mem = {}").format(sql.Literal(f"{work_mem_mb}MB")))
    conn.execute(sql.SQL("SET max_parallel_maintenance_workers = {}").format(sql.Literal(parallel_workers)))
    opclass = sql.SQL(f"{spec.storage_type}_{OPCLASS_SUFFIX[spec.distance]}")
    params = sql.SQL("WITH (m = {}, ef_construction = {})").format(sql.Literal(m), sql.Literal(ef_construction))
    started = time.perf_counter()
    if existing is None:
        conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(VECTORS, name)))  # an invalid leftover
        conn.execute(
            sql.SQL("CREATE INDEX {} ON {} USING hnsw (embedding {}) {}").format(
                sql.Identifier(name), table_id(table), opclass, params
            )
        )
        action = "built"
    else:
        # Search keeps using the old index until the new one is valid.
        tmp = bounded_identifier(table, suffix="_hnsw_new")
        conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(VECTORS, tmp)))
        conn.execute(
            sql.SQL("CREATE INDEX CONCURRENTLY {} ON {} USING hnsw (embedding {}) {}").format(
                sql.Identifier(tmp), table_id(table), opclass, params
            )
        )
        with conn.transaction():
            conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(VECTORS, existing["name"])))
            conn.execute(sql.SQL("ALTER INDEX {} RENAME TO {}").format(sql.Identifier(VECTORS, tmp), sql.Identifier(name)))
        action = "rebuilt"
    seconds = time.perf_counter() - started
    conn.execute("RESET maintenance_work_mem")
    conn.execute("RESET max_parallel_maintenance_workers")
    conn.execute(sql.SQL("ANALYZE {}").format(table_id(table)))
    size = current_index(conn, table)["bytes"]
    return IndexReport(name, action, seconds, size, rows, work_mem_mb)


# ---------------------------------------------------------------- serving view

def publish_view(conn: psycopg.Connection, collection: str, table: str) -> None:
    """Point the collection's serving view at `table`, atomically (in the caller's transaction)."""
    conn.execute(sql.SQL("DROP VIEW IF EXISTS {}").format(view_id(collection)))
    conn.execute(
        sql.SQL(
            "CREATE VIEW {} AS SELECT chunk_id, doc_id, seq, content_hash, text, metadata, source_ts, embedding FROM {}"
        ).format(view_id(collection), table_id(table))
    )


# ---------------------------------------------------------------- nearest neighbours

def _plan_settings(conn: psycopg.Connection, exact: bool, ef_search: int, iterative: bool) -> None:
    """Set every planner knob search depends on, each time.

    All of them, both ways: inside a pooled connection's transaction `conn.transaction()` is a
    savepoint, and a SET LOCAL from an earlier ANN query would otherwise still be in force.
    """
    settings = {
        "enable_seqscan": "on" if exact else "off",
        "enable_indexscan": "off" if exact else "on",
        "enable_bitmapscan": "off" if exact else "on",
        "hnsw.ef_search": str(int(ef_search)),
        "hnsw.iterative_scan": "relaxed_order" if iterative and not exact else "off",
    }
    for name, value in settings.items():
        conn.execute("SELECT set_config(%s, %s, true)", (name, value), prepare=False)


def nearest(
    conn: psycopg.Connection,
    relation: sql.Composable,
    spec: ModelSpec,
    vector: np.ndarray,
    k: int,
    exact: bool,
    ef_search: int = 100,
    filters: dict[str, Any] | None = None,
    columns: sql.Composable | None = None,
) -> list[tuple]:
    """Top-k rows by the model's distance; each row ends with the distance.

    ANN mode forces the HNSW index (the planner prefers an exact sort on small tables after
    ANALYZE); exact mode forbids it. `prepare=False`: a prepared plan would ignore the SETs.
    """
    columns = columns or sql.SQL("chunk_id, doc_id, text, metadata")
    where = sql.SQL("WHERE metadata @> %(filters)s") if filters else sql.SQL("")
    query = sql.SQL(
        "SELECT {columns}, embedding {op} %(q)s::{vtype} AS distance FROM {rel} {where} "
        "ORDER BY embedding {op} %(q)s::{vtype} LIMIT %(k)s"
    ).format(
        columns=columns, op=operator(spec), vtype=sql.SQL(spec.storage_type), rel=relation, where=where
    )
    params = {"q": np.asarray(vector, dtype=np.float32), "k": k, "filters": Jsonb(filters or {})}
    with conn.transaction():
        _plan_settings(conn, exact, ef_search, iterative=bool(filters))
        rows = conn.execute(query, params, prepare=False).fetchall()
    if filters and not exact:  # relaxed order: results may come slightly out of order
        rows.sort(key=lambda r: r[-1])
    return rows


def explain_nearest(conn: psycopg.Connection, relation: sql.Composable, spec: ModelSpec, vector: np.ndarray, exact: bool, ef_search: int = 100) -> str:
    """The plan `nearest` really runs (for check metadata and tests)."""
    query = sql.SQL("EXPLAIN SELECT chunk_id FROM {rel} ORDER BY embedding {op} %(q)s::{vtype} LIMIT 10").format(
        rel=relation, op=operator(spec), vtype=sql.SQL(spec.storage_type)
    )
    with conn.transaction():
        _plan_settings(conn, exact, ef_search, iterative=False)
        plan = conn.execute(query, {"q": np.asarray(vector, dtype=np.float32)}, prepare=False).fetchall()
    return "\n".join(r[0] for r in plan)
