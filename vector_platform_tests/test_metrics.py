"""Prometheus metrics as an operator scrapes them: over real HTTP from `vector-platform metrics`
and `vector-platform serve` (other processes than the one that ran the ingest), after an
ingest with bad input and searches in two tiers."""

import math
import socket
import subprocess
import time
import urllib.error
import urllib.request

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg_pool import ConnectionPool

from vector_platform.catalog import metrics as metrics_sql
from vector_platform.models import ModelSpec
from vector_platform.telemetry import figures
from vector_platform.telemetry.metrics import QUERY_BUCKETS

from .conftest import cli, cli_env, write_jsonl
from .fault_server import FaultServer

KEY = "metrics-test-key-0123456789"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, key: str | None = None, body: bytes | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, data=body, method="POST" if body else "GET")
    request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


class Server:
    """A `vector-platform` command serving HTTP on 127.0.0.1, stopped on exit."""

    def __init__(self, env, *args):
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(cli(*args, "--port", str(self.port)), env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)

    def __enter__(self) -> "Server":
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.proc.poll() is None, self.proc.stdout.read().decode()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.3)
        raise AssertionError("the server did not start")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.output = self.proc.communicate(timeout=30)[0].decode()


def scrape(base: str, key: str | None = KEY) -> dict[tuple[str, frozenset], float]:
    status, text = _get(f"{base}/metrics", key)
    assert status == 200, text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples, name: str, **labels) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def _source(tmp_path, name: str, n: int, bad: bool) -> str:
    docs = [{"id": f"d{i}", "text": f"document {i} about topic {i % 5} alpha beta gamma"} for i in range(n)]
    if bad:  # a model that answers the wrong dimensions, one that answers NaN
        docs += [{"id": "drift", "text": "a vector of the wrong size POISON_DIMS"}, {"id": "nan", "text": "broken POISON_NAN"}]
    path = write_jsonl(tmp_path / f"{name}.jsonl", docs)
    if bad:  # a line that is not JSON: a source dead letter
        with path.open("a", encoding="utf-8") as f:
            f.write("{not json\n")
    return str(path)


def test_scrapes_show_run_figures_tiers_dead_letters_pools_and_query_latency(make_platform, pg_dsn, tmp_path, unique_name,
                                                                             fake_embedder):
    vp = make_platform()
    hot, cold = unique_name, unique_name + "_c"
    vp.add_collection(hot, _source(tmp_path, hot, 40, bad=True))
    vp.add_collection(cold, _source(tmp_path, cold, 25, bad=False))
    for name in (hot, cold):
        runs = vp.ingest(name)
        assert all(r.success for r in runs), [r.error for r in runs]
    assert vp.tier(cold, "cold").success
    env = {**cli_env(pg_dsn, tmp_path), "VP_API_KEY": KEY}

    # Another process than the one that ran the ingest: what it shows came through the catalog.
    with Server(env, "metrics") as metrics:
        assert _get(f"{metrics.base}/metrics")[0] == 401  # the same key rule as the search API
        assert _get(f"{metrics.base}/metrics", key="wrong")[0] == 401
        samples = scrape(metrics.base)
    assert value(samples, "vp_vectors", collection=hot, tier="active") == 40
    assert value(samples, "vp_storage_bytes", collection=hot, tier="active") > 100_000  # a table and its HNSW index
    assert value(samples, "vp_vectors", collection=cold, tier="cold") == 25
    assert value(samples, "vp_storage_bytes", collection=cold, tier="cold") > 0
    assert value(samples, "vp_vectors", collection=cold, tier="active") is None  # its table is gone
    assert value(samples, "vp_collections", tier="cold") >= 1
    # Run figures: 42 chunks written, 40 vectors loaded, the two bad vectors refused by kind.
    assert value(samples, "vp_ingest_rows_total", collection=hot, model="", stage="chunks") == 42
    assert value(samples, "vp_ingest_rows_total", collection=hot, model="minilm_l6_v2", stage="vector_table") == 40
    commits = value(samples, "vp_ingest_batch_commit_seconds_count", collection=hot, model="minilm_l6_v2", stage="vector_table")
    assert commits >= 1
    assert value(samples, "vp_ingest_batch_commit_seconds_bucket", collection=hot, model="minilm_l6_v2", stage="vector_table",
                 le="+Inf") == commits
    assert value(samples, "vp_embedding_seconds_count", collection=hot, model="minilm_l6_v2") >= 1
    assert value(samples, "vp_embedding_inputs_total", collection=hot, model="minilm_l6_v2") == 42
    assert value(samples, "vp_vector_rejections_total", collection=hot, model="minilm_l6_v2", reason="wrong_dimensions") == 1
    assert value(samples, "vp_vector_rejections_total", collection=hot, model="minilm_l6_v2", reason="non_finite") == 1
    assert value(samples, "vp_vector_rejections_total", collection=cold, model="minilm_l6_v2", reason="wrong_dimensions") is None
    assert value(samples, "vp_dead_letters", collection=hot, stage="source") == 1
    assert value(samples, "vp_dead_letters", collection=hot, stage="embed") == 2
    assert value(samples, "vp_dead_letters_created_total", collection=hot, stage="embed") == 2
    assert value(samples, "vp_catalog_up") == 1
    labels = {"pool": "vector_platform", "database": "vp_test", "user": "postgres"}
    assert value(samples, "vp_db_pool_connections", **labels) >= 1  # the metrics process's own pool
    assert value(samples, "vp_db_pool_requests_total", **labels) >= 1
    assert value(samples, "vp_db_pool_waiting_requests", **labels) == 0
    assert "Traceback" not in metrics.output

    # The search API: latency per tier is measured where the searches run.
    with Server({**env, "VP_METRICS_PUBLIC": "1"}, "serve") as serve:
        body = ('{"vector": [%s], "collections": ["%s", "%s"], "k": 5}' % (",".join(["0.05"] * 384), hot, cold)).encode()
        assert _get(f"{serve.base}/search", body=body)[0] == 401  # VP_METRICS_PUBLIC opens /metrics only
        for _ in range(3):
            status, answer = _get(f"{serve.base}/search", KEY, body)
            assert status == 200, answer
        samples = scrape(serve.base, key=None)
    for tier in ("active", "cold"):
        assert value(samples, "vp_query_seconds_count", tier=tier) == 3
        buckets = [value(samples, "vp_query_seconds_bucket", tier=tier, le=repr(b)) for b in QUERY_BUCKETS]
        assert buckets == sorted(buckets) and value(samples, "vp_query_seconds_bucket", tier=tier, le="+Inf") == 3
        assert 0 < value(samples, "vp_query_seconds_sum", tier=tier) < 30
    assert value(samples, "vp_query_seconds_count", tier="archive") == 0
    assert value(samples, "vp_db_pool_connections", pool="vector_platform_search", database="vp_test", user="postgres") >= 1
    assert value(samples, "vp_vectors", collection=hot, tier="active") == 40  # the catalog's series are here too
    assert "Traceback" not in serve.output


