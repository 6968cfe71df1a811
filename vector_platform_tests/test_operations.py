"""Operations: the maintenance and recall schedules, the health check on a bloated table, the
storage overview, the audit log (CLI and HTTP)."""

from __future__ import annotations

import datetime as dt
import json
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid

import dagster as dg
import psycopg
import pytest
from psycopg import sql

from vector_platform import audit, catalog, clock
from vector_platform.defs.operations.schedules import maintenance_schedule, recall_monitoring_schedule
from vector_platform.defs.resources import PostgresResource
from vector_platform.search import flush_query_log

from .conftest import build_platform, cli, cli_env, write_jsonl

WORDS = "fern moss lichen spore frond rhizome canopy understory humus mycelium bract sepal".split()


def _docs(n: int, tag: str) -> list[dict]:
    return [{"id": f"{tag}{i}", "text": f"{tag} note {i}: " + " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(12 + i % 9))}
            for i in range(n)]


@pytest.fixture
def own_database(pg_server):
    """A database of its own: the maintenance pass and the schedules see every collection of
    their database, so these tests know exactly what is in it."""
    name = f"ops_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_server.get_uri(), autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return pg_server.get_uri(database=name)


@pytest.fixture
def ops_platform(own_database, dagster_instance, tmp_path):
    return build_platform(own_database, dagster_instance, (tmp_path / "objects").as_uri())


def _ingested(vp, tmp_path, name: str, n: int) -> str:
    vp.add_collection(name, source=write_jsonl(tmp_path / f"{name}.jsonl", _docs(n, name[-4:])))
    assert all(run.success for run in vp.ingest(name))
    return name


def _table(vp, name: str) -> str:
    with vp.pool().connection() as conn:
        return catalog.vector_table_name(conn, name, vp.collection(name).serving_model)


def test_maintenance_check_fails_on_a_bloated_table_and_passes_once_it_is_rewritten(ops_platform, tmp_path, unique_name, monkeypatch):
    vp = ops_platform
    name = _ingested(vp, tmp_path, unique_name, 1200)
    table = _table(vp, name)
    monkeypatch.setenv("VP_BLOAT_MIN_BYTES", str(256 * 1024))

    healthy = vp.maintain()
    assert healthy.success and healthy.checks == {"vector_tables_healthy": True}, healthy.check_metadata
    meta = healthy.metadata["table_maintenance"]
    assert meta["tables"] == 1 and meta["bytes_tables"] > 1_000_000 and meta["bytes_indexes"] > 0
    assert table in meta["health"]

    # Four rows in five deleted, spread over every page, while autovacuum is held off: the
    # dead tuples pile up, and VACUUM leaves the pages in place, mostly empty.
    with vp.pool().connection() as conn:
        conn.execute(sql.SQL("ALTER TABLE {} SET (autovacuum_enabled = false)").format(sql.Identifier(catalog.VECTORS, table)))
        deleted = conn.execute(sql.SQL("DELETE FROM {} WHERE abs(hashtext(chunk_id::text)) % 5 <> 0").format(
            sql.Identifier(catalog.VECTORS, table))).rowcount
        conn.execute("SELECT pg_stat_force_next_flush()")
    assert deleted > 800

    bloated = vp.maintain()
    assert bloated.success and bloated.checks == {"vector_tables_healthy": False}
    problems = bloated.check_metadata["vector_tables_healthy"]["problems"]
    assert f"{table}: " in problems and "dead tuples before VACUUM" in problems and "free space after VACUUM" in problems
    assert bloated.metadata["table_maintenance"]["dead_tuples_before"] >= deleted
    assert bloated.metadata["table_maintenance"]["dead_tuples_after"] == 0  # the pass vacuumed them

    with vp.pool().connection() as conn:  # the remedy the message names
        conn.execute(sql.SQL("VACUUM FULL {}").format(sql.Identifier(catalog.VECTORS, table)))
    again = vp.maintain()
    assert again.checks == {"vector_tables_healthy": True}, again.check_metadata


def test_storage_overview_adds_up_what_status_reports_per_tier(ops_platform, tmp_path, unique_name):
    vp = ops_platform
    hot = _ingested(vp, tmp_path, f"{unique_name}_hot", 40)
    cold = _ingested(vp, tmp_path, f"{unique_name}_cold", 25)
    assert vp.tier(cold, "cold").success

    run = vp.maintain()
    meta = run.metadata["storage_overview"]
    status = {c["name"]: c for c in vp.status()["collections"]}
    assert meta["collections"] == 2
    assert meta["vectors_active"] == status[hot]["vectors"] > 0
    assert meta["vectors_cold"] == sum(s["rows"] for s in status[cold]["snapshots"] if s["serving"]) > 0
    # live sizes: a catalog page may have been added since (the status call's own writes)
    assert meta["bytes_postgres"] == pytest.approx(status[hot]["bytes_postgres"] + status[cold]["bytes_postgres"], abs=65536)
    assert meta["bytes_object_store"] >= status[cold]["bytes_object_store"] > 0
    assert meta["usd_per_month"] > 0
    assert f"| {hot} | active |" in meta["per_collection"] and f"| {cold} | cold |" in meta["per_collection"]
    assert "█" in meta["tier_distribution"]


def test_schedules_request_the_expected_runs(ops_platform, own_database, dagster_instance, tmp_path, unique_name):
    vp = ops_platform
    resources = {"postgres": PostgresResource(dsn=own_database)}
    night = dt.datetime(2026, 11, 24, 3, 17, tzinfo=dt.timezone.utc)
    with dg.build_schedule_context(instance=dagster_instance, scheduled_execution_time=night) as context:
        request = maintenance_schedule(context)
    assert request.run_key == "maintenance:2026-11-24"

    monday = dt.datetime(2026, 11, 23, 4, 23, tzinfo=dt.timezone.utc)
    with dg.build_schedule_context(instance=dagster_instance, scheduled_execution_time=monday, resources=resources) as context:
        assert isinstance(recall_monitoring_schedule(context), dg.SkipReason)  # nothing in this database yet

    active = _ingested(vp, tmp_path, f"{unique_name}_a", 30)
    cold = _ingested(vp, tmp_path, f"{unique_name}_c", 20)
    assert vp.tier(cold, "cold").success
    with dg.build_schedule_context(instance=dagster_instance, scheduled_execution_time=monday, resources=resources) as context:
        requests = recall_monitoring_schedule(context)
    model = vp.collection(active).serving_model
    assert [(r.partition_key, r.run_key) for r in requests] == [
        (dg.MultiPartitionKey({"collection": active, "model": model}), f"recall:{active}|{model}:2026-W48")
    ]  # the cold collection has no index to measure


def test_weekly_recall_check_runs_on_logged_queries_and_keeps_its_history(ops_platform, tmp_path, unique_name):
    vp = ops_platform
    name = _ingested(vp, tmp_path, unique_name, 300)
    for i in range(30):
        vp.search(" ".join(WORDS[i % 12: i % 12 + 3]) + f" {i}", [name], k=10)
    flush_query_log(vp.pool())

    first = vp.check_recall(name)
    assert first.success and first.checks == {"index_recall_meets_target": True}
    meta = first.check_metadata["index_recall_meets_target"]
    assert meta["queries_from_log"] == 30 and meta["queries"] == 100  # every logged query, topped up
    assert "| 10 |" in meta["recall_vs_ef_search"] and "| 200 |" in meta["recall_vs_ef_search"]  # ef 10 .. 2 x 100
    clock.set_now(clock.now() + dt.timedelta(days=7))
    try:
        second = vp.check_recall(name)
    finally:
        clock.set_now(None)
    over_time = second.check_metadata["index_recall_meets_target"]["recall_over_time"]
    assert over_time.count("\n") == 4  # header, rule, three measurements: the ingest's, then two weekly ones
    with vp.pool().connection() as conn:
        rows = conn.execute("SELECT recall, queries_from_log, curve FROM vector_platform.recall_history WHERE collection = %s "
                            "ORDER BY measured_at", (name,)).fetchall()
    assert [r[1] for r in rows] == [0, 30, 30]  # no query was logged when the ingest's check ran
    assert all(0.9 <= r[0] <= 1.0 and "100" in r[2] for r in rows)

    assert vp.tier(name, "cold").success
    with pytest.raises(ValueError, match="cold"):
        vp.check_recall(name)


def test_recall_is_measured_again_only_when_what_it_measures_changed(make_platform, tmp_path, unique_name):
    """A re-ingest that changed no row reuses the last measurement (its time in the metadata, no
    new history row); a changed document, a new ef_search or a new week measure again."""
    vp = make_platform()
    source = write_jsonl(tmp_path / "d.jsonl", _docs(300, "rr"))
    vp.add_collection(unique_name, source=source)

    def check_of(runs):
        assert all(r.success for r in runs), [r.error for r in runs]
        embed = next(r for r in runs if "index_recall_meets_target" in r.checks)
        assert embed.checks["index_recall_meets_target"] is True
        return embed.check_metadata["index_recall_meets_target"]

    def measurements() -> int:
        with vp.pool().connection() as conn:
            return conn.execute("SELECT count(*) FROM vector_platform.recall_history WHERE collection = %s",
                                (unique_name,)).fetchone()[0]

    first = check_of(vp.ingest(unique_name))
    assert "measured" not in first and measurements() == 1
    again = check_of(vp.ingest(unique_name))  # nothing changed at the source
    assert "reused" in again["measured"] and measurements() == 1
    assert again["recall"] == first["recall"] and again["uses_index"] is True and "hnsw" in again["plan"].lower()

    docs = _docs(300, "rr")
    docs[7]["text"] += " and one more sentence"
    write_jsonl(source, docs)
    changed = check_of(vp.ingest(unique_name))
    assert "measured" not in changed and measurements() == 2

    vp.set_settings(unique_name, hnsw_ef_search=60)
    assert "measured" not in check_of(vp.ingest(unique_name)) and measurements() == 3
    clock.set_now(clock.now() + dt.timedelta(days=7))
    try:
        assert "measured" not in check_of(vp.ingest(unique_name)) and measurements() == 4
    finally:
        clock.set_now(None)

    # Searches by vector alone are logged queries too, each distinct vector one of its own.
    import numpy as np

    rng = np.random.default_rng(5)
    for _ in range(3):
        vec = rng.standard_normal(384).astype(np.float32)
        vp.search(vector=vec / np.linalg.norm(vec), collections=[unique_name], k=5)
    flush_query_log(vp.pool())
    logged = check_of(vp.ingest(unique_name))
    assert "measured" not in logged and logged["queries_from_log"] == 3 and measurements() == 5
    assert "reused" in check_of(vp.ingest(unique_name))["measured"] and measurements() == 5


# ---------------------------------------------------------------- audit

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, key: str | None) -> int:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **({"X-API-Key": key} if key else {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def test_http_searches_are_audited_under_the_key_name(make_platform, tmp_path, unique_name, monkeypatch):
    import uvicorn

    from vector_platform.http import create_app

    vp = make_platform()
    name = _ingested(vp, tmp_path, unique_name, 30)
    monkeypatch.setenv("VP_AUDIT", "1")
    monkeypatch.setenv("VP_API_KEYS", "alice:key-of-alice,bob:key-of-bob")
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(vp), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}/search"
        assert _post(url, {"query": "fern moss", "collections": [name], "k": 3}, "key-of-alice") == 200
        assert _post(url, {"query": "spore frond", "collections": [name], "k": 2}, "key-of-bob") == 200
        assert _post(url, {"query": "no key", "collections": [name]}, "key-of-mallory") == 401
        assert _post(url, {"query": "bad filter", "collections": [name], "filters": ["year"]}, "key-of-bob") == 400
    finally:
        server.should_exit = True
        thread.join(timeout=30)

    with vp.pool().connection() as conn:
        rows = audit.entries(conn, since=clock.now() - dt.timedelta(minutes=10), limit=1000)
    ours = [r for r in rows if name in r["collections"]]
    assert [(r["principal"], r["query_text"], r["k"]) for r in reversed(ours)] == [
        ("alice", "fern moss", 3), ("bob", "spore frond", 2), ("bob", "bad filter", 10)]  # the refused key left no row
    alice, bob, failed = reversed(ours)
    assert alice["channel"] == "http" and alice["client"] == "127.0.0.1" and alice["latency_ms"] > 0
    assert len(alice["results"]) == 3 and {h["collection"] for h in alice["results"]} == {name}
    assert all(h["doc_id"] and h["chunk_id"] and h["tier"] == "active" for h in alice["results"])
    assert failed["results"] == [] and "filters must be a JSON object" in failed["error"]
    with vp.pool().connection() as conn:  # no key is ever stored
        dump = conn.execute("SELECT string_agg(row_to_json(a)::text, '') FROM vector_platform.audit_log a").fetchone()[0]
    assert "key-of-alice" not in dump and "key-of-bob" not in dump


def test_cli_searches_are_audited_and_old_rows_purged(make_platform, pg_dsn, tmp_path, unique_name):
    vp = make_platform()
    name = _ingested(vp, tmp_path, unique_name, 30)
    env = {**cli_env(pg_dsn, tmp_path), "VP_AUDIT": "1"}
    searched = subprocess.run(cli("search", "--collection", name, "lichen humus", "-k", "4"), env=env, capture_output=True,
                              text=True, timeout=300)
    assert searched.returncode == 0, searched.stderr[-2000:]
    listed = subprocess.run(cli("audit", "--collection", name, "--json"), env=env, capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0, listed.stderr[-2000:]
    [entry] = [json.loads(line) for line in listed.stdout.splitlines()]
    assert entry["channel"] == "cli" and entry["query_text"] == "lichen humus" and len(entry["results"]) == 4
    assert entry["principal"] == audit.cli_principal()

    old = clock.now() - dt.timedelta(days=91)
    with vp.pool().connection() as conn:
        audit.record(vp.pool(), principal="old", channel="cli", collections=[name], query_text="old", k=1, results=[], latency_ms=1.0)
        conn.execute("UPDATE vector_platform.audit_log SET at = %s WHERE principal = 'old' AND %s = ANY (collections)", (old, name))
        purged = audit.purge(conn, days=90)
        left = conn.execute("SELECT principal FROM vector_platform.audit_log WHERE %s = ANY (collections)", (name,)).fetchall()
    assert purged >= 1 and left == [(audit.cli_principal(),)]
