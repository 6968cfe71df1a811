"""Vector tables (`vp_vectors`), their HNSW indexes and serving views (`vp_serving`): DDL,
bulk loading and index builds. Search reads them through `vector_platform.search`.

Two layouts. A plain table has `chunk_id` as its primary key. A collection with a row-archival
rule (`archive_rows_older_than_days`) gets a table partitioned by month on the source
timestamp, so that archival detaches whole months instead of deleting rows (see
`vector_platform.archive.partitions`):

- partitions are named `<table>_pYYYYMM` (UTC months) and made on demand by the writes that
  need them (`ensure_partitions`); rows without a source timestamp live in `<table>_pundated`
  (the partition key is `coalesce(source_ts, 'infinity')`: PostgreSQL refuses `DETACH ...
  CONCURRENTLY` on a table with a default partition, so there is none);
- a unique key must contain the partition key, which `chunk_id` alone cannot be: writes
  delete-then-insert under a transaction lock of the table instead of `ON CONFLICT`;
- the HNSW index is a partitioned index built partition by partition (`ensure_hnsw`).

All statements are composed with `psycopg.sql`; names were validated by `names` first.
Index builds run on a connection in autocommit mode, reset their session settings on every
path, and check that what they built is valid (`pg_index.indisvalid`) before it counts.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import psycopg
from psycopg import sql

from vector_platform.catalog.collections import announce_change, get_collection, vector_table_name
from vector_platform.catalog.schema import SERVING, VECTORS
from vector_platform.ingest.copy_binary import encode_vector_rows
from vector_platform.locks import lock_key
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
    return sql.SQL("{}({})").format(sql.SQL(spec.heap_type), sql.Literal(spec.dims))


def operator(spec: ModelSpec) -> sql.Composable:
    return sql.SQL(OPERATORS[spec.distance])


def indexed_expression(spec: ModelSpec) -> sql.Composable:
    """What the HNSW index is built on: `embedding`; `(embedding::halfvec(d))` for vector
    models too wide for a vector index; `(binary_quantize(embedding)::bit(d))` for binary
    storage. A query's ORDER BY must use this very expression."""
    if spec.index_type == "bit":
        return sql.SQL("(binary_quantize(embedding)::bit({}))").format(sql.Literal(spec.dims))
    if spec.index_type == spec.heap_type:
        return sql.SQL("embedding")
    return sql.SQL("(embedding::{}({}))").format(sql.SQL(spec.index_type), sql.Literal(spec.dims))


def index_opclass(spec: ModelSpec) -> sql.Composable:
    if spec.index_type == "bit":  # signs compared by hamming distance, whatever the model's metric
        return sql.SQL("bit_hamming_ops")
    return sql.SQL(f"{spec.index_type}_{OPCLASS_SUFFIX[spec.distance]}")


def score_from_distance(spec: ModelSpec, distance: float) -> float:
    """Higher is better in every metric: cosine similarity, negated L2, inner product."""
    if spec.distance == "cosine":
        return 1.0 - distance
    return -distance


_COLUMNS = """
    doc_id text NOT NULL,
    seq int NOT NULL,
    content_hash text NOT NULL,
    text text NOT NULL,
    metadata jsonb NOT NULL DEFAULT '{{}}',
    source_ts timestamptz,
    embedding {vtype} NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
"""
PARTITION_KEY = "coalesce(source_ts, 'infinity'::timestamptz)"
UNDATED_SUFFIX = "_pundated"