def test_embedding_retries_and_latency_of_an_api_that_throttles(make_platform, pg_dsn, tmp_path, unique_name):
    server = FaultServer(space="random").start()
    try:
        server.faults.rate_429, server.faults.rate_5xx, server.faults.retry_after_ms = 0.3, 0.1, 20
        vp = make_platform()
        model_key = f"api_{unique_name[-6:]}"
        vp.add_model(ModelSpec(model_key, "openai", "fake-small", 384, max_tokens=8191, options={
            "base_url": server.base_url, "max_inputs_per_request": 5, "backoff_base_s": 0.01, "breaker_min_requests": 1000}))
        vp.add_collection(unique_name, _source(tmp_path, unique_name, 60, bad=False), model=model_key)
        runs = vp.ingest(unique_name)
        assert all(r.success for r in runs), [r.error for r in runs]
    finally:
        server.stop()
    retried = runs[1].metadata["embeddings"]["api_retries"]
    assert retried > 0 and server.counters.faults["429"] > 0
    with Server({**cli_env(pg_dsn, tmp_path), "VP_API_KEY": KEY}, "metrics") as metrics:
        samples = scrape(metrics.base)
    assert value(samples, "vp_embedding_retries_total", collection=unique_name, model=model_key) == retried
    assert value(samples, "vp_embedding_inputs_total", collection=unique_name, model=model_key) == 60
    calls = value(samples, "vp_embedding_seconds_count", collection=unique_name, model=model_key)
    assert calls == runs[1].metadata["embeddings"]["embed_calls"]
    assert value(samples, "vp_embedding_seconds_sum", collection=unique_name, model=model_key) > 0


def test_run_figures_of_several_processes_add_up_and_survive_a_failed_flush(pg_dsn, make_platform, unique_name):
    make_platform().pool()  # the catalog is migrated
    name = unique_name
    good = ConnectionPool(pg_dsn, min_size=1, max_size=1, open=True)
    broken = ConnectionPool("postgresql://nobody@/nowhere?host=/nonexistent", open=False)  # never opened: refuses
    try:
        first, second = figures.Recorder(good), figures.Recorder(good)  # two run workers
        first.add(figures.INGEST_ROWS, name, "m", 1000, label="vector_table")
        first.observe(figures.BATCH_COMMIT_SECONDS, name, "m", 0.02, label="vector_table")
        second.add(figures.INGEST_ROWS, name, "m", 500, label="vector_table")
        second.observe(figures.BATCH_COMMIT_SECONDS, name, "m", 3.0, label="vector_table")
        second.observe(figures.BATCH_COMMIT_SECONDS, name, "m", 1000.0, label="vector_table")  # past the last bound
        assert first.flush() and second.flush()
        third = figures.Recorder(broken)  # a worker whose database is away
        third.add(figures.INGEST_ROWS, name, "m", 7, label="vector_table")
        assert third.flush() is False
        third.pool = good  # ... and back: nothing was lost
        assert third.flush()
        with psycopg.connect(pg_dsn) as conn:
            rows = {(r[0], r[3]): r for r in metrics_sql.run_figures(conn) if r[1] == name}
    finally:
        good.close()
    rows_total = rows[("ingest_rows", "vector_table")]
    assert rows_total[4] == 1507
    _, _, _, _, seconds, count, bounds, buckets = rows[("batch_commit_seconds", "vector_table")]
    assert count == 3 and math.isclose(seconds, 1003.02)
    assert list(bounds) == list(figures.COMMIT_BUCKETS) and sum(buckets) == 3 and buckets[-1] == 1
    assert buckets[figures.COMMIT_BUCKETS.index(0.025)] == 1 and buckets[figures.COMMIT_BUCKETS.index(5.0)] == 1


@pytest.mark.parametrize("value_s, bound", [(0.005, 0.005), (0.0051, 0.01), (61, None)])
def test_an_observation_falls_in_the_first_bucket_that_holds_it(value_s, bound):
    rec = figures.Recorder(pool=None)  # never flushed
    rec.observe(figures.BATCH_COMMIT_SECONDS, "c", "m", value_s, label="x")
    (sums,) = rec._pending.values()
    index = figures.COMMIT_BUCKETS.index(bound) if bound is not None else len(figures.COMMIT_BUCKETS)
    assert sums.buckets[index] == 1 and sum(sums.buckets) == 1
