"""PostgreSQL advisory locks: one writer per collection (and per collection x model), and
readers of the embedding cache that compaction must not pull files from under.

Writer locks live on a connection of their own, opened for the step and closed after it:
a killed process drops its locks with its connection, and a pooled connection never keeps
one by accident. A writer that has to wait says who it is waiting for, and how long.
"""

from __future__ import annotations

import hashlib
import logging
import time
from contextlib import contextmanager
from typing import Iterator

import psycopg
from psycopg import sql

log = logging.getLogger(__name__)

DEFAULT_WAIT_S = 6 * 3600.0
SAY_EVERY_S = 30.0


class LockTimeout(RuntimeError):
    """A writer waited longer than it was allowed to."""


def lock_key(*parts: str) -> int:
    """A stable signed 64-bit key for a lock name (PostgreSQL's advisory lock space)."""
    digest = hashlib.sha256("\x00".join(("vector_platform", *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def holders(conn: psycopg.Connection, key: int) -> list[str]:
    """Who holds an advisory lock: 'pid N (application name, since T)'."""
    unsigned = key & 0xFFFFFFFFFFFFFFFF
    rows = conn.execute(
        """
        SELECT l.pid, coalesce(a.application_name, ''), a.backend_start
        FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
        WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %s AND l.objid = %s AND l.objsubid = 1
        """,
        (unsigned >> 32, unsigned & 0xFFFFFFFF),
    ).fetchall()
    return [
        f"pid {pid} ({app or 'unnamed'}" + (f", connected {start:%Y-%m-%d %H:%M:%S})" if start else ")")
        for pid, app, start in rows
    ]


def _acquire(conn, key: int, shared: bool, what: str, say, wait_s: float) -> float:
    """Take the lock, waiting in PostgreSQL's queue (fair: a waiting exclusive writer is not
    overtaken by later shared ones), and say every SAY_EVERY_S who holds it."""
    suffix = "_shared" if shared else ""
    try_query = sql.SQL("SELECT {}(%s)").format(sql.Identifier("pg_try_advisory_lock" + suffix))
    wait_query = sql.SQL("SELECT {}(%s)").format(sql.Identifier("pg_advisory_lock" + suffix))
    started = time.monotonic()
    if conn.execute(try_query, (key,)).fetchone()[0]:
        return 0.0
    while True:
        waited = time.monotonic() - started
        who = ", ".join(holders(conn, key)) or "another writer"
        say(f"waiting for {what}: held by {who} (waited {waited:.0f} s)")
        if waited > wait_s:
            raise LockTimeout(f"gave up waiting for {what} after {waited:.0f} s")
        try:
            conn.execute("SELECT set_config('lock_timeout', %s, false)", (f"{int(SAY_EVERY_S * 1000)}ms",))
            conn.execute(wait_query, (key,))
            return time.monotonic() - started
        except psycopg.errors.LockNotAvailable:
            continue
        finally:
            conn.execute("SELECT set_config('lock_timeout', '0', false)")


@contextmanager
def writer_lock(
    dsn: str,
    collection: str,
    model_key: str | None = None,
    say=log.info,
    wait_s: float = DEFAULT_WAIT_S,
) -> Iterator[float]:
    """Hold the writer lock of a collection (model_key None) or of one (collection, model).

    A (collection, model) writer holds the collection's lock shared, so that two models of
    one collection load side by side while a collection-wide writer (source_documents,
    chunks, and later evict, rehydrate, swap) waits for both, and they for it.
    Yields the seconds spent waiting.
    """
    scope = collection if model_key is None else f"{collection}/{model_key}"
    conn = psycopg.connect(dsn, autocommit=True, application_name=f"vector_platform writer {scope}"[:63])
    try:
        waited = _acquire(
            conn, lock_key("collection", collection), model_key is not None, f"the writer lock of collection {collection!r}", say, wait_s
        )
        if model_key is not None:
            waited += _acquire(conn, lock_key("collection_model", collection, model_key), False, f"the writer lock of {scope}", say, wait_s)
        if waited > 1:
            say(f"got the writer lock of {scope} after {waited:.1f} s")
        yield waited
    finally:
        conn.close()  # the server releases every lock of the session


@contextmanager
def cache_readers(conn: psycopg.Connection, fingerprint: str) -> Iterator[None]:
    """Held (shared) by every embedding-cache lookup while it reads files."""
    key = lock_key("embedding_cache", fingerprint)
    conn.execute("SELECT pg_advisory_lock_shared(%s)", (key,))
    try:
        yield
    finally:
        conn.execute("SELECT pg_advisory_unlock_shared(%s)", (key,))


def try_exclusive_cache(conn: psycopg.Connection, fingerprint: str) -> bool:
    """Exclusive hold on a fingerprint's cache, only if no lookup is reading (transaction-scoped)."""
    return conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (lock_key("embedding_cache", fingerprint),)).fetchone()[0]
