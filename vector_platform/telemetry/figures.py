"""Figures that runs produce, added up in memory and written to the catalog every few seconds.

Ingest steps run in Dagster run workers (another process, maybe another machine), so their
counters cannot live in the memory of the process Prometheus scrapes. Each step records into
the `Recorder` of its database instead: a dict update per batch, nothing more. Every
`VP_METRICS_FLUSH_S` seconds (default 10), at the end of a step and when the process exits,
what was recorded is added to `vector_platform.run_metrics` in one short transaction; a
scrape of any process reads the sums from there (`telemetry.metrics.CatalogCollector`).

A killed run loses at most the figures of its last interval; the catalog rows it wrote
stay, so counters never go back. A flush that fails (the database is away) keeps the
figures for the next one and never fails the step.
"""

from __future__ import annotations

import atexit
import bisect
import logging
import os
import threading
import time
from dataclasses import dataclass

from psycopg_pool import ConnectionPool

from vector_platform.catalog import metrics as metrics_sql

log = logging.getLogger(__name__)

# Upper bounds in seconds. One COPY batch of up to 20,000 rows, or one chunking batch.
COMMIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# One embedding call of a pipeline batch (64 texts on the local model, thousands through an API).
EMBEDDING_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


@dataclass(frozen=True)
class Figure:
    """One family of series runs produce. A histogram when it has `buckets`, else a counter.
    Labels: collection, model and, when `label` is set, one more of that name."""

    key: str  # its rows' `metric` in vector_platform.run_metrics
    name: str  # the Prometheus family (counters get _total on exposition)
    help: str
    label: str | None = None
    buckets: tuple[float, ...] | None = None


INGEST_ROWS = Figure(
    "ingest_rows", "vp_ingest_rows",
    "Rows ingest wrote: stage=chunks (chunks of changed documents), stage=vector_table (vectors loaded). rate() gives rows/s.",
    label="stage")
BATCH_COMMIT_SECONDS = Figure(
    "batch_commit_seconds", "vp_ingest_batch_commit_seconds",
    "Seconds to write and commit one ingest batch in its own transaction (stage=chunks or vector_table).",
    label="stage", buckets=COMMIT_BUCKETS)
EMBEDDING_SECONDS = Figure(
    "embedding_seconds", "vp_embedding_seconds",
    "Seconds one embedding call took for a pipeline batch (retries and throttling included).",
    buckets=EMBEDDING_BUCKETS)
EMBEDDING_INPUTS = Figure("embedding_inputs", "vp_embedding_inputs", "Texts sent to the embedding model.")
EMBEDDING_RETRIES = Figure(
    "embedding_retries", "vp_embedding_retries",
    "Embedding API requests sent again after a 429, a 5xx, a timeout, a dropped connection or a malformed answer.")
VECTOR_REJECTIONS = Figure(
    "vector_rejections", "vp_vector_rejections",
    "Vectors the gate refused before any table (dimension drift and broken models): reason=wrong_dimensions, "
    "non_finite, zero_vector or not_numeric. Each one is also an embed dead letter.",
    label="reason")

FIGURES = {f.key: f for f in (INGEST_ROWS, BATCH_COMMIT_SECONDS, EMBEDDING_SECONDS, EMBEDDING_INPUTS, EMBEDDING_RETRIES,
                              VECTOR_REJECTIONS)}


class _Sums:
    """What one label set recorded since the last flush."""

    __slots__ = ("total", "count", "buckets")

    def __init__(self, figure: Figure):
        self.total = 0.0
        self.count = 0
        self.buckets = [0] * (len(figure.buckets) + 1) if figure.buckets else None

    def merge(self, other: "_Sums") -> None:
        self.total += other.total
        self.count += other.count
        if self.buckets is not None and other.buckets is not None:
            self.buckets = [a + b for a, b in zip(self.buckets, other.buckets)]


Key = tuple[str, str, str, str]  # figure key, collection, model key, label value


class Recorder:
    """The figures of one database recorded in this process and not yet written."""

    def __init__(self, pool: ConnectionPool, flush_s: float | None = None):
        self.pool = pool
        self.flush_s = flush_s if flush_s is not None else float(os.environ.get("VP_METRICS_FLUSH_S", "10"))
        self._pending: dict[Key, _Sums] = {}
        self._lock = threading.Lock()
        self._flushed_at = time.monotonic()

    def add(self, figure: Figure, collection: str, model_key: str = "", value: float = 1, label: str = "") -> None:
        """Count `value` more on a counter (0 too: the series then exists before its first event,
        so increase() sees that event)."""
        with self._lock:
            self._sums(figure, collection, model_key, label).total += value

    def observe(self, figure: Figure, collection: str, model_key: str, value: float, label: str = "") -> None:
        """One observation of a histogram (seconds)."""
        with self._lock:
            sums = self._sums(figure, collection, model_key, label)
            sums.total += value
            sums.count += 1
            sums.buckets[bisect.bisect_left(figure.buckets, value)] += 1

    def _sums(self, figure: Figure, collection: str, model_key: str, label: str) -> _Sums:
        """The running sums of one label set (the caller holds the lock)."""
        key = (figure.key, collection, model_key or "", label)
        sums = self._pending.get(key)
        if sums is None:
            sums = self._pending[key] = _Sums(figure)
        return sums

    def flush_if_due(self) -> None:
        if time.monotonic() - self._flushed_at >= self.flush_s:
            self.flush()

    def flush(self, wait_s: float | None = None) -> bool:
        """Add what was recorded to the catalog. False (figures kept) when the database refused.
        `wait_s`: the longest wait for a connection (the pool's own by default)."""
        with self._lock:
            pending, self._pending = self._pending, {}
            self._flushed_at = time.monotonic()
        if not pending:
            return True
        rows = []
        # In key order: two workers adding the same rows lock them in the same order (no deadlock).
        for (key, collection, model_key, label), sums in sorted(pending.items(), key=lambda item: item[0]):
            bounds = list(FIGURES[key].buckets) if FIGURES[key].buckets else None
            rows.append((key, collection, model_key, label, sums.total, sums.count, bounds, sums.buckets))
        try:
            with self.pool.connection(timeout=wait_s) as conn, conn.transaction():
                metrics_sql.add_run_figures(conn, rows)
            return True
        except Exception as err:  # noqa: BLE001 - figures are worth keeping, never worth failing a step
            with self._lock:
                for key, sums in pending.items():
                    self._pending.setdefault(key, _Sums(FIGURES[key[0]])).merge(sums)
            log.warning("run figures not written yet (%s: %s); kept for the next flush", type(err).__name__, err)
            return False


_recorders: dict[str, Recorder] = {}
_recorders_lock = threading.Lock()


def recorder(pool: ConnectionPool) -> Recorder:
    """The process's recorder for the database behind `pool` (one per connection string; it
    flushes through the pool it was last handed, as pools closed by `db.close_pools` are
    replaced)."""
    with _recorders_lock:
        rec = _recorders.get(pool.conninfo)
        if rec is None:
            rec = _recorders[pool.conninfo] = Recorder(pool)
        rec.pool = pool
        return rec


# At exit the database may be gone already (its server stopped first): a short wait for a
# connection, not the pool's, so that a process never hangs on its way out.
EXIT_WAIT_S = 2.0


@atexit.register
def flush_all() -> None:
    """Write every recorder's figures (at exit: what the last interval of a run recorded)."""
    with _recorders_lock:
        recorders = list(_recorders.values())
    for rec in recorders:
        if not rec.pool.closed:
            rec.flush(wait_s=EXIT_WAIT_S)
