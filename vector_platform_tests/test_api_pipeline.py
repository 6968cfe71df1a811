"""Ingest through an OpenAI-compatible API that misbehaves: poison isolation, dead-letter replay
(by the API, the CLI and the sensor), and a SIGKILL mid-embedding that re-embeds only what is missing."""

import datetime as dt
import os
import signal
import subprocess
import time

import dagster as dg
import psycopg
import pytest

from vector_platform import catalog, clock
from vector_platform.defs.ingest.replay import dead_letter_replay_sensor
from vector_platform.models import ModelSpec
from vector_platform.defs.resources import PostgresResource

from .conftest import cli, cli_env, scifact_docs, write_jsonl
from .fault_server import FaultServer


@pytest.fixture
def server(scifact_texts):
    server = FaultServer(known=scifact_texts[1]).start()
    yield server
    server.stop()


def _spec(server, key, **options):
    return ModelSpec(key, "openai", "all-minilm-l6-v2", 384, max_tokens=8191, options={
        "base_url": server.base_url, "max_inputs_per_request": 50, "timeout_s": 2.0, "backoff_base_s": 0.05,
        "breaker_cooldown_s": 0.5, **options})


def _docs(n):
    return [{"id": d["_id"], "title": d["title"], "text": d["text"]} for d in scifact_docs(n)]


def test_poison_input_is_one_dead_letter_and_replay_resolves_it(make_platform, server, tmp_path, unique_name, pg_dsn):
    vp = make_platform()
    model_key = f"api_{unique_name[-6:]}"
    vp.add_model(_spec(server, model_key))
    docs = _docs(1000)
    docs[421]["text"] = "POISON " + docs[421]["text"]
    vp.add_collection(unique_name, write_jsonl(tmp_path / "d.jsonl", docs), model=model_key)
    server.faults.poison_marker = "POISON"
    server.faults.rate_429 = 0.2
    runs = vp.ingest(unique_name)
    assert all(r.success for r in runs), [r.error for r in runs]
    meta = runs[1].metadata["embeddings"]
    assert meta["dead_lettered"] == 1 and meta["embedded"] == 999
    assert meta["api_requests"] >= 20 and meta["api_throttled_429"] > 0 and meta["api_splits"] >= 1
    assert runs[1].checks["no_chunk_lost"] is True
    status = {c["name"]: c for c in vp.status()["collections"]}[unique_name]
    assert status["vectors"] == 999 and status["dead_letters"] == 1
    with psycopg.connect(pg_dsn) as conn:
        [letter] = catalog.open_dead_letters(conn, unique_name)
    assert letter["stage"] == "embed" and "forbidden token" in letter["error"]

    # The sensor waits for the cool-down, then asks for one replay run per failure batch.
    postgres = PostgresResource(dsn=pg_dsn)
    context = dg.build_sensor_context(instance=vp.instance, resources={"postgres": postgres})
    assert not _run_requests(dead_letter_replay_sensor(context), unique_name)
    clock.set_now(dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1))
    try:
        requests = _run_requests(dead_letter_replay_sensor(context), unique_name)
    finally:
        clock.set_now(None)
    assert [r.partition_key for r in requests] == [f"{unique_name}|{model_key}"]
    assert requests[0].run_key.startswith(f"replay:{unique_name}:{model_key}:")

    server.faults.poison_marker = None  # the server is fixed
    server.counters.reset()
    runs = vp.replay_dead_letters(unique_name)
    assert [r.job for r in runs] == ["dead_letter_replay_job", "serving_view_job"] and all(r.success for r in runs)
    assert server.counters.inputs == 1  # only the dead-lettered chunk went back to the API
    assert runs[0].checks["no_chunk_lost"] is True
    with psycopg.connect(pg_dsn) as conn:
        assert not catalog.open_dead_letters(conn, unique_name)
        resolved = conn.execute(
            "SELECT resolution FROM vector_platform.dead_letters WHERE collection = %s AND resolved_at IS NOT NULL",
            (unique_name,),
        ).fetchall()
    assert resolved == [("embedded on a later run",)]
    assert {c["name"]: c for c in vp.status()["collections"]}[unique_name]["vectors"] == 1000


def test_a_misconfigured_api_fails_the_step_and_dead_letters_nothing(make_platform, server, tmp_path, unique_name, pg_dsn):
    vp = make_platform()
    model_key = f"bad_{unique_name[-6:]}"
    spec = _spec(server, model_key)
    vp.add_model(ModelSpec(model_key, "openai", spec.model_name, 384, max_tokens=8191,
                           options={**spec.options, "base_url": server.base_url.replace("/v1", "/wrong")}))
    vp.add_collection(unique_name, write_jsonl(tmp_path / "d.jsonl", _docs(20)), model=model_key)
    runs = vp.ingest(unique_name)
    assert runs[0].success and not runs[1].success
    assert "404" in runs[1].error and "embedding API refused" in runs[1].error
    with psycopg.connect(pg_dsn) as conn:
        assert catalog.open_dead_letters(conn, unique_name) == []


def _run_requests(result, collection):
    if isinstance(result, dg.SkipReason) or result is None:
        return []
    return [r for r in result if str(r.partition_key).startswith(collection)]


def test_sigkill_during_api_embedding_then_rerun_sends_only_missing_chunks(server, pg_dsn, tmp_path, unique_name):
    env = cli_env(pg_dsn, tmp_path)
    env["OPENAI_API_KEY"] = "test-key"
    model_key = f"api_{unique_name[-6:]}"
    server.faults.latency_s = 0.15
    source = write_jsonl(tmp_path / "d.jsonl", _docs(1000))
    subprocess.run(cli("models", "add", model_key, "--model-name", "all-minilm-l6-v2", "--dims", "384",
                        "--base-url", server.base_url, "--option", "max_inputs_per_request=20",
                        "--option", "pipeline_batch=100", "--option", "max_in_flight=2"), env=env, check=True)
    subprocess.run(cli("collections", "add", unique_name, "--source", str(source), "--model", model_key), env=env, check=True)

    proc = subprocess.Popen(cli("ingest", unique_name, "--quiet"), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    with psycopg.connect(pg_dsn) as conn:
        fingerprint = catalog.get_model(conn, model_key).fingerprint
    cache = tmp_path / "objects" / "embedding_cache" / fingerprint
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if cache.exists() and len(list(cache.glob("*.parquet"))) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    first_run = set(server.counters.texts)
    cached = len(list(cache.glob("*.parquet"))) * 100
    assert 300 <= cached < 1000

    server.counters.reset()
    rerun = subprocess.run(cli("ingest", unique_name, "--quiet"), env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "check no_chunk_lost: passed" in rerun.stdout
    second_run = set(server.counters.texts)
    # Only what was not cached before the kill went to the API again: at most the batch in flight.
    assert len(second_run) <= 1000 - cached + 100
    assert len(second_run | first_run) == 1000
    assert f"from_cache={cached}" in rerun.stdout or f"from_cache={1000 - len(second_run)}" in rerun.stdout
    with psycopg.connect(pg_dsn) as conn:
        table = catalog.vector_table_name(conn, unique_name, model_key)
        rows = conn.execute(f'SELECT count(*), count(DISTINCT chunk_id) FROM vp_vectors."{table}"').fetchone()
    assert rows == (1000, 1000)
