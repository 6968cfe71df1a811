"""Prometheus series: what this process measures itself, and what the catalog holds.

Two sources, chosen by where a figure is produced:

- **This process** (`PROCESS`): query latency per tier (`vp_query_seconds`, observed by
  search as it answers), the connection pools' use (`vp_db_pool_*`, read from psycopg_pool's
  `get_stats()` at scrape time) and the standard `process_*`/`python_*` series. Scrape every
  `serve` process: each reports its own requests (sum them with `sum by (le, tier)`).
- **The catalog** (`CatalogCollector`, read at every scrape): figures runs added up in
  `run_metrics` (`telemetry.figures`: rows ingested, batch commit and embedding latency,
  retries, rejected vectors) and the state of every collection (vectors and bytes per tier,
  dead letters, collections per tier, recall). These are the same from any process that
  reaches the database, survive restarts, and include runs on other machines; when several
  processes are scraped, take `max` over them (or scrape one `vector-platform metrics`).

A scrape reads the catalog with a few aggregate queries bounded by
`VP_METRICS_SCRAPE_TIMEOUT_MS` (default 5000); a family that fails is left out, logged, and
`vp_catalog_up` drops to 0 while the others are still served.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, GCCollector, Histogram, PlatformCollector, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool

from vector_platform import db
from vector_platform.catalog import metrics as metrics_sql
from vector_platform.telemetry.figures import FIGURES, Figure

log = logging.getLogger(__name__)

# Upper bounds in seconds of one collection's search in one tier: an HNSW scan takes a
# millisecond or two, a cold or archive scan of a large snapshot seconds.
QUERY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
TIERS = ("active", "cold", "archive")

PROCESS = CollectorRegistry()
QUERY_SECONDS = Histogram(
    "vp_query_seconds",
    "Seconds to search one collection in one tier (active: HNSW or exact in Postgres, cold: the snapshot, archive: "
    "the row archive). histogram_quantile() over the buckets gives p50/p95/p99.",
    ["tier"], buckets=QUERY_BUCKETS, registry=PROCESS,
)
# Every tier's series exists from the start, so rate() sees its first query; looked up once,
# not on every query.
_QUERY_SECONDS_BY_TIER = {tier: QUERY_SECONDS.labels(tier=tier) for tier in TIERS}
ProcessCollector(registry=PROCESS)
PlatformCollector(registry=PROCESS)
GCCollector(registry=PROCESS)


def observe_query(tier: str, seconds: float) -> None:
    _QUERY_SECONDS_BY_TIER[tier].observe(seconds)


class PoolCollector:
    """psycopg_pool's own figures for every pool this process opened. Labels say which pool
    (`vector_platform`, or `vector_platform_search`, which only search borrows), database and
    user; never the host's password-bearing connection string."""

    GAUGES = (
        ("vp_db_pool_connections", "Connections the pool holds now (busy and idle).", "pool_size"),
        ("vp_db_pool_available_connections", "Idle connections ready to lend.", "pool_available"),
        ("vp_db_pool_max_connections", "The most connections the pool may open.", "pool_max"),
        ("vp_db_pool_waiting_requests", "Requests waiting for a connection now (above 0: the pool is exhausted).",
         "requests_waiting"),
    )
    COUNTERS = (
        ("vp_db_pool_requests", "Connections asked of the pool.", "requests_num", 1),
        ("vp_db_pool_queued_requests", "Requests that had to wait for a connection.", "requests_queued", 1),
        ("vp_db_pool_request_wait_seconds", "Seconds requests spent waiting for a connection.", "requests_wait_ms", 1000),
        ("vp_db_pool_request_errors", "Requests that got no connection (a timeout, or the pool closed).", "requests_errors", 1),
    )

    def collect(self) -> Iterator[Metric]:
        labels = ["pool", "database", "user"]
        gauges = {name: GaugeMetricFamily(name, text, labels=labels) for name, text, _ in self.GAUGES}
        counters = {name: CounterMetricFamily(name, text, labels=labels) for name, text, _, _ in self.COUNTERS}
        for pool in db.open_pools():
            stats = pool.get_stats()
            values = _pool_labels(pool)
            for name, _, key in self.GAUGES:
                gauges[name].add_metric(values, stats.get(key, 0))
            for name, _, key, divisor in self.COUNTERS:
                counters[name].add_metric(values, stats.get(key, 0) / divisor)
        yield from gauges.values()
        yield from counters.values()


def _pool_labels(pool: ConnectionPool) -> list[str]:
    params = conninfo_to_dict(pool.conninfo)
    return [pool.name, params.get("dbname", ""), params.get("user", "")]


PROCESS.register(PoolCollector())


