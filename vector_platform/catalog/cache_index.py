"""The embedding cache's index: which Parquet file (and row) of which object store holds the
vector of each (model fingerprint, content hash), and the files with their retirement.

Every function takes the store's URL first: one database can serve several stores (a
staging and a production bucket, a test's temporary folder) without mixing their files."""

from __future__ import annotations

from typing import Sequence

import psycopg

from vector_platform import clock


def add_file(conn: psycopg.Connection, store: str, fingerprint: str, file_key: str, hashes: Sequence[str], size: int) -> int:
    """Register a written file and point its hashes at it (hashes already cached keep their file)."""
    add_file_row(conn, store, fingerprint, file_key, len(hashes), size)
    return conn.execute(
        """
        INSERT INTO vector_platform.embedding_cache (store, fingerprint, content_hash, file_key, row_index)
        SELECT %s, %s, h, %s, (i - 1)::int FROM unnest(%s::text[]) WITH ORDINALITY AS u(h, i)
        ON CONFLICT (store, fingerprint, content_hash) DO NOTHING
        """,
        (store, fingerprint, file_key, list(hashes)),
    ).rowcount


def add_file_row(conn: psycopg.Connection, store: str, fingerprint: str, file_key: str, rows: int, size: int) -> None:
    conn.execute(
        "INSERT INTO vector_platform.embedding_cache_files (store, file_key, fingerprint, rows, bytes, created_at) "
        "VALUES (%s, %s, %s, %s, %s, %s)",
        (store, file_key, fingerprint, rows, size, clock.now()),
    )


def cached(conn: psycopg.Connection, store: str, fingerprint: str, hashes: Sequence[str]) -> set[str]:
    rows = conn.execute(
        "SELECT content_hash FROM vector_platform.embedding_cache "
        "WHERE store = %s AND fingerprint = %s AND content_hash = ANY(%s)",
        (store, fingerprint, list(hashes)),
    )
    return {r[0] for r in rows}


def locate(conn: psycopg.Connection, store: str, fingerprint: str, hashes: Sequence[str]) -> list[tuple[str, str, int]]:
    """(content_hash, file_key, row_index) of those hashes that are cached, by file and row."""
    return conn.execute(
        """
        SELECT content_hash, file_key, row_index FROM vector_platform.embedding_cache
        WHERE store = %s AND fingerprint = %s AND content_hash = ANY(%s) ORDER BY file_key, row_index
        """,
        (store, fingerprint, list(hashes)),
    ).fetchall()


def live_files(conn: psycopg.Connection, store: str, fingerprint: str) -> list[tuple[str, int, int]]:
    """(file_key, rows still pointing at it, rows written) of the fingerprint's live files, oldest first."""
    return conn.execute(
        """
        SELECT f.file_key, (SELECT count(*) FROM vector_platform.embedding_cache e
                            WHERE e.store = f.store AND e.file_key = f.file_key), f.rows
        FROM vector_platform.embedding_cache_files f
        WHERE f.store = %s AND f.fingerprint = %s AND f.retired_at IS NULL ORDER BY f.created_at, f.file_key
        """,
        (store, fingerprint),
    ).fetchall()


def entries_of(conn: psycopg.Connection, store: str, file_key: str) -> list[tuple[str, int]]:
    return conn.execute(
        "SELECT content_hash, row_index FROM vector_platform.embedding_cache WHERE store = %s AND file_key = %s ORDER BY row_index",
        (store, file_key),
    ).fetchall()


def repoint(conn: psycopg.Connection, store: str, fingerprint: str, moves: Sequence[tuple[str, str, int]]) -> None:
    """moves: (content_hash, new file_key, new row_index)."""
    conn.execute(
        """
        UPDATE vector_platform.embedding_cache e SET file_key = u.f, row_index = u.r
        FROM unnest(%s::text[], %s::text[], %s::int[]) AS u(h, f, r)
        WHERE e.store = %s AND e.fingerprint = %s AND e.content_hash = u.h
        """,
        ([m[0] for m in moves], [m[1] for m in moves], [m[2] for m in moves], store, fingerprint),
    )


def retire(conn: psycopg.Connection, store: str, file_keys: Sequence[str]) -> None:
    conn.execute(
        "UPDATE vector_platform.embedding_cache_files SET retired_at = %s "
        "WHERE store = %s AND file_key = ANY(%s) AND retired_at IS NULL",
        (clock.now(), store, list(file_keys)),
    )


def retired_files(conn: psycopg.Connection, store: str, fingerprint: str) -> list[str]:
    """Retired files that no index row points at any more (safe to delete once readers are done)."""
    return [
        r[0]
        for r in conn.execute(
            """
            SELECT f.file_key FROM vector_platform.embedding_cache_files f
            WHERE f.store = %s AND f.fingerprint = %s AND f.retired_at IS NOT NULL
              AND NOT EXISTS (SELECT 1 FROM vector_platform.embedding_cache e
                              WHERE e.store = f.store AND e.file_key = f.file_key)
            """,
            (store, fingerprint),
        )
    ]


def forget_files(conn: psycopg.Connection, store: str, file_keys: Sequence[str]) -> None:
    conn.execute(
        "DELETE FROM vector_platform.embedding_cache_files WHERE store = %s AND file_key = ANY(%s)", (store, list(file_keys))
    )


def forget_missing_file(conn: psycopg.Connection, store: str, file_key: str) -> int:
    """A file gone from the store (deleted by hand, a lost bucket): its vectors are no longer cached."""
    removed = conn.execute(
        "DELETE FROM vector_platform.embedding_cache WHERE store = %s AND file_key = %s", (store, file_key)
    ).rowcount
    conn.execute(
        "UPDATE vector_platform.embedding_cache_files SET retired_at = coalesce(retired_at, %s) WHERE store = %s AND file_key = %s",
        (clock.now(), store, file_key),
    )
    return removed


def count(conn: psycopg.Connection, store: str, fingerprint: str) -> int:
    return conn.execute(
        "SELECT count(*) FROM vector_platform.embedding_cache WHERE store = %s AND fingerprint = %s", (store, fingerprint)
    ).fetchone()[0]


def total_bytes(conn: psycopg.Connection, store: str, fingerprint: str) -> int:
    return conn.execute(
        "SELECT coalesce(sum(bytes), 0) FROM vector_platform.embedding_cache_files "
        "WHERE store = %s AND fingerprint = %s AND retired_at IS NULL",
        (store, fingerprint),
    ).fetchone()[0]
