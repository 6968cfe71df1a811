"""The active tier: nearest neighbours in a pgvector table or serving view.

ANN mode forces the HNSW index (after ANALYZE the planner prefers an exact sort on small
tables) and exact mode forbids it; every planner knob is set on every call, transaction-
local, with `prepare=False` (a prepared plan would ignore the settings). HNSW returns at most
`hnsw.ef_search` rows per scan, so ef_search is raised to k; filtered queries use pgvector's
iterative scan, which keeps walking the graph until k rows pass the filter.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import numpy as np
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from vector_platform.models import ModelSpec
from vector_platform import tables
from vector_platform.tables import PARTITION_KEY, operator

# pgvector's upper bound for hnsw.ef_search, hence for k.
MAX_K = 1000
# Binary storage: candidates taken from the index of signs per result, then ranked at full
# precision (a collection's `rerank_factor` setting; see `nearest`). Signs keep little of a
# small model's vectors: on SciFact with all-MiniLM-L6-v2 (384 d), recall@10 against exact
# search is 0.59 with no re-rank, 0.95 at 10, 0.977 at 20, 0.988 at 30, 0.994 at 40; wider
# models need fewer (bench/scale_out.py).
DEFAULT_RERANK_FACTOR = 30
# Rows an iterative scan may visit before it stops (pgvector's default is 20,000).
MAX_SCAN_TUPLES = 100_000


def plan_settings(exact: bool, ef_search: int, iterative: bool) -> dict[str, str]:
    """Every planner knob search depends on."""
    return {
        "enable_seqscan": "on" if exact else "off",
        "enable_indexscan": "off" if exact else "on",
        "enable_bitmapscan": "off" if exact else "on",
        "hnsw.ef_search": str(int(ef_search)),
        "hnsw.iterative_scan": "relaxed_order" if iterative and not exact else "off",
        "hnsw.max_scan_tuples": str(MAX_SCAN_TUPLES),
    }


def _set(conn: psycopg.Connection, settings: dict[str, str], local: bool) -> None:
    """All settings in one statement (one round trip)."""
    calls = sql.SQL(", ").join(
        sql.SQL("set_config({}, {}, {})").format(sql.Literal(name), sql.Literal(value), sql.Literal(local))
        for name, value in settings.items()
    )
    conn.execute(sql.SQL("SELECT {}").format(calls), prepare=False)


def _apply_settings(conn: psycopg.Connection, settings: dict[str, str], session: dict[str, str] | None) -> None:
    """Transaction-local settings on a shared connection; on a search-only connection, session
    settings sent only when they differ from what the connection already has (`session`)."""
    if session is None:
        _set(conn, settings, local=True)
        return
    changed = {name: value for name, value in settings.items() if session.get(name) != value}
    if changed:
        _set(conn, changed, local=False)
        session.update(changed)


_queries: dict[tuple, str] = {}

# What a search hit needs; the chunk id as text (uuid objects cost more to make than the
# rest of a hit, and a hit carries the id as a string anyway).
DEFAULT_COLUMNS = sql.SQL("chunk_id::text, doc_id, text, metadata")


def _order_by(spec: ModelSpec, exact: bool) -> sql.Composable:
    """The ORDER BY expression. ANN on a model indexed through an expression (a halfvec cast
    of a vector model over 2,000 dimensions, the signs of a binary one) must repeat the
    index's expression exactly, or the planner cannot use the index; exact search ranks at
    full precision."""
    if exact or spec.index_type == spec.heap_type:
        return sql.SQL("embedding {op} %(q)s::{vtype}").format(op=operator(spec), vtype=sql.SQL(spec.heap_type))
    if spec.index_type == "bit":
        return sql.SQL("{indexed} <~> binary_quantize(%(q)s::vector)").format(indexed=tables.indexed_expression(spec))
    cast = sql.SQL("{}({})").format(sql.SQL(spec.index_type), sql.Literal(spec.dims))
    return sql.SQL("embedding::{cast} {op} %(q)s::{cast}").format(cast=cast, op=operator(spec))


# The same window twice: on source_ts, and on a month-partitioned table's partition key (see
# `tables.PARTITION_KEY`; equal for every dated row, false both ways for undated ones), which
# lets PostgreSQL skip the partitions outside the window.
TIME_CONDITION = sql.SQL(
    "source_ts >= coalesce(%(since)s::timestamptz, '-infinity') AND source_ts < coalesce(%(until)s::timestamptz, 'infinity')"
    " AND " + PARTITION_KEY + " >= coalesce(%(since)s::timestamptz, '-infinity')"
    " AND " + PARTITION_KEY + " < coalesce(%(until)s::timestamptz, 'infinity')"
)


def _nearest_query(
    conn, relation: sql.Composable, spec: ModelSpec, filtered: bool, columns: sql.Composable | None, exact: bool,
    pinned: bool = False, timed: bool = False,
) -> str:
    """The SELECT, composed once per shape (composing costs as much as a tenth of a query).
    The distance returned is always the full-precision one, as exact search and the cold
    tier compute it."""
    expression_index = spec.index_type != spec.heap_type
    key = (repr(relation), repr(columns), spec.distance, spec.storage_type, spec.dims if expression_index else 0,
           exact if expression_index else None, filtered, pinned, timed)
    query = _queries.get(key)
    if query is None:
        # A pinned search reads the view's fingerprint column and `nearest` keeps the rows that
        # carry the pin: as a WHERE condition it cost a tenth of a query in planning.
        conditions = ([sql.SQL("metadata @> %(filters)s")] if filtered else []) + ([TIME_CONDITION] if timed else [])
        where = sql.SQL("WHERE ") + sql.SQL(" AND ").join(conditions) if conditions else sql.SQL("")
        reranked = spec.reranked and not exact
        query = sql.SQL(
            "SELECT {columns}, embedding {op} %(q)s::{vtype} AS distance FROM {rel} {where} "
            "ORDER BY {order} LIMIT {limit}"
        ).format(
            columns=sql.SQL(", ").join([columns or DEFAULT_COLUMNS, *([sql.SQL("fingerprint")] if pinned else [])]),
            op=operator(spec),
            vtype=sql.SQL(spec.heap_type), rel=relation, where=where, order=_order_by(spec, exact),
            limit=sql.SQL("%(candidates)s" if reranked else "%(k)s"),
        )
        if reranked:
            # the index's nearest signs, then the k nearest of those at full precision
            query = sql.SQL("SELECT * FROM ({}) candidates ORDER BY distance LIMIT %(k)s").format(query)
        query = query.as_string(conn)
        _queries[key] = query
    return query


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
    session: dict[str, str] | None = None,
    fingerprint: str | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    rerank_factor: int = DEFAULT_RERANK_FACTOR,
) -> list[tuple]:
    """Top-k rows by the model's distance; each row ends with the distance.

    `rerank_factor`: on a binary-stored model, an ANN search takes this many times k
    candidates from the index of signs (hamming distance) and returns the k nearest of them
    by the full-precision distance; ef_search is raised to the candidates' number.

    `fingerprint`: on a serving view, only rows of vectors with this fingerprint (the view
    holds one model's table, so this is all rows or none: a view swapped to another model
    since the query was embedded answers nothing rather than something wrong). Read as a
    column and compared here, not in the WHERE clause.

    `session`: the settings a search-only connection already holds (see `_apply_settings`);
    None on a shared connection, where settings last one transaction.

    `since` / `until`: only rows whose source timestamp is in [since, until).
    """
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k must be between 1 and {MAX_K}, got {k}")
    timed = since is not None or until is not None
    query = _nearest_query(conn, relation, spec, bool(filters), columns, exact, pinned=fingerprint is not None, timed=timed)
    params = {"q": np.asarray(vector, dtype=np.float32), "k": k, "fingerprint": fingerprint, "since": since, "until": until}
    if filters:
        params["filters"] = Jsonb(filters)
    wanted = k
    if spec.reranked and not exact:
        wanted = params["candidates"] = min(MAX_K, max(k, rerank_factor * k))
    settings = plan_settings(exact, max(ef_search, wanted), iterative=bool(filters) or timed)
    try:
        if session is not None:
            _apply_settings(conn, settings, session)
            rows = conn.execute(query, params, prepare=False).fetchall()
        else:
            with conn.transaction():
                _apply_settings(conn, settings, None)
                rows = conn.execute(query, params, prepare=False).fetchall()
    except psycopg.errors.DataException:
        if fingerprint is None:
            raise
        # "different vector dimensions": the view was swapped to a model of another size since
        # the query was embedded; none of its rows carries the pin
        return []
    if fingerprint is not None:
        rows = [(*r[:-2], r[-1]) for r in rows if r[-2] == fingerprint]
    if not exact and not spec.reranked and (filters or timed or spec.index_type != spec.heap_type):
        # relaxed order may return rows slightly out of order, and a halfvec index orders by
        # the rounded distance: order by the full-precision distance returned (a re-ranked
        # query already did)
        rows.sort(key=lambda r: r[-1])
    return rows


def view_fingerprint(conn: psycopg.Connection, relation: sql.Composable) -> str | None:
    """The fingerprint of the vectors a serving view holds (None when it is empty)."""
    row = conn.execute(sql.SQL("SELECT fingerprint FROM {} LIMIT 1").format(relation), prepare=False).fetchone()
    return row[0] if row else None


def count_matching(
    conn: psycopg.Connection, relation: sql.Composable, filters: dict[str, Any] | None, up_to: int,
    since: dt.datetime | None = None, until: dt.datetime | None = None,
) -> int:
    """How many rows match the filters (and time range), counting no further than `up_to`."""
    conditions = ([sql.SQL("metadata @> %(filters)s")] if filters else []) + (
        [TIME_CONDITION] if since is not None or until is not None else []
    )
    where = sql.SQL("WHERE ") + sql.SQL(" AND ").join(conditions) if conditions else sql.SQL("")
    query = sql.SQL("SELECT count(*) FROM (SELECT 1 FROM {rel} {where} LIMIT %(n)s) s").format(rel=relation, where=where)
    params = {"filters": Jsonb(filters or {}), "n": up_to, "since": since, "until": until}
    return conn.execute(query, params, prepare=False).fetchone()[0]


def explain_nearest(
    conn: psycopg.Connection, relation: sql.Composable, spec: ModelSpec, vector: np.ndarray, exact: bool,
    ef_search: int = 100, fingerprint: str | None = None,
) -> str:
    """The plan `nearest` really runs (for check metadata and tests)."""
    query = "EXPLAIN " + _nearest_query(conn, relation, spec, False, sql.SQL("chunk_id"), exact, fingerprint is not None)
    params = {"q": np.asarray(vector, dtype=np.float32), "k": 10, "fingerprint": fingerprint,
              "candidates": 10 * DEFAULT_RERANK_FACTOR}
    if spec.reranked and not exact:
        ef_search = max(ef_search, params["candidates"])
    with conn.transaction():
        _apply_settings(conn, plan_settings(exact, ef_search, iterative=False), None)
        plan = conn.execute(query, params, prepare=False).fetchall()
    return "\n".join(r[0] for r in plan)
