"""Maintenance of vector tables: VACUUM (ANALYZE), and the health figures that say whether it keeps up.

For every vector table (each month partition of a partitioned one) the pass reads, before
and after its VACUUM (ANALYZE):
- live and dead tuples (`pg_stat_user_tables`): many dead tuples before the pass mean
  autovacuum falls behind the write rate;
- free space (`pgstattuple_approx`, from the contrib extension `pgstattuple`): space that
  stays in the table after VACUUM. Deleted rows leave it behind; new rows reuse it, but a table
  that stays mostly empty (after a row archival that did not detach whole months, say) is
  bloated, and only a rewrite (VACUUM FULL, pg_repack, or a model re-index through an
  upgrade) gives it back. Where the extension cannot be created (a managed server without the
  right), free space is reported as unknown and only dead tuples are judged;
- table, TOAST and index sizes, and whether each HNSW index is valid.

`judge` turns the figures into problems against thresholds (`Thresholds.from_env`):
VP_MAX_DEAD_TUPLE_RATIO (default 0.2 of all tuples, before VACUUM), VP_MAX_FREE_SPACE_RATIO
(default 0.5 of the table, after VACUUM), both only for tables of at least VP_BLOAT_MIN_BYTES
(default 1 MiB: a small table's ratios are noise).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool

from vector_platform import catalog, tables

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Thresholds:
    max_dead_tuple_ratio: float = 0.2
    max_free_space_ratio: float = 0.5
    min_bytes: int = 2**20

    @classmethod
    def from_env(cls) -> "Thresholds":
        return cls(
            max_dead_tuple_ratio=float(os.environ.get("VP_MAX_DEAD_TUPLE_RATIO", cls.max_dead_tuple_ratio)),
            max_free_space_ratio=float(os.environ.get("VP_MAX_FREE_SPACE_RATIO", cls.max_free_space_ratio)),
            min_bytes=int(os.environ.get("VP_BLOAT_MIN_BYTES", cls.min_bytes)),
        )


@dataclass
class TableHealth:
    collection: str
    model_key: str
    table: str  # the heap table measured: the vector table or one of its partitions
    live_tuples: int = 0
    dead_tuples_before: int = 0
    dead_tuples_after: int = 0
    table_bytes: int = 0
    toast_bytes: int = 0
    index_bytes: int = 0
    free_space_ratio: float | None = None  # after VACUUM; None when pgstattuple is unavailable
    invalid_indexes: list[str] = field(default_factory=list)
    vacuum_seconds: float = 0.0

    @property
    def dead_ratio_before(self) -> float:
        total = self.live_tuples + self.dead_tuples_before
        return self.dead_tuples_before / total if total else 0.0

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "dead_ratio_before": round(self.dead_ratio_before, 4)}


def vector_tables(conn: psycopg.Connection) -> list[tuple[str, str, str]]:
    """(collection, model key, heap table) of every vector table; a partitioned table's partitions."""
    found = []
    for coll in catalog.list_collections(conn):
        for model_key, table in tables.collection_tables(conn, coll.name).items():
            leaves = list(tables.partitions(conn, table)) if tables.is_partitioned(conn, table) else [table]
            found += [(coll.name, model_key, leaf) for leaf in leaves]
    return found


def _stats(conn: psycopg.Connection, table: str) -> tuple[int, int, int, int, int]:
    """(live tuples, dead tuples, heap bytes, TOAST bytes, index bytes) of one table."""
    row = conn.execute(
        """
        SELECT coalesce(s.n_live_tup, 0), coalesce(s.n_dead_tup, 0), pg_relation_size(c.oid),
               coalesce(pg_total_relation_size(nullif(c.reltoastrelid, 0)), 0), pg_indexes_size(c.oid)
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid
        WHERE n.nspname = %s AND c.relname = %s
        """,
        (catalog.VECTORS, table),
    ).fetchone()
    return tuple(int(v) for v in row) if row else (0, 0, 0, 0, 0)


def _invalid_indexes(conn: psycopg.Connection, table: str) -> list[str]:
    rows = conn.execute(
        """
        SELECT i.relname FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
        JOIN pg_class c ON c.oid = x.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = %s AND c.relname = %s AND NOT x.indisvalid ORDER BY 1
        """,
        (catalog.VECTORS, table),
    ).fetchall()
    return [r[0] for r in rows]


