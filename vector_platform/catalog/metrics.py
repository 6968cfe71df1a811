"""The catalog's side of monitoring: the `run_metrics` table (figures runs add up, 0010) and the
read-only queries a Prometheus scrape runs over the catalog.

Each query answers one family of series for every collection at once, reads no vector rows
(row counts come from PostgreSQL's estimates, sizes from its files), and so costs the same
whatever the collections hold. `vector_platform.telemetry` turns the rows
into series.
"""

from __future__ import annotations

from typing import Sequence

import psycopg

from vector_platform import clock
from vector_platform.catalog.schema import VECTORS

_ADD = """
    INSERT INTO vector_platform.run_metrics AS m
        (metric, collection, model_key, label, total, observations, bounds, buckets, updated_at)
    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
    ON CONFLICT (metric, collection, model_key, label) DO UPDATE SET
        -- Bounds changed by a new release: the histogram starts again (a reset rate() copes with).
        total = CASE WHEN m.bounds IS NOT DISTINCT FROM excluded.bounds THEN m.total + excluded.total ELSE excluded.total END,
        observations = CASE WHEN m.bounds IS NOT DISTINCT FROM excluded.bounds
                            THEN m.observations + excluded.observations ELSE excluded.observations END,
        buckets = CASE WHEN m.bounds IS NOT DISTINCT FROM excluded.bounds
                       THEN (SELECT array_agg(a + b ORDER BY i)
                             FROM unnest(m.buckets, excluded.buckets) WITH ORDINALITY AS t (a, b, i))
                       ELSE excluded.buckets END,
        bounds = excluded.bounds,
        updated_at = excluded.updated_at
"""


def add_run_figures(conn: psycopg.Connection, rows: Sequence[tuple]) -> None:
    """Add (metric, collection, model_key, label, total, observations, bounds, buckets) to what
    the table holds: counters and histogram buckets are summed, never replaced."""
    if not rows:
        return
    now = clock.now()
    with conn.cursor() as cur:
        cur.executemany(_ADD, [(*row, now) for row in rows])


def run_figures(conn: psycopg.Connection) -> list[tuple]:
    """Every row: (metric, collection, model_key, label, total, observations, bounds, buckets)."""
    return conn.execute(
        "SELECT metric, collection, model_key, label, total, observations, bounds, buckets "
        "FROM vector_platform.run_metrics ORDER BY metric, collection, model_key, label"
    ).fetchall()


def collections_per_tier(conn: psycopg.Connection) -> list[tuple[str, int]]:
    return conn.execute("SELECT tier, count(*) FROM vector_platform.collections GROUP BY tier ORDER BY tier").fetchall()


# Active collections: every attached model's table (all its partitions) counts in bytes, the
# serving model's in vectors. Rows are PostgreSQL's own count, pg_class.reltuples, which the
# platform refreshes with ANALYZE at the end of every ingest (hnsw_index) and archival pass:
# exact up to ANALYZE's 30,000-row sample, a close estimate above. count(*) would read whole
# tables at every scrape, and n_live_tup overcounts when an ANALYZE meets another backend's
# unflushed inserts. A table never analyzed (reltuples -1) falls back to n_live_tup.
_ACTIVE = """
    WITH tables AS (
        SELECT c.name AS collection, m.model_key = c.serving_model AS serving, t.oid, t.relkind
        FROM vector_platform.collections c
        JOIN vector_platform.collection_models m ON m.collection = c.name
        JOIN pg_namespace n ON n.nspname = %(schema)s
        JOIN pg_class t ON t.relnamespace = n.oid AND t.relname = m.table_name
        WHERE c.tier = 'active'
    ), leaves AS (
        SELECT collection, serving, oid AS relid FROM tables WHERE relkind <> 'p'
        UNION ALL
        SELECT t.collection, t.serving, p.relid FROM tables t, pg_partition_tree(t.oid) p
        WHERE t.relkind = 'p' AND p.isleaf
    )
    SELECT l.collection,
           coalesce(sum(CASE WHEN r.reltuples >= 0 THEN r.reltuples ELSE s.n_live_tup END) FILTER (WHERE l.serving), 0)::bigint,
           coalesce(sum(pg_total_relation_size(l.relid)), 0)::bigint
    FROM leaves l
    JOIN pg_class r ON r.oid = l.relid
    LEFT JOIN pg_stat_all_tables s ON s.relid = l.relid
    GROUP BY l.collection
"""

# Cold collections: the snapshots that serve them (rows of the serving model's, bytes of all).
_COLD = """
    SELECT c.name,
           coalesce(sum(s.rows) FILTER (WHERE m.model_key = c.serving_model), 0)::bigint,
           coalesce(sum(s.bytes), 0)::bigint
    FROM vector_platform.collections c
    JOIN vector_platform.collection_models m ON m.collection = c.name
    JOIN vector_platform.snapshots s ON s.id = m.cold_snapshot_id
    WHERE c.tier = 'cold'
    GROUP BY c.name
"""

# The row archive: receipted files (vectors and documents) of any collection.
_ARCHIVE = """
    SELECT collection, coalesce(sum(rows) FILTER (WHERE kind = 'vectors'), 0)::bigint, coalesce(sum(bytes), 0)::bigint
    FROM vector_platform.archive_files GROUP BY collection
"""


def tier_sizes(conn: psycopg.Connection) -> list[tuple[str, str, int, int]]:
    """(collection, tier, vectors, bytes) where tier is where the vectors live: `active`
    (vector tables and their indexes in Postgres), `cold` (snapshots on the object store) or
    `archive` (the row archive's files). Archived collections hold none."""
    out = []
    for tier, query, params in (("active", _ACTIVE, {"schema": VECTORS}), ("cold", _COLD, None), ("archive", _ARCHIVE, None)):
        out += [(collection, tier, vectors, size) for collection, vectors, size in conn.execute(query, params)]
    return out


def dead_letter_counts(conn: psycopg.Connection) -> list[tuple[str, str, int, int]]:
    """(collection, stage, open, ever created). Dead letters are never deleted, so the second
    is a counter."""
    return conn.execute(
        "SELECT collection, stage, count(*) FILTER (WHERE resolved_at IS NULL), count(*) "
        "FROM vector_platform.dead_letters GROUP BY collection, stage ORDER BY 1, 2"
    ).fetchall()


# HOOK for issue 10's recall monitoring: migration 0008 (on main) adds
# vector_platform.recall_history(collection, model_key, measured_at, recall, ...). Until a
# database has that table this query is skipped and vp_recall has no series.
_LATEST_RECALL = """
    SELECT DISTINCT ON (collection, model_key) collection, model_key, recall
    FROM vector_platform.recall_history
    ORDER BY collection, model_key, measured_at DESC
"""


def latest_recall(conn: psycopg.Connection) -> list[tuple[str, str, float]]:
    """(collection, model_key, recall@10 last measured); empty before recall_history exists."""
    exists = conn.execute("SELECT to_regclass('vector_platform.recall_history') IS NOT NULL").fetchone()[0]
    if not exists:
        return []
    return [(c, m, float(r)) for c, m, r in conn.execute(_LATEST_RECALL)]


def bound_scrape(conn: psycopg.Connection, timeout_ms: int) -> None:
    """Inside a scrape's transaction: a slow catalog fails the scrape's catalog part after
    `timeout_ms` instead of hanging the scraper."""
    conn.execute("SELECT set_config('statement_timeout', %s, true)", (str(timeout_ms),))
