"""Every asset check fails when its guarantee is broken (a check that cannot fail proves nothing)."""

import dagster as dg
import numpy as np

from vector_platform import checks
from vector_platform.ingest import embedding_cache, steps
from vector_platform.models import MINILM

from .conftest import write_jsonl

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


def _corpus(n):
    rng = np.random.default_rng(3)
    return [{"id": f"d{i}", "text": " ".join(rng.choice(WORDS, size=12))} for i in range(n)]


def test_no_chunk_lost_fails_when_a_cache_file_vanishes_and_the_next_run_heals(
    make_platform, fake_embedder, tmp_path, unique_name
):
    vp = make_platform()
    vp.add_collection(unique_name, write_jsonl(tmp_path / "d.jsonl", _corpus(200)))
    assert vp._run("ingest_documents_job", unique_name).success
    store = vp.object_store.store()
    steps.embed_chunks(vp.pool(), store, fake_embedder, unique_name, MINILM.key, batch_size=64)
    # A bucket lifecycle rule (or a person) deletes one cache file between embedding and loading.
    files = store.list(embedding_cache.prefix(MINILM.fingerprint))
    assert len(files) == 4
    store.delete(files[1])
    key = dg.MultiPartitionKey({"collection": unique_name, "model": MINILM.key})
    run = vp._run("embed_and_index_job", key)
    assert not run.success and run.checks["no_chunk_lost"] is False  # blocking: the index is not built
    assert run.metadata["vector_table"]["without_vector"] == 64 and "hnsw_index" not in run.metadata
    lost = checks.count_lost_chunks(vp.pool(), unique_name, MINILM.key)
    assert lost["lost"] == 64 and lost["orphans"] == 0
    # The lost file was forgotten by the index: the next run embeds those chunks again.
    run = vp._run("embed_and_index_job", key)
    assert run.success and run.checks["no_chunk_lost"] is True
    assert run.metadata["embeddings"]["embedded"] == 64


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
    figures = checks.measure_recall(vp.pool(), unique_name, MINILM.key, ef_search=1)
    assert figures["uses_index"] is True and figures["recall"] < 1.0
