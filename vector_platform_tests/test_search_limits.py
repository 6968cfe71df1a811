"""Search returns what was asked or says why: k above ef_search, selective filters, the
largest k, and collections of different models never ranked together by raw score."""

import subprocess
import uuid

import pytest

from vector_platform.models import ModelSpec

from .conftest import build_platform, cli, cli_env, write_jsonl

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


def _corpus(n, tag):
    return [
        {
            "id": f"{tag}{i}",
            "text": f"{tag}{i} " + " ".join(WORDS[(i * 5 + j * (1 + i % 4)) % len(WORDS)] for j in range(5 + i % 6)),
            "metadata": {"bucket": i % 100, "half": i % 2},
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def platform_and_names(pg_dsn, dagster_instance, tmp_path_factory):
    folder = tmp_path_factory.mktemp("limits")
    vp = build_platform(pg_dsn, dagster_instance, (folder / "objects").as_uri())
    suffix = uuid.uuid4().hex[:6]
    big, other = f"limits_{suffix}_big", f"limits_{suffix}_other"
    vp.add_collection(big, write_jsonl(folder / "big.jsonl", _corpus(2000, "b")), hnsw_ef_search=40)
    assert all(r.success for r in vp.ingest(big))
    # Same texts, another model (another fingerprint, same dimensions).
    vp.add_model(ModelSpec(f"fake_other_{suffix}", "local", "sentence-transformers/all-MiniLM-L6-v2", 384, options={"variant": "b"}))
    vp.add_collection(other, write_jsonl(folder / "other.jsonl", _corpus(300, "o")), model=f"fake_other_{suffix}")
    assert all(r.success for r in vp.ingest(other))
    return vp, big, other


def test_k_above_ef_search_returns_k_hits_with_and_without_filters(platform_and_names, fake_embedder):
    vp, big, _ = platform_and_names
    result = vp.search("alpha beta", [big], k=250)
    assert len(result.hits) == 250 and len({h.chunk_id for h in result.hits}) == 250
    assert result.stats["exact_fallback"] == [] and not result.warnings
    exact = vp.search("alpha beta", [big], k=250, exact=True)
    overlap = len({h.chunk_id for h in result.hits} & {h.chunk_id for h in exact.hits}) / 250
    assert overlap >= 0.9

    filtered = vp.search("alpha beta", [big], k=300, filters={"half": 1})
    assert len(filtered.hits) == 300 and all(h.metadata["half"] == 1 for h in filtered.hits)
    assert [h.score for h in filtered.hits] == sorted((h.score for h in filtered.hits), reverse=True)


def test_a_selective_filter_returns_every_match_and_says_there_are_no_more(platform_and_names, fake_embedder):
    vp, big, _ = platform_and_names
    result = vp.search("gamma", [big], k=50, filters={"bucket": 7})
    assert len(result.hits) == 20 and all(h.metadata["bucket"] == 7 for h in result.hits)
    exact = vp.search("gamma", [big], k=50, filters={"bucket": 7}, exact=True)
    assert {h.chunk_id for h in result.hits} == {h.chunk_id for h in exact.hits}
    assert any("20 hits for k=50" in w and "match the filters" in w for w in result.warnings)
    assert vp.search("gamma", [big], k=5, filters={"bucket": 1234}).hits == []


def test_the_largest_k_is_enforced_with_a_clear_error(platform_and_names, fake_embedder, pg_dsn, tmp_path):
    vp, big, _ = platform_and_names
    assert len(vp.search("alpha", [big], k=1000).hits) == 1000
    with pytest.raises(ValueError, match="between 1 and 1000"):
        vp.search("alpha", [big], k=1001)
    done = subprocess.run(cli("search", "alpha", "--collection", big, "-k", "5000"), env=cli_env(pg_dsn, tmp_path),
                          capture_output=True, text=True)
    assert done.returncode == 2 and "k must be between 1 and 1000" in done.stderr and "Traceback" not in done.stderr


def test_collections_of_different_models_merge_by_rank_not_by_score(platform_and_names, fake_embedder):
    vp, big, other = platform_and_names
    result = vp.search("alpha beta gamma", [big, other], k=10)
    assert result.stats["merge"] == "reciprocal_rank_fusion"
    assert any("different models" in w for w in result.warnings)
    alone_big = vp.search("alpha beta gamma", [big], k=10).hits
    alone_other = vp.search("alpha beta gamma", [other], k=10).hits
    # Rank fusion interleaves the two lists by rank: each one's best hit comes first.
    assert {h.chunk_id for h in result.hits[:2]} == {alone_big[0].chunk_id, alone_other[0].chunk_id}
    assert [h.chunk_id for h in result.hits if h.collection == big] == [h.chunk_id for h in alone_big][: sum(h.collection == big for h in result.hits)]
