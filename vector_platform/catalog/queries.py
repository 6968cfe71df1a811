"""The query log (`query_stats`): every search, per collection, with its vector for recall checks."""

from __future__ import annotations

import datetime as dt
from typing import Sequence

import numpy as np
import psycopg


def log_queries(conn: psycopg.Connection, entries: Sequence[tuple]) -> None:
    """entries: (collection, model_key, mode, k, latency_ms, hits, query_text, query_vector, queried_at)."""
    with conn.cursor() as cur:
        cur.executemany(
            """
            INSERT INTO vector_platform.query_stats
                (collection, model_key, mode, k, latency_ms, hits, query_text, query_vector, queried_at)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
            """,
            entries,
        )


# The sample of logged_query_vectors: the distinct queries' latest vectors, ranked by md5(key || salt).
# A query's key is its text; a search by vector (no text) is keyed by its vector, so each distinct
# vector is a query of its own (not all of them one NULL text whose latest vector keeps changing).
_SAMPLE = """
    SELECT query_text, query_vector FROM (
        SELECT DISTINCT ON (key) key, query_text, query_vector FROM (
            SELECT coalesce('t:' || query_text, 'v:' || md5(query_vector::text)) AS key, query_text, query_vector, queried_at
            FROM vector_platform.query_stats
            WHERE collection = %(c)s AND model_key = %(m)s AND query_vector IS NOT NULL
              AND (%(since)s::timestamptz IS NULL OR queried_at >= %(since)s)
        ) logged
        ORDER BY key, queried_at DESC
    ) latest
    ORDER BY md5(key || %(salt)s) LIMIT %(n)s
"""


def logged_query_vectors(
    conn: psycopg.Connection, collection: str, model_key: str, limit: int, since: dt.datetime | None = None, salt: str = ""
) -> list[np.ndarray]:
    """A sample of the distinct real queries users asked (since `since`), each with its latest vector.

    The sample is an even spread over the distinct queries (texts; a search by vector alone is
    keyed by its vector), not the first ones in any order: queries are ranked by md5(key ||
    salt), so the same salt draws the same sample (a check is repeatable) and another salt (the
    week, say) draws another."""
    rows = conn.execute(
        "SELECT query_vector FROM (" + _SAMPLE + ") sample", {"c": collection, "m": model_key, "since": since, "salt": salt, "n": limit}
    ).fetchall()
    return [np.asarray(r[0].to_numpy() if hasattr(r[0], "to_numpy") else r[0], np.float32) for r in rows]


def logged_sample_digest(
    conn: psycopg.Connection, collection: str, model_key: str, limit: int, since: dt.datetime | None = None, salt: str = ""
) -> str:
    """Names the sample logged_query_vectors would draw now (its size and an md5 of its texts
    and vectors): a new query logged, or one asked again with another vector, changes it."""
    count, digest = conn.execute(
        "SELECT count(*), md5(coalesce(string_agg(md5(coalesce(query_text, '') || query_vector::text), '' "
        "ORDER BY md5(coalesce(query_text, '') || query_vector::text)), '')) FROM (" + _SAMPLE + ") sample",
        {"c": collection, "m": model_key, "since": since, "salt": salt, "n": limit},
    ).fetchone()
    return f"{count}:{digest}"
