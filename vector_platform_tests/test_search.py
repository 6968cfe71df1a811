"""Search: the plan it really runs, merging across collections, filters, the query log."""

import uuid

import psycopg
import pytest
from psycopg import sql

from vector_platform import catalog, tables
from vector_platform.search import active, flush_query_log
from vector_platform.models import MINILM

from .conftest import build_platform, write_jsonl

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


def _corpus(n, tag):
    return [
        {
            "id": f"{tag}{i}",
            "text": f"{tag}{i} " + " ".join(WORDS[(i * 7 + j * (1 + i % 3)) % len(WORDS)] for j in range(4 + i % 7)),
            "metadata": {"tag": tag, "odd": i % 2},
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def two_collections(pg_dsn, dagster_instance, tmp_path_factory):
    folder = tmp_path_factory.mktemp("search")
    vp = build_platform(pg_dsn, dagster_instance, (folder / "objects").as_uri())
    names = [f"search_{uuid.uuid4().hex[:6]}_a", f"search_{uuid.uuid4().hex[:6]}_b"]
    for name, n in zip(names, (3000, 200)):
        vp.add_collection(name, write_jsonl(folder / f"{name}.jsonl", _corpus(n, name[-1])))
        assert all(r.success for r in vp.ingest(name))
    return vp, names


def test_ann_search_uses_the_hnsw_index_and_exact_does_not(two_collections, pg_dsn):
    vp, (big, _) = two_collections
    with psycopg.connect(pg_dsn) as conn:
        from pgvector.psycopg import register_vector

        register_vector(conn)
        conn.execute(sql.SQL("ANALYZE {}").format(tables.view_id(big)))
        q = vp.embed_query(MINILM, "alpha beta gamma")
        ann_plan = active.explain_nearest(conn, tables.view_id(big), MINILM, q, exact=False)
        exact_plan = active.explain_nearest(conn, tables.view_id(big), MINILM, q, exact=True)
        index = tables.index_name(catalog.vector_table_name(conn, big, "minilm_l6_v2"))
    assert f"Index Scan using {index}" in ann_plan and "Sort" not in ann_plan
    assert "Index Scan" not in exact_plan and "Seq Scan" in exact_plan and "Sort" in exact_plan


def test_search_merges_collections_by_score_and_labels_tiers(two_collections, pg_dsn):
    vp, (a, b) = two_collections
    result = vp.search("gamma delta epsilon", [a, b, "no_such_collection"], k=15)
    assert len(result.hits) == 15
    assert [h.score for h in result.hits] == sorted((h.score for h in result.hits), reverse=True)
    assert {h.collection for h in result.hits} <= {a, b}
    assert result.stats["tiers"]["active"]["collections"] == 2
    assert result.stats["merge"] == "score"  # one model: scores compare
    assert any("no_such_collection" in w for w in result.warnings)
    # Exact search over both equals the top 15 of each one's exact results, merged by score.
    merged = vp.search("gamma delta epsilon", [a, b], k=15, exact=True)
    each = vp.search("gamma delta epsilon", [a], k=15, exact=True).hits + vp.search("gamma delta epsilon", [b], k=15, exact=True).hits
    best = sorted(each, key=lambda h: h.score, reverse=True)[:15]
    assert [round(h.score, 5) for h in merged.hits] == [round(h.score, 5) for h in best]
    flush_query_log(vp.pool())  # the log is written in batches, off the request path
    with psycopg.connect(pg_dsn) as conn:
        queried = conn.execute(
            "SELECT count(*) FROM vector_platform.collections WHERE name = ANY(%s) AND last_queried_at IS NOT NULL", ([a, b],)
        ).fetchone()[0]
        logged = dict(conn.execute(
            "SELECT mode, count(*) FROM vector_platform.query_stats "
            "WHERE collection = %s AND query_text = 'gamma delta epsilon' GROUP BY mode",
            (a,),
        ).fetchall())
    assert queried == 2 and logged == {"ann": 1, "exact": 2}


def test_metadata_filters_and_input_errors(two_collections):
    vp, (a, _) = two_collections
    result = vp.search("alpha", [a], k=20, filters={"odd": 1})
    assert len(result.hits) == 20 and all(h.metadata["odd"] == 1 for h in result.hits)
    with pytest.raises(ValueError, match="empty query"):
        vp.search("   ", [a])
    with pytest.raises(ValueError, match="384"):
        vp.search(vector=[0.1] * 10, collections=[a])
    with pytest.raises(ValueError, match="k must be"):
        vp.search("alpha", [a], k=0)


def test_recall_check_prefers_logged_queries(two_collections, pg_dsn):
    from vector_platform.checks import measure_recall

    vp, (a, _) = two_collections
    for i in range(5):
        vp.search(f"{WORDS[i]} {WORDS[i + 3]}", [a])
    flush_query_log(vp.pool())
    figures = measure_recall(vp.pool(), a, "minilm_l6_v2", ef_search=100, sample=100)
    assert figures["queries"] == 100 and figures["queries_from_log"] >= 5
    assert figures["uses_index"] is True and figures["recall"] >= 0.9
