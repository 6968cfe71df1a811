"""The Dagster side: one lineage graph, the discovery sensor, a blocking check, a real `dagster` CLI run."""

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import numpy as np
import psycopg

from vector_platform import catalog
from vector_platform.ingest import embedding_cache
from vector_platform.models import MINILM
from vector_platform.definitions import build_definitions
from vector_platform.defs.ingest.sensors import collection_discovery_sensor
from vector_platform.defs.resources import PostgresResource

from .conftest import write_jsonl


def test_one_lineage_graph_with_checks_and_descriptions():
    defs = build_definitions()
    graph = defs.resolve_asset_graph()
    deps = {k.to_user_string(): sorted(p.to_user_string() for p in graph.get(k).parent_keys) for k in graph.get_all_asset_keys()}
    assert deps == {
        "source_documents": [],
        "chunks": ["source_documents"],
        "embeddings": ["chunks"],
        "vector_table": ["embeddings"],
        "hnsw_index": ["vector_table"],
        "serving_view": ["hnsw_index"],
        "cold_snapshot": ["vector_table"],
        "row_archive": ["vector_table"],
        "table_maintenance": ["hnsw_index"],
        "storage_overview": ["cold_snapshot", "row_archive", "vector_table"],
    }
    checks = {(c.asset_key.to_user_string(), c.name) for c in graph.asset_check_keys}
    assert checks == {
        ("embeddings", "embeddings_are_valid"),
        ("vector_table", "no_chunk_lost"),
        ("hnsw_index", "index_recall_meets_target"),
        ("cold_snapshot", "snapshot_matches_table"),
        ("hnsw_index", "shadow_passes_quality_gate"),
        ("cold_snapshot", "snapshot_passes_quality_gate"),
        ("row_archive", "archive_reconciles"),
        ("table_maintenance", "vector_tables_healthy"),
    }
    for key in graph.get_all_asset_keys():
        assert graph.get(key).description and len(graph.get(key).description) > 80


def test_discovery_sensor_adds_partitions_for_catalog_collections(pg_dsn, unique_name, tmp_path):
    postgres = PostgresResource(dsn=pg_dsn)
    with postgres.pool().connection() as conn:
        catalog.add_collection(conn, unique_name, str(tmp_path), "minilm_l6_v2")
    with dg.instance_for_test() as instance:
        context = dg.build_sensor_context(instance=instance, resources={"postgres": postgres})
        result = collection_discovery_sensor(context)
        added = {r.partitions_def_name: set(r.partition_keys) for r in result.dynamic_partitions_requests}
        assert unique_name in added["collection"] and "minilm_l6_v2" in added["model"]
        for request in result.dynamic_partitions_requests:
            instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
        again = collection_discovery_sensor(dg.build_sensor_context(instance=instance, resources={"postgres": postgres}))
        assert not again.dynamic_partitions_requests


def test_blocking_check_keeps_a_bad_cached_vector_out_of_the_table(make_platform, fake_embedder, tmp_path, unique_name, pg_dsn):
    vp = make_platform()
    docs = [{"id": f"d{i}", "text": f"text number {i} about enzymes"} for i in range(10)]
    vp.add_collection(unique_name, write_jsonl(tmp_path / "d.jsonl", docs))
    assert vp._run("ingest_documents_job", unique_name).success
    with psycopg.connect(pg_dsn) as conn:
        victim = conn.execute(
            "SELECT content_hash FROM vector_platform.chunks WHERE collection = %s AND doc_id = 'd3'", (unique_name,)
        ).fetchone()[0]
    # A corrupted cache entry (not unit length) that bypassed the gate.
    store = vp.object_store.store()
    embedding_cache.write(vp.pool(), store, MINILM.fingerprint, [victim], np.full((1, 384), 3.0, np.float32))

    run = vp._run("embed_and_index_job", dg.MultiPartitionKey({"collection": unique_name, "model": "minilm_l6_v2"}))
    assert not run.success
    assert run.checks == {"embeddings_are_valid": False}
    assert "vector_table" not in run.metadata
    with psycopg.connect(pg_dsn) as conn:
        table = catalog.vector_table_name(conn, unique_name, "minilm_l6_v2")
        exists = conn.execute("SELECT to_regclass(%s)", (f'vp_vectors."{table}"',)).fetchone()[0]
    assert exists is None


def test_real_dagster_cli_materializes_a_partition(pg_dsn, tmp_path, unique_name, monkeypatch):
    env = dict(os.environ, VP_PG_DSN=pg_dsn, DAGSTER_HOME=str(tmp_path), VP_OBJECT_STORE=(tmp_path / "o").as_uri())
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    source = write_jsonl(tmp_path / "d.jsonl", [{"id": str(i), "text": f"document {i}"} for i in range(5)])
    bin_dir = Path(sys.executable).parent
    subprocess.run([str(bin_dir / "vector-platform"), "collections", "add", unique_name, "--source", str(source)], env=env, check=True)
    done = subprocess.run(
        [str(bin_dir / "dagster"), "asset", "materialize", "-m", "vector_platform.definitions",
         "--select", "source_documents,chunks", "--partition", unique_name],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with psycopg.connect(pg_dsn) as conn:
        count = conn.execute("SELECT count(*) FROM vector_platform.chunks WHERE collection = %s", (unique_name,)).fetchone()[0]
    assert count == 5
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    with dg.DagsterInstance.get() as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey("chunks"))
        assert event.asset_materialization.partition == unique_name