def create_table(conn: psycopg.Connection, table: str, spec: ModelSpec, partitioned: bool = False) -> None:
    """Create the vector table if it is missing (an existing table keeps its layout)."""
    if not partitioned:
        conn.execute(
            sql.SQL("CREATE TABLE IF NOT EXISTS {table} (chunk_id uuid PRIMARY KEY," + _COLUMNS + ")").format(
                table=table_id(table), vtype=column_type(spec))
        )
        return
    if table_exists(conn, table):
        return
    conn.execute(
        sql.SQL("CREATE TABLE {table} (chunk_id uuid NOT NULL," + _COLUMNS + ") PARTITION BY RANGE ((" + PARTITION_KEY + "))").format(
            table=table_id(table), vtype=column_type(spec))
    )
    conn.execute(sql.SQL("CREATE INDEX {} ON {} (chunk_id)").format(
        sql.Identifier(bounded_identifier(table, suffix="_chunk_id")), table_id(table)))
    conn.execute(sql.SQL("CREATE TABLE {} PARTITION OF {} FOR VALUES FROM ('infinity') TO (MAXVALUE)").format(
        table_id(bounded_identifier(table, suffix=UNDATED_SUFFIX)), table_id(table)))


def collection_tables(conn: psycopg.Connection, collection: str) -> dict[str, str]:
    """model key -> vector table, for the collection's models whose table exists."""
    found = {}
    for model_key in get_collection(conn, collection).models:
        table = vector_table_name(conn, collection, model_key)
        if table_exists(conn, table):
            found[model_key] = table
    return found


def is_partitioned(conn: psycopg.Connection, table: str) -> bool:
    row = conn.execute(
        "SELECT c.relkind = 'p' FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s", (VECTORS, table)).fetchone()
    return bool(row and row[0])


def month_of(ts: dt.datetime) -> tuple[int, int]:
    utc = ts.astimezone(dt.timezone.utc)  # months in UTC, whatever the session's time zone
    return utc.year, utc.month


def month_bounds(year: int, month: int) -> tuple[dt.datetime, dt.datetime]:
    lower = dt.datetime(year, month, 1, tzinfo=dt.timezone.utc)
    upper = dt.datetime(year + month // 12, month % 12 + 1, 1, tzinfo=dt.timezone.utc)
    return lower, upper


def partition_name(table: str, year: int, month: int) -> str:
    return bounded_identifier(table, suffix=f"_p{year:04d}{month:02d}")


def partitions(conn: psycopg.Connection, table: str) -> dict[str, tuple[int, int] | None]:
    """The attached partitions of a partitioned vector table: name -> (year, month), or None
    for the undated one. Months come from the names, which `ensure_partitions` alone gives."""
    found = {}
    for (name,) in conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace n ON n.oid = p.relnamespace "
        "WHERE n.nspname = %s AND p.relname = %s AND NOT i.inhdetachpending ORDER BY c.relname",
        (VECTORS, table),
    ):
        suffix = name[-8:]
        found[name] = (int(suffix[2:6]), int(suffix[6:8])) if suffix[:2] == "_p" and suffix[2:].isdigit() else None
    return found


class PartitionInUse(RuntimeError):
    """A month's partition name belongs to a detached partition that archival has not finished."""


def ensure_partitions(conn: psycopg.Connection, table: str, timestamps) -> list[str]:
    """Make the month partitions that rows with these source timestamps need (in the caller's
    transaction). A partition is created as a plain table and then attached, which locks the
    parent only SHARE UPDATE EXCLUSIVE: searches and other writes go on meanwhile."""
    wanted = {month_of(ts) for ts in timestamps if ts is not None}
    if not wanted:
        return []
    have = set(partitions(conn, table).values())
    missing = sorted(wanted - have)
    if not missing:
        return []
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key("partitions", table),))
    have = set(partitions(conn, table).values())  # another writer may have made them meanwhile
    made = []
    for year, month in missing:
        if (year, month) in have:
            continue
        name = partition_name(table, year, month)
        if relation_exists(conn, VECTORS, name):
            raise PartitionInUse(
                f"{VECTORS}.{name} is a detached partition that row archival has not finished; "
                f"run `vector-platform archive-rows` for this collection, then write rows of {year:04d}-{month:02d} again"
            )
        lower, upper = month_bounds(year, month)
        conn.execute(sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS)").format(table_id(name), table_id(table)))
        conn.execute(
            sql.SQL("ALTER TABLE {} ATTACH PARTITION {} FOR VALUES FROM ({}) TO ({})").format(
                table_id(table), table_id(name), sql.Literal(lower), sql.Literal(upper))
        )
        made.append(name)
    return made


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
    """(rows, bytes with indexes and TOAST) of a vector table, all its partitions included."""
    return conn.execute(
        sql.SQL(
            "SELECT (SELECT count(*) FROM {t}), "
            "CASE WHEN c.relkind = 'p' THEN (SELECT coalesce(sum(pg_total_relation_size(relid)), 0)::bigint "
            "FROM pg_partition_tree(c.oid)) ELSE pg_total_relation_size(c.oid) END FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s"
        ).format(t=table_id(table)),
        (VECTORS, table),
    ).fetchone()