class CatalogCollector:
    """Series read from the catalog at each scrape (see the module docstring)."""

    def __init__(self, pool: Callable[[], ConnectionPool], timeout_ms: int | None = None):
        self.pool = pool
        self.timeout_ms = timeout_ms or int(os.environ.get("VP_METRICS_SCRAPE_TIMEOUT_MS", "5000"))

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        found: list[Metric] = []
        failed: list[str] = []
        try:
            with self.pool().connection() as conn:
                for family in (self._run_figures, self._tiers, self._dead_letters, self._recall):
                    name = family.__name__.strip("_")
                    try:
                        with conn.transaction():
                            metrics_sql.bound_scrape(conn, self.timeout_ms)
                            found += list(family(conn))
                    except Exception as err:  # noqa: BLE001 - one family missing beats a failed scrape
                        failed.append(name)
                        log.warning("metrics: %s not read from the catalog (%s: %s)", name, type(err).__name__, err)
        except Exception as err:  # noqa: BLE001 - the database is away: say so in vp_catalog_up
            failed.append("connection")
            log.warning("metrics: the catalog could not be read (%s: %s)", type(err).__name__, err)
        yield from found
        up = GaugeMetricFamily("vp_catalog_up", "1 when the last scrape read every catalog family, else 0 (see the log).")
        up.add_metric([], 0 if failed else 1)
        took = GaugeMetricFamily("vp_catalog_scrape_seconds", "Seconds the last scrape spent reading the catalog.")
        took.add_metric([], time.perf_counter() - started)
        yield up
        yield took

    def _run_figures(self, conn) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for metric, collection, model_key, label, total, observations, bounds, buckets in metrics_sql.run_figures(conn):
            figure = FIGURES.get(metric)
            if figure is None:  # written by another release
                continue
            family = families.get(metric) or families.setdefault(metric, _family(figure))
            values = [collection, model_key] + ([label] if figure.label else [])
            if figure.buckets is None:
                family.add_metric(values, total)
            else:
                family.add_metric(values, _cumulative(bounds, buckets, observations), sum_value=total)
        # Every figure's family is announced even before a run wrote it (dashboards find the name).
        for key, figure in FIGURES.items():
            yield families.get(key) or _family(figure)

    def _tiers(self, conn) -> Iterator[Metric]:
        per_tier = GaugeMetricFamily("vp_collections", "Collections in each tier (active, cold, archived).", labels=["tier"])
        counts = dict(metrics_sql.collections_per_tier(conn))
        for tier in ("active", "cold", "archived"):
            per_tier.add_metric([tier], counts.get(tier, 0))
        vectors = GaugeMetricFamily(
            "vp_vectors",
            "Vectors of the serving model in each tier: active (PostgreSQL's row count, refreshed by ANALYZE after every "
            "ingest; an estimate above 30,000 rows), "
            "cold (rows of the serving snapshot), archive (rows moved to the row archive).",
            labels=["collection", "tier"],
        )
        size = GaugeMetricFamily(
            "vp_storage_bytes",
            "Bytes each collection takes per tier: active (every model's vector table and indexes in Postgres), "
            "cold (its snapshots on the object store), archive (its row-archive files).",
            labels=["collection", "tier"],
        )
        for collection, tier, rows, nbytes in metrics_sql.tier_sizes(conn):
            vectors.add_metric([collection, tier], rows)
            size.add_metric([collection, tier], nbytes)
        yield from (per_tier, vectors, size)

    def _dead_letters(self, conn) -> Iterator[Metric]:
        open_now = GaugeMetricFamily(
            "vp_dead_letters", "Open dead letters (inputs that became no vector, with the reason) by stage: source, chunk, embed.",
            labels=["collection", "stage"],
        )
        created = CounterMetricFamily(
            "vp_dead_letters_created", "Dead letters ever written, resolved ones included.", labels=["collection", "stage"]
        )
        for collection, stage, still_open, ever in metrics_sql.dead_letter_counts(conn):
            open_now.add_metric([collection, stage], still_open)
            created.add_metric([collection, stage], ever)
        yield from (open_now, created)

    def _recall(self, conn) -> Iterator[Metric]:
        recall = GaugeMetricFamily(
            "vp_recall", "Recall@10 of the collection's HNSW index against exact search, as last measured.",
            labels=["collection", "model"],
        )
        for collection, model_key, value in metrics_sql.latest_recall(conn):
            recall.add_metric([collection, model_key], value)
        yield recall


def _family(figure: Figure) -> Metric:
    labels = ["collection", "model"] + ([figure.label] if figure.label else [])
    if figure.buckets is None:
        return CounterMetricFamily(figure.name, figure.help, labels=labels)
    return HistogramMetricFamily(figure.name, figure.help, labels=labels)


def _cumulative(bounds, buckets, observations: int) -> list[tuple[str, float]]:
    """Stored per-bucket counts as Prometheus wants them: cumulative, ending with +Inf = count."""
    out, running = [], 0
    for bound, count in zip(bounds or (), buckets or ()):
        running += count
        out.append((_le(bound), running))
    out.append(("+Inf", observations))
    return out


def _le(bound: float) -> str:
    return repr(float(bound))


class _Delegate:
    """Hands another registry's series to a registry of its own (one per app)."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        return self.registry.collect()


def registry(pool: Callable[[], ConnectionPool]) -> CollectorRegistry:
    """What an HTTP /metrics serves: the catalog's series, then this process's (read second, so
    the pool the catalog read opened is in them from the first scrape on)."""
    combined = CollectorRegistry(auto_describe=False)
    combined.register(CatalogCollector(pool))
    combined.register(_Delegate(PROCESS))
    return combined


def exposition(registry_: CollectorRegistry, accept: str | None = None) -> tuple[bytes, str]:
    """(body, content type) in the format the scraper asked for: Prometheus text, or OpenMetrics."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry_), content_type

