"""Storage tiers: evict -> cold search -> rehydrate -> archive, against embedded PostgreSQL and a
real object store (file://, and moto's S3 over HTTP where the store matters)."""

import json
import threading
import time
import uuid

import numpy as np
import psycopg
import pytest
from psycopg import sql

from vector_platform import catalog, tables
from vector_platform.catalog.tiers import InvalidMove
from vector_platform.search import AllArchived, cold_cache, filters as filter_language

from .conftest import FAKES, write_jsonl

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


def corpus(n: int, tag: str) -> list[dict]:
    return [
        {
            "id": f"{tag}{i}",
            "text": f"{tag}{i} " + " ".join(WORDS[(i * 7 + j * (1 + i % 3)) % len(WORDS)] for j in range(4 + i % 7)),
            "metadata": {"tag": tag, "odd": i % 2, "labels": ["x", "y"] if i % 3 == 0 else ["y"], "nested": {"n": i % 5}},
        }
        for i in range(n)
    ]


def ingested(vp, tmp_path, n=300, name=None, tag="d"):
    name = name or f"tier_{uuid.uuid4().hex[:8]}"
    vp.add_collection(name, write_jsonl(tmp_path / f"{name}.jsonl", corpus(n, tag)))
    runs = vp.ingest(name)
    assert all(r.success for r in runs), [r.error for r in runs]
    return name


def table_of(pg_dsn, name):
    with psycopg.connect(pg_dsn) as conn:
        table = catalog.vector_table_name(conn, name, "minilm_l6_v2")
        return table, tables.table_exists(conn, table), tables.current_index(conn, table)


def events(pg_dsn, name):
    with psycopg.connect(pg_dsn) as conn:
        return conn.execute(
            "SELECT from_tier, to_tier, reason, rows, bytes, seconds, run_id FROM vector_platform.tier_events "
            "WHERE collection = %s ORDER BY id",
            (name,),
        ).fetchall()


def test_evict_serves_exactly_the_same_ids_and_scores_cold_then_rehydrate_without_embedding(make_platform, pg_dsn, tmp_path):
    vp = make_platform()
    name = ingested(vp, tmp_path)
    queries = ["gamma delta", "alpha kappa sigma", "tau rho pi omicron", "beta", "zeta eta theta iota"]
    before = {q: vp.search(q, [name], k=10, exact=True) for q in queries}

    run = vp.tier(name, "cold")
    assert run.success, run.error
    table, exists, _ = table_of(pg_dsn, name)
    assert not exists, "the evicted table is dropped"
    assert vp.collection(name).tier == "cold"

    for q in queries:
        result = vp.search(q, [name], k=10)
        assert [h.chunk_id for h in result.hits] == [h.chunk_id for h in before[q].hits]
        assert np.allclose([h.score for h in result.hits], [h.score for h in before[q].hits], atol=1e-5)
        assert {(h.source_tier, h.exact) for h in result.hits} == {("cold", True)}
        assert len({h.snapshot_id for h in result.hits}) == 1 and result.hits[0].snapshot_id is not None
        cold = result.stats["tiers"]["cold"]
        assert cold["rows_scanned"] > 0 and cold["data_from"][name] in ("memory", "local_disk", "object_store")

    embedded_before = FAKES["minilm_l6_v2"].calls
    run = vp.tier(name, "active")
    assert run.success, run.error
    assert FAKES["minilm_l6_v2"].calls == embedded_before, "rehydrate never embeds"
    _, exists, index = table_of(pg_dsn, name)
    assert exists and index is not None
    assert run.metadata["rehydrate_collection"]["recall"] >= 0.9
    for q in queries:
        again = vp.search(q, [name], k=10, exact=True)
        assert [h.chunk_id for h in again.hits] == [h.chunk_id for h in before[q].hits]
        assert {h.source_tier for h in again.hits} == {"active"}

    # A second evict of the unchanged table reuses the verified snapshot instead of writing one.
    run = vp.tier(name, "cold")
    assert run.success and run.metadata["evict_collection"]["snapshots_written"] == str({"minilm_l6_v2": False})
    history = events(pg_dsn, name)
    assert [(e[0], e[1], e[2]) for e in history] == [("active", "cold", "manual"), ("cold", "active", "manual"), ("active", "cold", "manual")]
    assert all(e[3] == history[0][3] > 0 and e[4] > 0 and e[5] >= 0 and e[6] for e in history)