def bytes_per_vector(conn: psycopg.Connection, table: str, rows: int | None = None) -> dict[str, Any]:
    """What one vector costs on disk, measured: the table's bytes (heap and TOAST, every
    partition) and its valid HNSW index's bytes, each divided by the rows (`rows`: counted
    when not given). The index is what must stay in memory for fast search; binary storage
    shrinks it, halfvec both."""
    counted, heap = conn.execute(
        sql.SQL(
            "SELECT CASE WHEN %s THEN (SELECT count(*) FROM {t}) END, "
            "CASE WHEN c.relkind = 'p' THEN (SELECT coalesce(sum(pg_table_size(relid)), 0)::bigint "
            "FROM pg_partition_tree(c.oid)) ELSE pg_table_size(c.oid) END FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s"
        ).format(t=table_id(table)),
        (rows is None, VECTORS, table),
    ).fetchone()
    rows = counted if rows is None else rows
    index = current_index(conn, table)
    index_bytes = index["bytes"] if index else 0
    return {
        "rows": rows,
        "table_bytes_per_vector": round(heap / rows, 1) if rows else None,
        "index_bytes_per_vector": round(index_bytes / rows, 1) if rows and index else None,
    }


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
    A partitioned table has no unique key on chunk_id: its rows are staged the same way, then
    the table's rows of those chunks are deleted and the staged ones inserted, under a
    transaction lock of the table (two writers cannot interleave the two statements).

    Runs in the caller's transaction: all rows land or none do.
    """
    if not len(rows):
        return 0
    payload = encode_vector_rows(rows, vectors)
    columns = sql.SQL(", ").join(map(sql.Identifier, ROW_COLUMNS + ("embedding",)))
    partitioned = is_partitioned(conn, table)
    if partitioned:
        ensure_partitions(conn, table, [r[6] for r in rows])
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key("vector_rows", table),))
    elif assume_new and spec.heap_type == "vector":
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
        if partitioned:
            cur.execute(sql.SQL("DELETE FROM {table} t USING {stage} s WHERE t.chunk_id = s.chunk_id").format(
                table=table_id(table), stage=stage))
            cur.execute(
                sql.SQL(
                    "INSERT INTO {table} (chunk_id, doc_id, seq, content_hash, text, metadata, source_ts, embedding) "
                    "SELECT chunk_id, doc_id, seq, content_hash, text, metadata, source_ts, {cast} FROM {stage}"
                ).format(table=table_id(table), cast=cast, stage=stage)
            )
            written = cur.rowcount
            cur.execute(sql.SQL("DROP TABLE {}").format(stage))
            return written
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


def copy_restored_rows(
    conn: psycopg.Connection,
    table: str,
    spec: ModelSpec,
    rows: Sequence[Sequence[Any]],
    vectors: np.ndarray,
    updated_at: Sequence[dt.datetime],
    partitioned: bool,
) -> None:
    """Bulk-load rows read back from a snapshot or a backup (ROW_COLUMNS order) by binary COPY,
    in the caller's transaction. Their `updated_at` is kept, so the table's digest is the
    snapshot's. The binary COPY carries pgvector's `vector` format; a halfvec table is filled
    through a temp table of `vector` and a cast (pgvector's own conversion, exact for these values)."""
    if not len(rows):
        return
    payload = encode_vector_rows(rows, vectors, updated_at=updated_at)
    columns = sql.SQL(", ").join(map(sql.Identifier, ROW_COLUMNS + ("embedding", "updated_at")))
    direct = spec.heap_type == "vector"
    stage = sql.Identifier("vp_restore_stage")
    target = table_id(table) if direct else stage
    with conn.cursor() as cur:
        if partitioned:
            ensure_partitions(conn, table, [r[6] for r in rows])
        if not direct:
            cur.execute(sql.SQL("CREATE TEMP TABLE {} (LIKE {} INCLUDING DEFAULTS) ON COMMIT DROP").format(stage, table_id(table)))
            cur.execute(sql.SQL("ALTER TABLE {} ALTER COLUMN embedding TYPE vector({})").format(stage, sql.Literal(spec.dims)))
        with cur.copy(sql.SQL("COPY {} ({}) FROM STDIN WITH (FORMAT BINARY)").format(target, columns)) as out:
            out.write(payload)
        if not direct:
            cast = [sql.Identifier(c) for c in ROW_COLUMNS] + [sql.SQL("embedding::{}").format(column_type(spec)), sql.Identifier("updated_at")]
            cur.execute(sql.SQL("INSERT INTO {} ({}) SELECT {} FROM {}").format(table_id(table), columns, sql.SQL(", ").join(cast), stage))
            cur.execute(sql.SQL("DROP TABLE {}").format(stage))  # several batches may share one transaction


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
    vector_bytes = {"halfvec": spec.dims * 2, "bit": (spec.dims + 7) // 8}.get(spec.index_type, spec.dims * 4) + 8
    neighbour_bytes = 2 * m * 10 + 64
    return rows * (vector_bytes + neighbour_bytes)


def _hnsw_indexes(conn: psycopg.Connection, table: str) -> list[tuple[str, list[str], int, bool]]:
    return conn.execute(
        """
        SELECT i.relname, coalesce(i.reloptions, '{}'),
               CASE WHEN i.relkind = 'I' THEN (SELECT coalesce(sum(pg_relation_size(relid)), 0)::bigint
                    FROM pg_partition_tree(i.oid)) ELSE pg_relation_size(i.oid) END, x.indisvalid
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
    if is_partitioned(conn, table):
        return _ensure_hnsw_partitioned(conn, table, spec, m, ef_construction, max_work_mem_mb, parallel_workers)
    rows = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table_id(table))).fetchone()[0]
    dropped = drop_invalid_indexes(conn, table)
    existing = current_index(conn, table)
    name = index_name(table)
    if existing and (existing["m"], existing["ef_construction"]) == (m, ef_construction):
        return IndexReport(existing["name"], "kept", 0.0, existing["bytes"], rows, 0, dropped)
    work_mem_mb = _work_mem_mb(rows, spec, m, max_work_mem_mb)
    started = time.perf_counter()
    try:
        _set_build_settings(conn, work_mem_mb, parallel_workers)
        if existing is None:
            _create_hnsw(conn, name, table, spec, m, ef_construction)
            if not _index_is_valid(conn, name):
                raise InvalidIndex(f"index {name} on {VECTORS}.{table} was built invalid")
            action = "built"
        else:
            # Search keeps using the old index until the new one is valid.
            tmp = bounded_identifier(table, suffix="_hnsw_new")
            conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(VECTORS, tmp)))
            _create_hnsw(conn, tmp, table, spec, m, ef_construction, "CONCURRENTLY")
            if not _index_is_valid(conn, tmp):
                conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(VECTORS, tmp)))
                raise InvalidIndex(f"the rebuilt index on {VECTORS}.{table} came out invalid; the old one still serves")
            with conn.transaction():
                conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(VECTORS, existing["name"])))
                conn.execute(sql.SQL("ALTER INDEX {} RENAME TO {}").format(sql.Identifier(VECTORS, tmp), sql.Identifier(name)))
            action = "rebuilt"
    finally:
        _reset_build_settings(conn)
    seconds = time.perf_counter() - started
    conn.execute(sql.SQL("ANALYZE {}").format(table_id(table)))
    size = current_index(conn, table)["bytes"]
    return IndexReport(name, action, seconds, size, rows, work_mem_mb, dropped)


def build_hnsw_in_transaction(conn: psycopg.Connection, table: str, spec: ModelSpec, m: int, ef_construction: int,
                              max_work_mem_mb: int = 1024) -> str:
    """Build the HNSW index of a table made in the caller's still-open transaction (a restore,
    which commits everything at once): a plain CREATE INDEX, since nobody else can see the
    table yet and CONCURRENTLY cannot run in a transaction. On a partitioned table PostgreSQL
    builds every partition's index with it. Returns the index's name."""
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.INTRANS:
        raise ValueError("build_hnsw_in_transaction builds inside the caller's open transaction; there is none")
    rows = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table_id(table))).fetchone()[0]
    conn.execute("SELECT set_config('maintenance_work_mem', %s, true)", (f"{_work_mem_mb(rows, spec, m, max_work_mem_mb)}MB",))
    name = index_name(table)
    _create_hnsw(conn, name, table, spec, m, ef_construction)
    return name


def _create_hnsw(conn: psycopg.Connection, name: str, table: str, spec: ModelSpec, m: int, ef_construction: int,
                 how: str = "") -> None:
    """CREATE INDEX [CONCURRENTLY | ON ONLY] of the model's HNSW index (`how`)."""
    concurrently, only = ("CONCURRENTLY ", "") if how == "CONCURRENTLY" else ("", "ONLY " if how == "ON ONLY" else "")
    conn.execute(
        sql.SQL("CREATE INDEX " + concurrently + "{} ON " + only + "{} USING hnsw ({} {}) WITH (m = {}, ef_construction = {})").format(
            sql.Identifier(name), table_id(table), indexed_expression(spec), index_opclass(spec),
            sql.Literal(m), sql.Literal(ef_construction))
    )


def _work_mem_mb(rows: int, spec: ModelSpec, m: int, max_work_mem_mb: int) -> int:
    return int(min(max_work_mem_mb, max(64, graph_bytes_estimate(rows, spec, m) * 1.3 / 2**20)))


def _set_build_settings(conn: psycopg.Connection, work_mem_mb: int, parallel_workers: int) -> None:
    conn.execute("SELECT set_config('maintenance_work_mem', %s, false)", (f"{work_mem_mb}MB",))
    conn.execute("SELECT set_config('max_parallel_maintenance_workers', %s, false)", (str(parallel_workers),))


def _reset_build_settings(conn: psycopg.Connection) -> None:
    conn.execute("RESET maintenance_work_mem")
    conn.execute("RESET max_parallel_maintenance_workers")


def _ensure_hnsw_partitioned(
    conn: psycopg.Connection, table: str, spec: ModelSpec, m: int, ef_construction: int, max_work_mem_mb: int,
    parallel_workers: int,
) -> IndexReport:
    """The partitioned HNSW index, as PostgreSQL builds one without blocking writes: the parent
    index is created invalid `ON ONLY` the parent; each partition's index is built
    `CONCURRENTLY`, checked valid and attached; once every partition has one the parent index
    is valid. Partitions attached later get theirs from PostgreSQL (built on the empty table).

    An interrupted build is resumed: its parent index stays, partitions whose index is already
    attached are skipped, and an invalid leftover of a partition is dropped and rebuilt. A
    rebuild (m or ef_construction changed) builds a second partitioned index the same way and
    swaps it in once valid; search uses the old one until then."""
    rows = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table_id(table))).fetchone()[0]
    name = index_name(table)
    existing = current_index(conn, table)
    if existing and (existing["m"], existing["ef_construction"]) == (m, ef_construction):
        return IndexReport(existing["name"], "kept", 0.0, existing["bytes"], rows, 0, [])
    target = name if existing is None else bounded_identifier(table, suffix="_hnsw_new")
    child_suffix = "_hnsw" if existing is None else "_hnsw_new"
    dropped = []
    for leftover, options, _, valid in _hnsw_indexes(conn, table):
        wanted = dict(o.split("=", 1) for o in options) == {"m": str(m), "ef_construction": str(ef_construction)}
        if not valid and not (leftover == target and wanted):  # another build's leftover: not resumable
            conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(VECTORS, leftover)))
            dropped.append(leftover)
    if not relation_exists(conn, VECTORS, target):
        _create_hnsw(conn, target, table, spec, m, ef_construction, "ON ONLY")
    started = time.perf_counter()
    work_mem_mb = 64
    try:
        while True:
            # Partitions without an index attached to the target (PostgreSQL attaches one by
            # itself to a partition created meanwhile, so this ends).
            todo = conn.execute(
                """
                SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                WHERE i.inhparent = %s::regclass AND NOT i.inhdetachpending AND NOT EXISTS (
                    SELECT 1 FROM pg_inherits ii JOIN pg_index x ON x.indexrelid = ii.inhrelid
                    WHERE ii.inhparent = %s::regclass AND x.indrelid = c.oid)
                ORDER BY c.relname
                """,
                (f"{VECTORS}.{table}", f"{VECTORS}.{target}"),
            ).fetchall()
            if not todo:
                break
            for (part,) in todo:
                child = bounded_identifier(part, suffix=child_suffix)
                part_rows = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table_id(part))).fetchone()[0]
                part_mb = _work_mem_mb(part_rows, spec, m, max_work_mem_mb)
                work_mem_mb = max(work_mem_mb, part_mb)
                _set_build_settings(conn, part_mb, parallel_workers)
                if relation_exists(conn, VECTORS, child) and not _index_is_valid(conn, child):
                    conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(VECTORS, child)))
                    dropped.append(child)
                if not relation_exists(conn, VECTORS, child):  # a valid one not yet attached is attached as it is
                    _create_hnsw(conn, child, part, spec, m, ef_construction, "CONCURRENTLY")
                if not _index_is_valid(conn, child):
                    conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(VECTORS, child)))
                    raise InvalidIndex(f"the index of partition {VECTORS}.{part} came out invalid")
                conn.execute(sql.SQL("ALTER INDEX {} ATTACH PARTITION {}").format(
                    sql.Identifier(VECTORS, target), sql.Identifier(VECTORS, child)))
    finally:
        _reset_build_settings(conn)
    if not _index_is_valid(conn, target):
        raise InvalidIndex(f"index {target} on {VECTORS}.{table} is not valid with every partition's index attached")
    action = "built"
    if existing is not None:
        with conn.transaction():
            conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(VECTORS, existing["name"])))
            conn.execute(sql.SQL("ALTER INDEX {} RENAME TO {}").format(sql.Identifier(VECTORS, target), sql.Identifier(name)))
            for part in partitions(conn, table):
                old = bounded_identifier(part, suffix="_hnsw_new")
                if relation_exists(conn, VECTORS, old):
                    conn.execute(sql.SQL("ALTER INDEX {} RENAME TO {}").format(
                        sql.Identifier(VECTORS, old), sql.Identifier(bounded_identifier(part, suffix="_hnsw"))))
        action = "rebuilt"
    seconds = time.perf_counter() - started
    conn.execute(sql.SQL("ANALYZE {}").format(table_id(table)))
    return IndexReport(name, action, seconds, current_index(conn, table)["bytes"], rows, work_mem_mb, dropped)