def has_pgstattuple(conn: psycopg.Connection) -> bool:
    """Create the extension if we may; False (logged once per pass) where we may not."""
    try:
        with conn.transaction():
            conn.execute("CREATE EXTENSION IF NOT EXISTS pgstattuple")
        return True
    except psycopg.Error as err:
        log.warning("pgstattuple is not available (%s): free space is not measured", err.__class__.__name__)
        return False


def _free_space_ratio(conn: psycopg.Connection, table: str) -> float:
    """Free space in the table's pages, from a scan of the pages the visibility map does not vouch for."""
    row = conn.execute(
        "SELECT s.approx_free_percent FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace, "
        "LATERAL pgstattuple_approx(c.oid::regclass) s WHERE n.nspname = %s AND c.relname = %s",
        (catalog.VECTORS, table),
    ).fetchone()
    return round(float(row[0]) / 100, 4)


def _flush_stats(conn: psycopg.Connection) -> None:
    """pg_stat counters are flushed by backends now and then; ask for fresh ones."""
    conn.execute("SELECT pg_stat_force_next_flush()")
    conn.execute("SELECT pg_stat_clear_snapshot()")


def maintain(pool: ConnectionPool, vacuum: bool = True) -> list[TableHealth]:
    """VACUUM (ANALYZE) every vector table, reading its health before and after.

    VACUUM takes a SHARE UPDATE EXCLUSIVE lock: searches and ingest go on meanwhile. A table
    dropped in the meantime (a swap retired it) is skipped."""
    report = []
    with pool.connection() as conn:
        found = vector_tables(conn)
        stattuple = has_pgstattuple(conn)
    for collection, model_key, table in found:
        with pool.connection() as conn:
            if not tables.table_exists(conn, table):
                continue
            _flush_stats(conn)
            live, dead, heap, toast, index = _stats(conn, table)
            health = TableHealth(collection, model_key, table, live_tuples=live, dead_tuples_before=dead)
            if vacuum:
                started = time.perf_counter()
                conn.execute(sql.SQL("VACUUM (ANALYZE) {}").format(tables.table_id(table)))
                health.vacuum_seconds = round(time.perf_counter() - started, 3)
                _flush_stats(conn)
            live, dead, heap, toast, index = _stats(conn, table)
            health.live_tuples = live if vacuum else health.live_tuples
            health.dead_tuples_after, health.table_bytes, health.toast_bytes, health.index_bytes = dead, heap, toast, index
            health.free_space_ratio = _free_space_ratio(conn, table) if stattuple else None
            health.invalid_indexes = _invalid_indexes(conn, table)
        report.append(health)
    return report


def judge(health: TableHealth, limits: Thresholds) -> list[str]:
    """What is wrong with one table, in words; empty when nothing is."""
    problems = [f"{health.table}: invalid index {name} (an interrupted CREATE INDEX CONCURRENTLY)" for name in health.invalid_indexes]
    if health.table_bytes < limits.min_bytes:
        return problems
    if health.dead_ratio_before > limits.max_dead_tuple_ratio:
        problems.append(
            f"{health.table}: {health.dead_ratio_before:.0%} dead tuples before VACUUM (limit {limits.max_dead_tuple_ratio:.0%}): "
            "autovacuum falls behind the writes; lower autovacuum_vacuum_scale_factor for this table"
        )
    if health.free_space_ratio is not None and health.free_space_ratio > limits.max_free_space_ratio:
        problems.append(
            f"{health.table}: {health.free_space_ratio:.0%} of {health.table_bytes / 2**20:.1f} MiB is free space after VACUUM "
            f"(limit {limits.max_free_space_ratio:.0%}): bloated; VACUUM FULL or pg_repack gives it back"
        )
    return problems


def markdown(report: list[TableHealth]) -> str:
    """The figures as a Markdown table (asset metadata shows it in the UI)."""
    lines = [
        "| table | live | dead before | dead after | table MiB | index MiB | free after | invalid indexes |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for h in report:
        free = "unknown" if h.free_space_ratio is None else f"{h.free_space_ratio:.0%}"
        lines.append(
            f"| {h.table} | {h.live_tuples} | {h.dead_tuples_before} ({h.dead_ratio_before:.0%}) | {h.dead_tuples_after} "
            f"| {(h.table_bytes + h.toast_bytes) / 2**20:.2f} | {h.index_bytes / 2**20:.2f} | {free} | {', '.join(h.invalid_indexes) or '-'} |"
        )
    return "\n".join(lines)
