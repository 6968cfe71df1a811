"""The query log, written in batches off the request path.

A search appends its entries to memory and returns; a background thread writes them every
`VP_QUERY_LOG_FLUSH_S` seconds (default 1) in one transaction: the `query_stats` rows, each
collection's `last_queried_at`, and the rehydrate requests of cold collections whose rules
ask for one. At most `MAX_PENDING` entries wait (the oldest log rows are dropped beyond, and
counted; last_queried_at and rehydrate requests are never dropped). `flush()` writes now;
it also runs when the process exits.
"""

from __future__ import annotations

import atexit
import datetime as dt
import logging
import os
import threading
from collections import deque
from typing import Callable

import psycopg
from psycopg_pool import ConnectionPool

from vector_platform.catalog import tiers as tier_sql
from vector_platform.catalog.queries import log_queries
from vector_platform.names import storable_text

log = logging.getLogger(__name__)
MAX_PENDING = 10_000
# At exit the database may be gone already (its server stopped first): a short wait for the
# flush lock and a connection, not the pool's, so that a process never hangs on its way out.
EXIT_WAIT_S = 2.0


class QueryLog:
    def __init__(self, pool: Callable[[], ConnectionPool], flush_s: float | None = None):
        self._pool = pool
        self.flush_s = flush_s if flush_s is not None else float(os.environ.get("VP_QUERY_LOG_FLUSH_S", "1.0"))
        self._entries: deque[tuple] = deque()
        self._last_queried: dict[str, dt.datetime] = {}
        self._rehydrate: dict[str, dt.datetime] = {}
        self.dropped = 0
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        atexit.register(self._flush_at_exit)

    def record(self, at: dt.datetime, entries: list[tuple], queried: list[str], rehydrate: list[str]) -> None:
        """entries: (collection, model_key, mode, k, latency_ms, hits, query_text, query_vector), logged at `at`."""
        with self._lock:
            for entry in entries:
                if len(self._entries) >= MAX_PENDING:
                    self._entries.popleft()
                    self.dropped += 1
                text = entry[6]
                if isinstance(text, str):  # what the user typed, as a text column can hold it
                    entry = (*entry[:6], storable_text(text), *entry[7:])
                self._entries.append((*entry, at))
            for name in queried:
                if name not in self._last_queried or self._last_queried[name] < at:
                    self._last_queried[name] = at
            for name in rehydrate:
                self._rehydrate.setdefault(name, at)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="vector_platform query log", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            self._wake.wait(self.flush_s)
            self._wake.clear()
            try:
                self.flush()
            except Exception as err:  # noqa: BLE001 - keep the entries and try again later
                log.warning("query log flush failed (%s); will retry", err)

    def _flush_at_exit(self) -> None:
        try:
            self.flush(wait_s=EXIT_WAIT_S)
        except Exception as err:  # noqa: BLE001 - the database may be gone already
            if self._entries or self._last_queried:
                log.warning("query log: %d entries not written at exit (%s)", len(self._entries), err)

    def flush(self, wait_s: float | None = None) -> None:
        """Write what is pending now. `wait_s`: the longest wait for another flush to finish
        and for a connection (unbounded and the pool's own by default)."""
        if not self._flush_lock.acquire(timeout=-1 if wait_s is None else wait_s):
            raise TimeoutError(f"another flush of the query log was still waiting for the database after {wait_s} s")
        try:
            self._flush(wait_s)
        finally:
            self._flush_lock.release()

    def _flush(self, wait_s: float | None) -> None:
        with self._lock:
            entries, self._entries = list(self._entries), deque()
            queried, self._last_queried = self._last_queried, {}
            rehydrate, self._rehydrate = self._rehydrate, {}
        if not (entries or queried or rehydrate):
            return
        # Bookkeeping the tier rules read first, on its own: a log row the database refuses
        # must not hold back last_queried_at (an idle rule would evict a busy collection).
        try:
            with self._pool().connection(timeout=wait_s) as conn, conn.transaction():
                tier_sql.note_queries(conn, queried, rehydrate)
        except Exception:
            with self._lock:  # put it back for the next attempt
                for name, at in queried.items():
                    self._last_queried[name] = max(at, self._last_queried.get(name, at))
                for name, at in rehydrate.items():
                    self._rehydrate.setdefault(name, at)
                self._entries.extendleft(reversed(entries))
            raise
        if not entries:
            return
        try:
            with self._pool().connection(timeout=wait_s) as conn, conn.transaction():
                log_queries(conn, entries)
        except psycopg.DataError as err:  # a row the database cannot store: drop the batch, say so
            self.dropped += len(entries)
            log.warning("query log: %d entries dropped (%s)", len(entries), err)
        except Exception:
            with self._lock:
                self._entries.extendleft(reversed(entries))
            raise