# ---------------------------------------------------------------- serving view

# How long the swap of a serving view waits for its lock at a time, and in all. DROP VIEW needs
# an ACCESS EXCLUSIVE lock: while it waits behind a long search, every new search of the
# collection queues behind it. A short wait, given up and tried again, bounds that queue.
VIEW_LOCK_WAIT_MS = 100
VIEW_LOCK_GIVE_UP_S = 30.0


class ViewBusy(RuntimeError):
    """The serving view stayed locked by searches longer than VIEW_LOCK_GIVE_UP_S."""


def _view_label(table: str, fingerprint: str) -> str:
    return f"vector_platform serving view: {table} {fingerprint}"


def publish_view(conn: psycopg.Connection, collection: str, table: str) -> None:
    """Point the collection's serving view at `table`, atomically (in the caller's transaction).

    The view carries the fingerprint of the table's vectors as a constant column, which search
    reads with each row: a query embedded for one model never ranks another model's vectors,
    even while a swap replaces the view under it and the dimensions are equal.

    A view that already reads `table` (its comment says so) is left alone: re-publishing it
    after every ingest would take the view's exclusive lock for nothing. Otherwise the view is
    dropped under a short lock wait, retried (`VIEW_LOCK_WAIT_MS`, up to `VIEW_LOCK_GIVE_UP_S`),
    so a long search delays the swap, never the searches that arrive meanwhile."""
    row = conn.execute(
        "SELECT fingerprint FROM vector_platform.collection_models WHERE collection = %s AND table_name = %s",
        (collection, table),
    ).fetchone()
    if row is None or not row[0]:
        raise ValueError(f"{VECTORS}.{table} is not a vector table of collection {collection!r}")
    label = _view_label(table, row[0])
    view = view_id(collection)
    current = conn.execute(
        "SELECT obj_description(to_regclass(%s), 'pg_class')", (view.as_string(conn),), prepare=False
    ).fetchone()[0]
    if current == label:
        announce_change(conn, collection)
        return
    _drop_view_waiting(conn, view)
    conn.execute(
        sql.SQL(
            "CREATE VIEW {} AS SELECT chunk_id, doc_id, seq, content_hash, text, metadata, source_ts, embedding, "
            "{}::text AS fingerprint FROM {}"
        ).format(view, sql.Literal(row[0]), table_id(table))
    )
    conn.execute(sql.SQL("COMMENT ON VIEW {} IS {}").format(view, sql.Literal(label)))
    announce_change(conn, collection)