def test_only_valid_moves_and_archived_is_terminal(make_platform, pg_dsn, tmp_path):
    vp = make_platform()
    name = ingested(vp, tmp_path, n=60)
    other = ingested(vp, tmp_path, n=60, tag="o")
    assert vp.tier(name, "active").success  # already there: nothing to do
    assert events(pg_dsn, name) == []
    run = vp.tier(name, "archived")
    assert run.success, run.error
    with pytest.raises(InvalidMove, match="archived is terminal"):
        vp.tier(name, "active")
    with pytest.raises(InvalidMove, match="archived is terminal"):
        vp.tier(name, "cold")
    with pytest.raises(InvalidMove, match="unknown tier"):
        vp.tier(other, "frozen")
    with pytest.raises(ValueError, match="archived"):
        vp.ingest(name)
    _, exists, _ = table_of(pg_dsn, name)
    assert not exists
    with psycopg.connect(pg_dsn) as conn:
        docs, bodies = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE body <> '') FROM vector_platform.documents WHERE collection = %s", (name,)
        ).fetchone()
        chunks = conn.execute("SELECT count(*) FROM vector_platform.chunks WHERE collection = %s", (name,)).fetchone()[0]
    assert docs == 60 and bodies == 0 and chunks == 0  # ids stay, vectors and text go
    assert [(e[0], e[1]) for e in events(pg_dsn, name)] == [("active", "archived")]


def test_one_query_over_active_cold_and_archived(make_platform, pg_dsn, tmp_path):
    vp = make_platform()
    hot, frozen, gone = (ingested(vp, tmp_path, n=150, tag=t) for t in ("h", "c", "g"))
    assert vp.tier(frozen, "cold").success and vp.tier(gone, "archived").success
    exact = {
        name: vp.search("gamma delta", [name], k=20, exact=True).hits for name in (hot,)
    }
    result = vp.search("gamma delta", [hot, frozen, gone], k=20)
    tiers = {h.collection: h.source_tier for h in result.hits}
    assert set(tiers.items()) == {(hot, "active"), (frozen, "cold")}
    assert [h.score for h in result.hits] == sorted((h.score for h in result.hits), reverse=True)
    assert result.stats["merge"] == "score"
    assert result.stats["tiers"]["active"]["collections"] == 1 and result.stats["tiers"]["cold"]["collections"] == 1
    assert any(gone in w and "archived" in w for w in result.warnings)
    hot_hits = [h.chunk_id for h in result.hits if h.collection == hot]
    assert hot_hits == [h.chunk_id for h in exact[hot]][: len(hot_hits)]
    with pytest.raises(AllArchived, match=gone):
        vp.search("gamma", [gone])


def test_cold_filters_mean_what_jsonb_containment_means(make_platform, pg_dsn, tmp_path):
    vp = make_platform()
    name = ingested(vp, tmp_path, n=200)
    cases = [{"odd": 1}, {"labels": ["x"]}, {"labels": "x"}, {"nested": {"n": 3}}, {"tag": "d", "odd": 0}, {"odd": True}, {"nested": {}}]
    active = {json.dumps(f): vp.search("alpha beta", [name], k=15, filters=f, exact=True) for f in cases}
    assert vp.tier(name, "cold").success
    for f in cases:
        result = vp.search("alpha beta", [name], k=15, filters=f)
        expected = active[json.dumps(f)]
        assert [h.chunk_id for h in result.hits] == [h.chunk_id for h in expected.hits], f
    with pytest.raises(ValueError, match=r"unsupported filter operator '\$gt'"):
        vp.search("alpha", [name], filters={"odd": {"$gt": 0}})


@pytest.mark.parametrize(
    "doc, pattern",
    [
        ({"a": [1, 2, [3]]}, {"a": [1]}), ({"a": [1, 2, [3]]}, {"a": [[3]]}), ({"a": [1, 2, [3]]}, {"a": [3]}),
        ({"a": [1, 2]}, {"a": 1}), ([1, 2], 1), ([1, [2]], [2]), ({"a": 1}, {"a": 1.0}), ({"a": True}, {"a": 1}),
        ({"a": None}, {"a": None}), ({"a": {"b": [{"c": 1, "d": 2}]}}, {"a": {"b": [{"c": 1}]}}), ({"a": "1"}, {"a": 1}),
        ({"a": []}, {"a": []}), ({"a": [1]}, {"a": []}), ({}, {}), ({"a": {"b": 1}}, {"a": {"b": 1, "c": 2}}),
    ],
)
def test_containment_agrees_with_postgres(pg_dsn, doc, pattern):
    with psycopg.connect(pg_dsn) as conn:
        expected = conn.execute("SELECT %s::jsonb @> %s::jsonb", (json.dumps(doc), json.dumps(pattern))).fetchone()[0]
    assert filter_language.contains(doc, pattern) is expected


