"""Settings change only when asked; a model key is one model for ever."""

import subprocess

import psycopg
import pytest

from vector_platform import catalog
from vector_platform.models import MINILM, ModelConflict, ModelSpec

from .conftest import cli, cli_env, write_jsonl


def _docs(n):
    return [{"id": f"d{i}", "text": " ".join(f"word{(i * 7 + j) % 97}" for j in range(150))} for i in range(n)]


def test_re_adding_a_collection_changes_only_what_is_given(make_platform, fake_embedder, tmp_path, unique_name):
    vp = make_platform()
    first = write_jsonl(tmp_path / "a.jsonl", _docs(5))
    vp.add_collection(unique_name, first, hnsw_m=24, hnsw_ef_construction=96, recall_target=0.9)
    second = write_jsonl(tmp_path / "b.jsonl", _docs(5))
    coll = vp.add_collection(unique_name, second)
    assert coll.source == str(second.resolve())
    assert (coll.settings.hnsw_m, coll.settings.hnsw_ef_construction, coll.settings.recall_target) == (24, 96, 0.9)
    coll = vp.add_collection(unique_name, hnsw_ef_search=64)
    assert coll.source == str(second.resolve()) and coll.settings.hnsw_m == 24 and coll.settings.hnsw_ef_search == 64
    with pytest.raises(ValueError, match="unknown collection setting"):
        vp.set_settings(unique_name, hnsw_mm=8)
    with pytest.raises(ValueError, match="max_delete_fraction"):
        vp.set_settings(unique_name, max_delete_fraction=1.5)
    assert vp.collection(unique_name).settings.hnsw_m == 24  # a refused change changes nothing


def test_changed_chunking_re_chunks_and_re_embeds_only_new_text_and_hnsw_rebuilds(
    make_platform, fake_embedder, tmp_path, unique_name, pg_dsn
):
    vp = make_platform()
    vp.add_collection(unique_name, write_jsonl(tmp_path / "a.jsonl", _docs(6)))
    runs = vp.ingest(unique_name)
    assert all(r.success for r in runs)
    chunks_before = runs[0].metadata["chunks"]["chunks_total"]
    embedded_before = len(fake_embedder.texts)

    before, after = vp.set_settings(unique_name, chunk_max_tokens=64, chunk_overlap_tokens=8, hnsw_m=8, hnsw_ef_construction=32)
    assert before.chunk_max_tokens == 0 and after.chunk_max_tokens == 64
    runs = vp.ingest(unique_name)
    assert all(r.success for r in runs), [r.error for r in runs]
    assert runs[0].metadata["chunks"]["documents_chunked"] == 6
    chunks_after = runs[0].metadata["chunks"]["chunks_total"]
    assert chunks_after > chunks_before
    new_texts = fake_embedder.texts[embedded_before:]
    # Only chunk text never seen before went to the model, each once.
    assert 0 < len(new_texts) == len(set(new_texts)) <= chunks_after
    assert set(new_texts).isdisjoint(fake_embedder.texts[:embedded_before])
    assert runs[1].metadata["hnsw_index"]["action"] == "rebuilt"
    assert runs[1].metadata["vector_table"]["rows"] == chunks_after and runs[1].checks["no_chunk_lost"]
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute(
            "SELECT max(token_count) FROM vector_platform.chunks WHERE collection = %s", (unique_name,)
        ).fetchone()[0] <= 64

    # The same settings again: nothing is re-chunked, nothing rebuilt.
    vp.set_settings(unique_name, chunk_max_tokens=64)
    runs = vp.ingest(unique_name)
    assert runs[0].metadata["chunks"]["documents_chunked"] == 0 and runs[1].metadata["hnsw_index"]["action"] == "kept"


def test_cli_collections_set_and_re_add(pg_dsn, tmp_path, unique_name):
    env = cli_env(pg_dsn, tmp_path)
    source = write_jsonl(tmp_path / "a.jsonl", _docs(2))
    subprocess.run(cli("collections", "add", unique_name, "--source", str(source), "--hnsw-m", "20"), env=env, check=True)
    other = write_jsonl(tmp_path / "b.jsonl", _docs(3))
    subprocess.run(cli("collections", "add", unique_name, "--source", str(other)), env=env, check=True)
    out = subprocess.run(
        cli("collections", "set", unique_name, "--ef-search", "80", "--max-delete-fraction", "0.2"),
        env=env, capture_output=True, text=True, check=True,
    ).stdout
    assert "hnsw_ef_search 100 -> 80" in out and "max_delete_fraction 0.5 -> 0.2" in out
    with psycopg.connect(pg_dsn) as conn:
        settings = catalog.get_collection(conn, unique_name).settings
    assert (settings.hnsw_m, settings.hnsw_ef_search, settings.max_delete_fraction) == (20, 80, 0.2)
    bad = subprocess.run(cli("collections", "set", unique_name, "--hnsw-m", "1"), env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "hnsw_m must be between 2 and 100" in bad.stderr and "Traceback" not in bad.stderr
    missing = subprocess.run(cli("collections", "add", "no_such_" + unique_name[:20]), env=env, capture_output=True, text=True)
    assert missing.returncode == 2 and "give its --source" in missing.stderr


def test_a_model_key_is_one_model_for_ever(make_platform, unique_name):
    vp = make_platform()
    key = f"m_{unique_name[-12:]}"
    spec = ModelSpec(key, "openai", "text-embedding-3-small", 384, options={"requests_per_minute": 100})
    vp.add_model(spec)
    # Operational options (limits, URL) may change; identity may not.
    vp.add_model(ModelSpec(key, "openai", "text-embedding-3-small", 384, options={"requests_per_minute": 3000, "base_url": "http://x/v1"}))
    with vp.pool().connection() as conn:
        assert catalog.get_model(conn, key).options["requests_per_minute"] == 3000
    for other in (
        ModelSpec(key, "openai", "another-model-same-dims", 384),
        ModelSpec(key, "openai", "text-embedding-3-small", 384, distance="l2"),
        ModelSpec(key, "openai", "text-embedding-3-small", 384, options={"dimensions": 384}),
        ModelSpec(key, "openai", "text-embedding-3-small", 384, options={"revision": "2"}),
    ):
        with pytest.raises(ModelConflict, match="one model for ever"):
            vp.add_model(other)
    with pytest.raises(ModelConflict, match="built-in"):
        vp.add_model(ModelSpec(MINILM.key, "local", "sentence-transformers/all-mpnet-base-v2", 384))
    with vp.pool().connection() as conn:
        assert catalog.get_model(conn, MINILM.key).model_name == MINILM.model_name
        assert catalog.get_model(conn, key).model_name == "text-embedding-3-small"
    assert len({s.fingerprint for s in (spec, MINILM)}) == 2


def test_cli_models_add_conflict_is_a_clear_error(pg_dsn, tmp_path):
    env = cli_env(pg_dsn, tmp_path)
    done = subprocess.run(
        cli("models", "add", "minilm_l6_v2", "--provider", "local", "--model-name", "other/model", "--dims", "384"),
        env=env, capture_output=True, text=True,
    )
    assert done.returncode == 2
    assert "already registered" in done.stderr and "model_name" in done.stderr and "Traceback" not in done.stderr
