"""Every asset check fails when its guarantee is broken (a check that cannot fail proves nothing)."""

import dagster as dg
import numpy as np
import psycopg
from psycopg import sql

from vector_platform import catalog
from vector_platform.defs.ingest.checks import index_recall_meets_target, no_chunk_lost

from .conftest import write_jsonl

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


def _corpus(n):
    rng = np.random.default_rng(3)
    return [{"id": f"d{i}", "text": " ".join(rng.choice(WORDS, size=12))} for i in range(n)]


def _run_checks_only(vp, check, key):
    name = next(iter(check.check_specs)).name
    job = dg.define_asset_job(f"only_{name}", selection=dg.AssetSelection.checks(check))
    defs = dg.Definitions.merge(vp.defs, dg.Definitions(jobs=[job]))
    result = defs.resolve_job_def(job.name).execute_in_process(partition_key=key, instance=vp.instance, raise_on_error=False)
    evaluations = [e.event_specific_data for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
    assert len(evaluations) == 1
    return evaluations[0]


def test_no_chunk_lost_fails_for_a_chunk_with_neither_vector_nor_dead_letter(make_platform, fake_embedder, tmp_path, unique_name, pg_dsn):
    vp = make_platform()
    vp.add_collection(unique_name, write_jsonl(tmp_path / "d.jsonl", _corpus(50)))
    assert all(r.success for r in vp.ingest(unique_name))
    key = dg.MultiPartitionKey({"collection": unique_name, "model": "minilm_l6_v2"})
    assert _run_checks_only(vp, no_chunk_lost, key).passed
    with psycopg.connect(pg_dsn) as conn:
        table = sql.Identifier("vp_vectors", catalog.vector_table_name(conn, unique_name, "minilm_l6_v2"))
        conn.execute(sql.SQL("DELETE FROM {} WHERE doc_id = 'd7'").format(table))  # a row lost behind our back
    evaluation = _run_checks_only(vp, no_chunk_lost, key)
    assert not evaluation.passed and evaluation.metadata["lost"].value >= 1
    # Re-running the pipeline restores it (from the cache) and the check passes again.
    runs = vp.ingest(unique_name)
    assert runs[1].checks["no_chunk_lost"] is True and runs[1].metadata["vector_table"]["inserted"] >= 1


def test_recall_check_fails_below_target(make_platform, fake_embedder, tmp_path, unique_name):
    vp = make_platform()
    vp.add_collection(unique_name, write_jsonl(tmp_path / "d.jsonl", _corpus(3000)))
    runs = vp.ingest(unique_name)
    assert runs[1].checks["index_recall_meets_target"] is True
    # A starved graph and a target of perfect recall: the check must say no.
    vp.set_settings(unique_name, hnsw_m=2, hnsw_ef_construction=4, hnsw_ef_search=1, recall_target=1.0)
    runs = vp.ingest(unique_name)
    assert runs[1].metadata["hnsw_index"]["action"] == "rebuilt"
    assert runs[1].checks["index_recall_meets_target"] is False
    key = dg.MultiPartitionKey({"collection": unique_name, "model": "minilm_l6_v2"})
    evaluation = _run_checks_only(vp, index_recall_meets_target, key)
    assert not evaluation.passed and evaluation.metadata["recall"].value < 1.0
