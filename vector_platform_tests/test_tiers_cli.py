"""Tiers as a user drives them: the CLI on a fresh VP_HOME (SIGKILLed mid-move too), the HTTP
API next to the CLI, and the tiering sensor's rules with the clock moved."""

import datetime as dt
import json
import socket
import subprocess
import time
import urllib.error
import urllib.request

import dagster as dg
import pytest

from vector_platform import clock
from vector_platform.defs.tiers.sensors import tiering_sensor
from vector_platform.search import flush_query_log

from .conftest import build_platform, cli, cli_env
from .test_tiers import events, ingested, table_of


@pytest.fixture
def cli_platform(pg_dsn, dagster_instance, tmp_path):
    """A collection ingested (fake embedder) into the database and store the CLI's env points at."""
    env = cli_env(pg_dsn, tmp_path)
    vp = build_platform(pg_dsn, dagster_instance, (tmp_path / "objects").as_uri())
    return vp, ingested(vp, tmp_path, n=120), env


def run_cli(env, *args, check=True):
    done = subprocess.run(cli(*args), env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_cli_moves_rules_and_status(cli_platform, pg_dsn):
    vp, name, env = cli_platform
    run_cli(env, "collections", "rules", name, "--archive-rows-older-than-days", "30")
    done = run_cli(env, "archive-rows", name)  # these documents have no source timestamp: none is old
    assert f"row_archive_job [{name}] ok" in done.stdout and "documents=0" in done.stdout
    assert "check archive_reconciles: passed" in done.stdout
    run_cli(env, "collections", "rules", name, "--archive-rows-older-than-days", "0")
    done = run_cli(env, "tier", name, "cold", "--wait")
    assert "evict_job" in done.stdout and "ok" in done.stdout
    done = run_cli(env, "collections", "rules", name, "--evict-after-days", "7", "--archive-after-days", "30",
                   "--rehydrate-on-query", "--json")
    assert json.loads(done.stdout)["rules"] == {
        "evict_after_days": 7.0, "archive_after_days": 30.0, "rehydrate_on_query": True, "archive_rows_older_than_days": None}
    status = json.loads(run_cli(env, "status", "--json").stdout)
    mine = next(c for c in status["collections"] if c["name"] == name)
    assert mine["tier"] == "cold" and mine["rules"]["evict_after_days"] == 7.0
    assert mine["bytes_object_store"] > 0 and mine["snapshots"][0]["serving"] is True
    assert mine["tier_events"][0]["from"] == "active" and mine["tier_events"][0]["to"] == "cold"
    bad = run_cli(env, "collections", "rules", name, "--evict-after-days", "-3", check=False)
    assert bad.returncode == 2 and "positive number of days" in bad.stderr
    done = run_cli(env, "tier", name, "archived")  # no daemon: runs here, says so
    assert "archive_job" in done.stdout and "no dagster-daemon" in done.stderr
    refused = run_cli(env, "tier", name, "active", "--wait", check=False)
    assert refused.returncode == 2 and "archived is terminal" in refused.stderr and "Traceback" not in refused.stderr


def test_sigkill_in_the_middle_of_an_evict_then_rerun_completes(cli_platform, pg_dsn):
    vp, name, env = cli_platform
    # Killed after the snapshot was verified and receipted, before serving switched.
    killed = run_cli({**env, "VP_FAILPOINT": "evict.after_snapshot"}, "tier", name, "cold", "--wait", check=False)
    assert killed.returncode == -9
    _, exists, _ = table_of(pg_dsn, name)
    assert vp.collection(name).tier == "active" and exists
    assert {h.source_tier for h in vp.search("alpha", [name]).hits} == {"active"}
    done = run_cli(env, "tier", name, "cold", "--wait")
    assert "snapshots_written={'minilm_l6_v2': False}" in done.stdout  # the verified snapshot is reused
    assert vp.collection(name).tier == "cold" and not table_of(pg_dsn, name)[1]

    run_cli(env, "tier", name, "active", "--wait")
    # Killed after serving switched to cold, before the table was dropped.
    killed = run_cli({**env, "VP_FAILPOINT": "evict.after_switch"}, "tier", name, "cold", "--wait", check=False)
    assert killed.returncode == -9
    assert vp.collection(name).tier == "cold" and table_of(pg_dsn, name)[1]
    assert {h.source_tier for h in vp.search("alpha", [name]).hits} == {"cold"}
    done = run_cli(env, "tier", name, "cold", "--wait")
    assert "completed=" in done.stdout and not table_of(pg_dsn, name)[1]
    assert [(e[0], e[1]) for e in events(pg_dsn, name)] == [("active", "cold"), ("cold", "active"), ("active", "cold")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url, body=None, key=None, method=None):
    data = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else body
    request = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"))
    request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("X-API-Key", key)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _post_oversized(url: str, body: bytes, key: str) -> int:
    """POST a body the server refuses by its Content-Length: it may answer (and close) before
    the body is sent, so a broken pipe while sending is expected; the answer is read anyway."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.putrequest("POST", parts.path)
        for name, value in (("Content-Type", "application/json"), ("Content-Length", str(len(body))), ("X-API-Key", key)):
            conn.putheader(name, value)
        conn.endheaders()
        try:
            conn.send(body)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return conn.getresponse().status
    finally:
        conn.close()


def _strip_timings(result):
    out = json.loads(json.dumps(result))
    for tier in out["stats"]["tiers"].values():
        tier.pop("latency_ms")
        tier.pop("data_from", None)
    return out


def test_http_api_answers_what_the_cli_answers_and_needs_its_key(cli_platform, tmp_path):
    vp, name, env = cli_platform
    other = ingested(vp, tmp_path, n=80, tag="o")
    assert vp.tier(other, "cold").success
    port = _free_port()
    key = "s3cret-key"
    server = subprocess.Popen(
        cli("serve", "--port", str(port)), env={**env, "VP_API_KEY": key}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if _request(f"{base}/healthz", key=key)[0] == 200:
                    break
            except OSError:
                time.sleep(0.3)
        assert _request(f"{base}/healthz", key=key) == (200, {"status": "ok"})
        body = {"query": "gamma delta", "collections": [name, other], "k": 7}
        assert _request(f"{base}/search", body)[0] == 401
        assert _request(f"{base}/search", body, key="wrong")[0] == 401
        status, answer = _request(f"{base}/search", body, key=key)
        assert status == 200, answer
        cli_answer = json.loads(run_cli(env, "search", "gamma delta", "--collection", name, "--collection", other, "-k", "7", "--json").stdout)
        assert _strip_timings(answer) == _strip_timings(cli_answer)
        assert {h["source_tier"] for h in answer["hits"]} == {"active", "cold"}
        assert all(("snapshot_id" in h) == (h["source_tier"] == "cold") for h in answer["hits"])
        status, listed = _request(f"{base}/collections", key=key)
        assert status == 200 and {c["name"]: c["tier"] for c in listed["collections"]}[other] == "cold"
        assert _request(f"{base}/search", {**body, "k": 100000}, key=key)[0] == 400
        status, error = _request(f"{base}/search", {**body, "filters": {"a": {"$in": [1]}}}, key=key)
        assert status == 400 and "unsupported filter operator" in error["error"]
        assert _request(f"{base}/search", {**body, "colections": []}, key=key)[0] == 400
        assert _request(f"{base}/search", b"{not json", key=key)[0] == 400
        assert _post_oversized(f"{base}/search", b"[" + b"1," * 600_000 + b"1]", key=key) == 413
        status, vec = _request(f"{base}/search", {"vector": [0.01] * 384, "collections": [name], "k": 3}, key=key)
        assert status == 200 and len(vec["hits"]) == 3
        pinned = {"vector": [0.01] * 384, "collections": [name], "k": 3, "fingerprint": vec["hits"][0]["fingerprint"]}
        status, same = _request(f"{base}/search", pinned, key=key)
        assert status == 200 and [h["chunk_id"] for h in same["hits"]] == [h["chunk_id"] for h in vec["hits"]]
        status, other = _request(f"{base}/search", {**pinned, "fingerprint": "0" * 16}, key=key)
        assert status == 200 and other["hits"] == [] and "refused" in other["warnings"][0]
        assert _request(f"{base}/search", {**pinned, "fingerprint": "minilm"}, key=key)[0] == 400
        status, windowed = _request(f"{base}/search", {**body, "include_archive": True, "since": "2000-01-01"}, key=key)
        assert status == 200 and windowed["hits"] == []  # these documents have no source timestamp: no window holds them
        assert _request(f"{base}/search", {**body, "since": "last week"}, key=key)[0] == 400
        status, doc = _request(f"{base}/collections/{name}/documents/d3", key=key)
        assert status == 200 and doc == json.loads(run_cli(env, "get", name, "d3", "--json").stdout)
        assert doc["source_tier"] == "active" and doc["body"].startswith("d3 ")
        assert _request(f"{base}/collections/{name}/documents/nope", key=key)[0] == 404
        assert _request(f"{base}/collections/no_such_collection/documents/d3", key=key)[0] == 404
        assert run_cli(env, "get", name, "nope", check=False).returncode == 1
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert b"Traceback" not in server.stdout.read()


def test_tiering_sensor_enforces_rules_once_per_state(make_platform, pg_dsn, tmp_path, dagster_instance):
    vp = make_platform()
    name = ingested(vp, tmp_path, n=80)
    other = ingested(vp, tmp_path, n=40, tag="o")  # no rules: never moved
    vp.set_rules(name, evict_after_days=7, archive_after_days=30, rehydrate_on_query=True)
    resources = {"postgres": vp.postgres}

    def tick():
        context = dg.build_sensor_context(instance=dagster_instance, resources=resources)
        result = tiering_sensor(context)
        return [r for r in (result.run_requests or []) if r.partition_key in (name, other)]

    def run(requests):
        for r in requests:
            summary = vp._run(r.job_name, r.partition_key, r.run_config)
            assert summary.success, summary.error

    start = clock.now()
    try:
        clock.set_now(start + dt.timedelta(days=6))
        assert tick() == []
        clock.set_now(start + dt.timedelta(days=8))
        first, second = tick(), tick()
        assert [(r.job_name, r.partition_key) for r in first] == [("evict_job", name)]
        assert [r.run_key for r in first] == [r.run_key for r in second]  # the same state: the same key
        run(first)
        assert vp.collection(name).tier == "cold" and tick() == []
        assert events(pg_dsn, name)[-1][2] == "rule"

        # A query to the cold collection is answered cold and asks for a rehydrate.
        clock.set_now(start + dt.timedelta(days=9))
        result = vp.search("alpha", [name])
        assert result.hits and {h.source_tier for h in result.hits} == {"cold"}
        assert result.stats["rehydrate_requested"] == [name]
        flush_query_log(vp.pool())
        requests = tick()
        assert [(r.job_name, r.partition_key) for r in requests] == [("rehydrate_job", name)]
        run(requests)
        assert vp.collection(name).tier == "active" and tick() == []

        # Idle again: evicted again, then archived after 30 cold days.
        clock.set_now(start + dt.timedelta(days=17))
        run(tick())
        assert vp.collection(name).tier == "cold"
        clock.set_now(start + dt.timedelta(days=50))
        requests = tick()
        assert [(r.job_name, r.partition_key) for r in requests] == [("archive_job", name)]
        run(requests)
        assert vp.collection(name).tier == "archived" and tick() == []
        assert vp.collection(other).tier == "active"
    finally:
        clock.set_now(None)
    assert [(e[0], e[1], e[2]) for e in events(pg_dsn, name)] == [
        ("active", "cold", "rule"), ("cold", "active", "rule"), ("active", "cold", "rule"), ("cold", "archived", "rule"),
    ]
