"""The query log (`query_stats`): every search, per collection, with its vector for recall checks."""

from __future__ import annotations

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


def logged_query_vectors(conn: psycopg.Connection, collection: str, model_key: str, limit: int) -> list[np.ndarray]:
    """The most recent distinct real queries' vectors (what users actually ask)."""
    rows = conn.execute(
        """
        SELECT DISTINCT ON (query_text) query_vector FROM vector_platform.query_stats
        WHERE collection = %s AND model_key = %s AND query_vector IS NOT NULL
        ORDER BY query_text, queried_at DESC LIMIT %s
        """,
        (collection, model_key, limit),
    ).fetchall()
    return [np.asarray(r[0].to_numpy() if hasattr(r[0], "to_numpy") else r[0], np.float32) for r in rows]