def _drop_view_waiting(conn: psycopg.Connection, view: sql.Composable) -> None:
    """DROP VIEW IF EXISTS in the caller's transaction, waiting for its lock a little at a time
    (a savepoint per attempt, so a timed-out attempt leaves the transaction usable)."""
    previous = conn.execute("SELECT current_setting('lock_timeout')", prepare=False).fetchone()[0]
    deadline = time.monotonic() + VIEW_LOCK_GIVE_UP_S
    try:
        while True:
            try:
                with conn.transaction():
                    conn.execute("SELECT set_config('lock_timeout', %s, true)", (f"{VIEW_LOCK_WAIT_MS}ms",), prepare=False)
                    conn.execute(sql.SQL("DROP VIEW IF EXISTS {}").format(view))
                return
            except psycopg.errors.LockNotAvailable:
                if time.monotonic() > deadline:
                    raise ViewBusy(
                        f"the serving view {view.as_string(conn)} stayed in use by searches for {VIEW_LOCK_GIVE_UP_S:.0f} s; "
                        "nothing was changed: try again"
                    ) from None
                time.sleep(0.02)
    finally:
        # a SET LOCAL made inside a savepoint outlives it: put the caller's value back (unless
        # the connection itself was lost, whose error is the one to report)
        if not conn.broken:
            conn.execute("SELECT set_config('lock_timeout', %s, true)", (previous,), prepare=False)


def drop_view(conn: psycopg.Connection, collection: str) -> None:
    """Stop serving a collection from Postgres (in the caller's transaction)."""
    _drop_view_waiting(conn, view_id(collection))
    announce_change(conn, collection)


def drop_table(conn: psycopg.Connection, table: str) -> None:
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(table_id(table)))