def test_store_failing_during_the_snapshot_leaves_the_collection_active(make_platform, pg_dsn, tmp_path, s3_url):
    vp = make_platform(store_url=s3_url)
    name = ingested(vp, tmp_path, n=120)
    broken = make_platform(store_url=s3_url.replace("s3://", "s3://no-such-bucket-").split("/platform")[0] + "/x")
    run = broken.tier(name, "cold")
    assert not run.success and "bucket" in run.error.lower()
    assert vp.collection(name).tier == "active"
    _, exists, index = table_of(pg_dsn, name)
    assert exists and index is not None
    assert {h.source_tier for h in vp.search("alpha", [name]).hits} == {"active"}
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM vector_platform.snapshots WHERE collection = %s", (name,)).fetchone()[0] == 0
    assert events(pg_dsn, name) == []
    # The same move on the working store succeeds, over HTTP.
    assert vp.tier(name, "cold").success
    result = vp.search("alpha", [name])
    assert result.hits and {h.source_tier for h in result.hits} == {"cold"}


def test_a_corrupted_byte_is_never_served(make_platform, pg_dsn, tmp_path):
    vp = make_platform()
    name = ingested(vp, tmp_path, n=150)
    assert vp.tier(name, "cold").success
    parts = sorted((tmp_path / "objects" / "collections" / name / "snapshots").rglob("*.parquet"))
    assert parts
    data = bytearray(parts[0].read_bytes())
    data[len(data) // 2] ^= 0x01
    parts[0].write_bytes(bytes(data))
    cold_cache.forget()
    for folder in cold_cache.root.glob("*/*"):
        import shutil

        shutil.rmtree(folder)
    other = ingested(vp, tmp_path, n=50, tag="o")
    result = vp.search("alpha", [name, other], k=5)
    assert {h.collection for h in result.hits} == {other}
    assert any(name in w and "checksum" in w for w in result.warnings), result.warnings
    run = vp.tier(name, "active")
    assert not run.success and "checksum" in run.error
    assert vp.collection(name).tier == "cold"


def test_searches_never_fail_or_come_back_empty_during_moves(make_platform, pg_dsn, tmp_path):
    vp = make_platform()
    name = ingested(vp, tmp_path, n=400)
    stop = threading.Event()
    seen = {"searches": 0, "errors": [], "empty": 0, "tiers": set()}

    def loop():
        while not stop.is_set():
            try:
                result = vp.search("gamma delta", [name], k=5)
                seen["searches"] += 1
                if not result.hits:
                    seen["empty"] += 1
                seen["tiers"] |= {h.source_tier for h in result.hits}
            except Exception as err:  # noqa: BLE001 - counted, and the test fails on any
                seen["errors"].append(repr(err))

    threads = [threading.Thread(target=loop) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for target in ("cold", "active", "cold", "active"):
            run = vp.tier(name, target)
            assert run.success, run.error
            time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert seen["errors"] == [] and seen["empty"] == 0
    assert seen["tiers"] == {"active", "cold"} and seen["searches"] > 20


def test_an_interrupted_restore_resumes_where_it_stopped(make_platform, pg_dsn, tmp_path, monkeypatch):
    from vector_platform import faults
    from vector_platform.tiers import moves

    vp = make_platform()
    name = ingested(vp, tmp_path, n=200)
    assert vp.tier(name, "cold").success
    table, _, _ = table_of(pg_dsn, name)

    class Interrupted(Exception):
        pass

    def interrupt(point):
        if point == "rehydrate.after_first_batch":
            raise Interrupted

    monkeypatch.setattr(moves, "RESTORE_BATCH_ROWS", 50)
    monkeypatch.setattr(faults, "point", interrupt)
    with pytest.raises(Interrupted):
        moves.move(vp.pool(), vp.store(), name, "active", work_dir=tmp_path / "restore")
    monkeypatch.undo()
    count = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier("vp_vectors", table))
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute(count).fetchone()[0] == 50
    assert vp.collection(name).tier == "cold"
    assert {h.source_tier for h in vp.search("alpha", [name]).hits} == {"cold"}
    run = vp.tier(name, "active")  # resumes after the 50 rows already restored
    assert run.success, run.error
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute(count).fetchone()[0] == run.metadata["rehydrate_collection"]["rows"] > 50
