"""Model upgrades on real SciFact vectors: a shadow table per collection, the quality gate,
the atomic swap under a running search loop, rollback, dual writes, fingerprints pinned, and
wide (3,072-d) and halfvec models indexed and searched through their index."""

import datetime as dt
import threading
import time

import numpy as np
import psycopg
import pytest
from pgvector.psycopg import register_vector
from psycopg import sql

from vector_platform import catalog, clock, tables
from vector_platform.catalog import tiers as tier_sql
from vector_platform.catalog import upgrades as upgrade_sql
from vector_platform.metrics import recall_at_k
from vector_platform.search import active, flush_query_log
from vector_platform.upgrade.swap import SwapRefused

from . import upgrade_data as data
from .conftest import write_jsonl


@pytest.fixture(scope="module")
def servers():
    out = {
        "mini": data.server(),
        "rotated": data.server(space=data.rotation()),
        "rotated2": data.server(space=data.rotation(seed=7)),
        "random": data.server(space="random"),
    }
    yield out
    for srv in out.values():
        srv.stop()


def _models(vp, servers, suffix: str) -> dict[str, str]:
    keys = {}
    for name, srv in servers.items():
        key = f"{name}_{suffix}"
        vp.add_model(data.spec(key, srv))
        keys[name] = key
    return keys


def _ingested(vp, tmp_path, name: str, model: str, docs, **settings) -> None:
    vp.add_collection(name, write_jsonl(tmp_path / f"{name}.jsonl", docs), model=model, **settings)
    runs = vp.ingest(name)
    assert all(r.success for r in runs), [r.error for r in runs]


def test_upgrade_is_gated_swapped_under_search_and_rolled_back(make_platform, servers, tmp_path, unique_name):
    vp = make_platform()
    keys = _models(vp, servers, unique_name[-6:])
    name = unique_name
    _ingested(vp, tmp_path, name, keys["mini"], data.docs_with_judged(700))
    stored = vp.set_qrels(name, data.SCIFACT)  # the BEIR folder: queries.jsonl + qrels/test.tsv
    assert stored[0] >= 300
    texts = list(data.queries().values())[:40]
    before = {q: [h.doc_id for h in vp.search(q, [name]).hits] for q in texts[:20]}  # logged: the gate's real queries
    flush_query_log(vp.pool())
    mini_fp = data.spec(keys["mini"], servers["mini"]).fingerprint

    stop, errors, empties, seen = threading.Event(), [], [], []

    def search_loop():
        i = 0
        while not stop.is_set():
            try:
                result = vp.search(texts[i % len(texts)], [name], k=10)
                if not result.hits:
                    empties.append(texts[i % len(texts)])
                seen.append({(h.model, h.fingerprint) for h in result.hits})
            except Exception as err:  # noqa: BLE001 - counted, the test fails on any
                errors.append(repr(err))
            i += 1

    loop = threading.Thread(target=search_loop)
    loop.start()
    try:
        outcome = vp.upgrade([name], keys["rotated"], say=lambda m: None)
    finally:
        stop.set()
        loop.join(30)

    [run] = outcome.runs
    assert run.success, run.error
    assert run.checks["shadow_passes_quality_gate"] is True
    assert outcome.refused == {} and outcome.swaps[name]["to_model"] == keys["rotated"]
    assert errors == [] and empties == []
    assert all(len(models) == 1 for models in seen)  # never two models in one answer
    assert len(seen) > 20 and {m for s in seen for m, _ in s} == {keys["mini"], keys["rotated"]}

    rotated_fp = data.spec(keys["rotated"], servers["rotated"]).fingerprint
    after = vp.search(texts[0], [name])
    assert {(h.model, h.fingerprint) for h in after.hits} == {(keys["rotated"], rotated_fp)}
    # The rotation keeps every cosine: the same documents come back, so the query was embedded
    # by the new model for the new table (a MiniLM query against rotated vectors finds noise).
    for q, docs in before.items():
        assert [h.doc_id for h in vp.search(q, [name]).hits][:5] == docs[:5]

    status = {c["name"]: c for c in vp.status()["collections"]}[name]
    gate = status["upgrade"]["gates"][keys["rotated"]]
    assert gate["passed"] and gate["figures"]["recall"] >= 0.95 and gate["figures"]["logged_queries"] >= 20
    assert abs(gate["figures"]["ndcg_shadow"] - gate["figures"]["ndcg_serving"]) < 0.01
    assert gate["figures"]["ndcg_serving"] > 0.5 and gate["figures"]["overlap_at_10"] > 0.9
    assert status["serving_model"] == keys["rotated"] and status["upgrade"]["previous_model"] == keys["mini"]

    # Dual write: a new document lands in both models' tables.
    docs = data.docs_with_judged(700) + data.docs_with_judged(701)[-1:]
    write_jsonl(tmp_path / f"{name}.jsonl", docs)
    runs = vp.ingest(name)
    assert all(r.success for r in runs), [r.error for r in runs]
    status = {c["name"]: c for c in vp.status()["collections"]}[name]
    assert status["tables"][keys["mini"]]["rows"] == status["tables"][keys["rotated"]]["rows"] == 701

    vp.rollback(name)
    back = vp.search(texts[0], [name])
    assert {h.model for h in back.hits} == {keys["mini"]} and back.hits[0].fingerprint == mini_fp
    status = {c["name"]: c for c in vp.status()["collections"]}[name]
    assert [s["kind"] for s in status["upgrade"]["swaps"]] == ["rollback", "swap"]
    assert status["upgrade"]["previous_model"] == keys["rotated"]  # the rollback can itself be undone

    # Retention: nothing is retired early; past retain_previous_days the previous table goes.
    assert vp.retire_previous_models() == []
    try:
        clock.set_now(dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=8))
        assert (name, keys["rotated"]) in vp.retire_previous_models()
    finally:
        clock.set_now(None)
    status = {c["name"]: c for c in vp.status()["collections"]}[name]
    assert status["models"] == [keys["mini"]] and keys["rotated"] not in status["tables"]
    with pytest.raises(SwapRefused, match="nothing to roll back"):
        vp.rollback(name)
    assert vp.search(texts[1], [name]).hits  # still serving


def test_vectors_stay_pinned_to_their_model_and_a_swap_never_holds_up_searches(make_platform, servers, tmp_path, unique_name):
    """Raw query vectors say which model made them (`fingerprint`): a collection serving another
    model is refused, even with equal dimensions and across a swap. The swap waits for a long
    search without making the searches that arrive meanwhile wait; an ingest that changes
    nothing does not touch the serving view at all; documents ingested while the shadow waits
    for its swap reach both models' tables."""
    vp = make_platform()
    keys = _models(vp, servers, unique_name[-6:])
    name = unique_name
    _ingested(vp, tmp_path, name, keys["mini"], data.docs_with_judged(400))
    mini_fp = data.spec(keys["mini"], servers["mini"]).fingerprint
    rotated_fp = data.spec(keys["rotated"], servers["rotated"]).fingerprint
    text = list(data.queries().values())[0]
    mini_vec, rotated_vec = servers["mini"].vector(text), servers["rotated"].vector(text)

    outcome = vp.upgrade([name], keys["rotated"], swap=False, say=lambda m: None)
    assert outcome.runs[0].success, outcome.runs[0].error
    write_jsonl(tmp_path / f"{name}.jsonl", data.docs_with_judged(401))  # dual write before the swap
    assert all(r.success for r in vp.ingest(name))
    status = {c["name"]: c for c in vp.status()["collections"]}[name]
    assert status["tables"][keys["mini"]]["rows"] == status["tables"][keys["rotated"]]["rows"] == 401

    pinned = vp.search(vector=mini_vec, collections=[name], fingerprint=mini_fp)
    assert pinned.hits and {h.fingerprint for h in pinned.hits} == {mini_fp}
    refused = vp.search(vector=rotated_vec, collections=[name], fingerprint=rotated_fp)
    assert refused.hits == [] and "refused" in refused.warnings[0] and rotated_fp in refused.warnings[0]
    with pytest.raises(ValueError, match="fingerprint must be"):
        vp.search(vector=mini_vec, collections=[name], fingerprint=keys["mini"])

    # A long search holds the serving view (an open transaction that read it); the swap waits
    # for it, and searches arriving meanwhile are answered at once, by the old model.
    dsn = vp.postgres.resolved_dsn()
    reader = psycopg.connect(dsn)
    reader.execute(sql.SQL("SELECT count(*) FROM {}").format(tables.view_id(name))).fetchone()
    swapped: list = []
    swap = threading.Thread(target=lambda: swapped.append(vp.swap(name, keys["rotated"])))
    release = threading.Timer(2.5, reader.rollback)
    began = time.monotonic()
    swap.start()
    release.start()
    try:
        latencies = []
        while time.monotonic() - began < 2.0:
            t = time.perf_counter()
            answer = vp.search(vector=mini_vec, collections=[name], fingerprint=mini_fp)
            latencies.append(time.perf_counter() - t)
            assert {h.fingerprint for h in answer.hits} == {mini_fp}
        assert swap.is_alive()  # still waiting for the long search
        assert len(latencies) > 20 and max(latencies) < 1.0, max(latencies)
        swap.join(60)
    finally:
        release.join()
    assert swapped and swapped[0].success, swapped and swapped[0].error
    after = vp.search(vector=mini_vec, collections=[name], fingerprint=mini_fp)
    assert after.hits == [] and "refused" in after.warnings[0]  # not ranked against the new model
    fresh = vp.search(vector=rotated_vec, collections=[name], fingerprint=rotated_fp)
    assert fresh.hits and {h.fingerprint for h in fresh.hits} == {rotated_fp}

    # An ingest that changes nothing leaves the view alone: it does not wait for a long search.
    reader.execute(sql.SQL("SELECT count(*) FROM {}").format(tables.view_id(name))).fetchone()
    try:
        ingest = threading.Thread(target=lambda: swapped.append(vp.ingest(name)))
        ingest.start()
        ingest.join(60)
        assert not ingest.is_alive()
        assert all(r.success for r in swapped[-1])
    finally:
        reader.close()


def test_a_bad_model_fails_the_gate_and_the_old_model_keeps_serving(make_platform, servers, tmp_path, unique_name):
    vp = make_platform()
    keys = _models(vp, servers, unique_name[-6:])
    name = unique_name
    _ingested(vp, tmp_path, name, keys["mini"], data.docs_with_judged(500))
    vp.set_qrels(name, data.SCIFACT / "qrels" / "test.tsv")  # a qrels file: queries.jsonl found one folder up
    outcome = vp.upgrade([name], keys["random"], say=lambda m: None)
    [run] = outcome.runs
    assert run.checks["shadow_passes_quality_gate"] is False and not run.success
    assert name in outcome.refused and "nDCG@10" in outcome.refused[name] and "failed" in outcome.refused[name]
    with pytest.raises(SwapRefused, match=r"quality gate .* failed .*nDCG@10 0\.\d+ trails"):
        vp.swap(name, keys["random"])
    result = vp.search("Cancer cells use glycolysis", [name])
    assert result.hits and {h.model for h in result.hits} == {keys["mini"]}
    with psycopg.connect(vp.postgres.resolved_dsn()) as conn:
        gate = upgrade_sql.latest_gate(conn, name, keys["random"])
        assert not gate.passed and gate.figures["ndcg_shadow"] < 0.2 < gate.figures["ndcg_serving"]
        assert upgrade_sql.upgrade_state(conn, name).serving_model == keys["mini"]
    with pytest.raises(SwapRefused, match="nothing to roll back"):
        vp.rollback(name)


def test_a_model_without_a_gate_result_is_never_swapped_in(make_platform, servers, tmp_path, unique_name):
    vp = make_platform()
    keys = _models(vp, servers, unique_name[-6:])
    _ingested(vp, tmp_path, unique_name, keys["mini"], data.docs_with_judged(400))
    vp.add_collection(unique_name, model=keys["rotated"])  # attached by hand: no upgrade, no gate yet
    with pytest.raises(SwapRefused, match="no quality gate result"):
        vp.swap(unique_name, keys["rotated"])
    with pytest.raises(SwapRefused, match="not attached"):
        vp.swap(unique_name, keys["random"])


def test_wide_and_halfvec_models_are_indexed_and_searched_through_their_index(make_platform, tmp_path, unique_name):
    wide_server = data.server(space=data.rotation(384, 3072, seed=5), dims=3072)
    plain_server = data.server()
    try:
        vp = make_platform()
        suffix = unique_name[-6:]
        served_by = {"vector": plain_server, "halfvec": plain_server, "wide": wide_server}
        specs = {
            "vector": data.spec(f"vec_{suffix}", plain_server),
            "halfvec": data.spec(f"half_{suffix}", plain_server, storage_type="halfvec"),
            "wide": data.spec(f"wide_{suffix}", wide_server, dims=3072),
        }
        docs = data.docs_with_judged(800)
        for kind, spec in specs.items():
            vp.add_model(spec)
            # A small ef_search, so that HNSW misses a few neighbours and the comparison means something.
            _ingested(vp, tmp_path, f"{unique_name}_{kind}", spec.key, docs, hnsw_ef_search=12)
        assert specs["wide"].index_type == "halfvec" and specs["halfvec"].index_type == "halfvec"
        queries = list(data.queries().values())[:100]
        recalls = {}
        with psycopg.connect(vp.postgres.resolved_dsn(), autocommit=True) as conn:
            register_vector(conn)
            for kind, spec in specs.items():
                name = f"{unique_name}_{kind}"
                table = catalog.vector_table_name(conn, name, spec.key)
                indexdef = conn.execute(
                    "SELECT pg_get_indexdef(i.indexrelid) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                    "WHERE c.relname = %s", (tables.index_name(table),)).fetchone()[0]
                assert ("::halfvec(3072)" in indexdef) == (kind == "wide") and "hnsw" in indexdef
                q = np.asarray(vp.embed_query(spec, queries[0]), np.float32)
                plan = active.explain_nearest(conn, tables.view_id(name), spec, q / np.linalg.norm(q), exact=False,
                                              fingerprint=spec.fingerprint)
                assert "Index Scan using" in plan and tables.index_name(table) in plan, plan
                recall = []
                for text in queries:
                    vector = served_by[kind].vector(text)  # what the model's server answers for the text
                    ann = vp.search(vector=vector, collections=[name], k=10)
                    assert ann.stats["exact_fallback"] == []
                    exact = vp.search(vector=vector, collections=[name], k=10, exact=True)
                    assert [h.fingerprint for h in ann.hits] == [spec.fingerprint] * 10
                    recall.append(recall_at_k([h.chunk_id for h in ann.hits], [h.chunk_id for h in exact.hits]))
                    if kind == "wide":  # ANN orders through halfvec, but scores at full precision, as exact does
                        exact_scores = {h.chunk_id: h.score for h in exact.hits}
                        for h in ann.hits:
                            if h.chunk_id in exact_scores:
                                assert abs(h.score - exact_scores[h.chunk_id]) < 1e-6
                recalls[kind] = float(np.mean(recall))
        print(f"recall@10 at ef_search 12: {recalls}")
        assert 0.8 <= recalls["vector"] < 1.0 and recalls["wide"] >= 0.8
        assert recalls["halfvec"] >= recalls["vector"] - 0.01
    finally:
        wide_server.stop()
        plain_server.stop()


def test_qrels_files_are_checked_before_anything_is_stored(make_platform, tmp_path, unique_name, servers):
    vp = make_platform()
    keys = _models(vp, {"mini": servers["mini"]}, unique_name[-6:])
    vp.add_collection(unique_name, write_jsonl(tmp_path / "d.jsonl", data.docs_with_judged(10)), model=keys["mini"])
    (tmp_path / "queries.jsonl").write_text('{"_id": "q1", "text": "what is it"}\n', encoding="utf-8")
    bad = tmp_path / "bad.tsv"
    bad.write_text("query-id\tcorpus-id\tscore\nq1\td1\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.tsv:2: expected"):
        vp.set_qrels(unique_name, bad)
    cut = tmp_path / "cut.tsv"  # a file cut mid-line and appended to: a 3-column line with a wild score
    cut.write_text("q1\td1\t1\nq1\td2\t14983\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"cut.tsv:2: score 14983 is over 10"):
        vp.set_qrels(unique_name, cut)
    good = tmp_path / "good.tsv"
    good.write_text("query-id\tcorpus-id\tscore\nq1\td1\t2\nq9\td2\t1\n", encoding="utf-8")
    assert vp.set_qrels(unique_name, good) == (1, 1)  # q9 has no text: left out
    with psycopg.connect(vp.postgres.resolved_dsn()) as conn:
        assert upgrade_sql.labelled_queries(conn, unique_name) == [("q1", "what is it", {"d1": 2})]
    with pytest.raises(FileNotFoundError):
        vp.set_qrels(unique_name, tmp_path / "missing.tsv")


def test_a_cold_collection_is_upgraded_from_its_snapshot_and_stays_cold(make_platform, servers, tmp_path, unique_name):
    vp = make_platform()
    keys = _models(vp, servers, unique_name[-6:])
    name = unique_name
    _ingested(vp, tmp_path, name, keys["mini"], data.docs_with_judged(400))
    vp.set_qrels(name, data.SCIFACT)
    texts = list(data.queries().values())[:15]
    before = {q: [h.doc_id for h in vp.search(q, [name]).hits] for q in texts}
    assert vp.tier(name, "cold").success
    (tmp_path / f"{name}.jsonl").unlink()  # the upgrade must not need the source
    mini_fp = data.spec(keys["mini"], servers["mini"]).fingerprint
    rotated_fp = data.spec(keys["rotated"], servers["rotated"]).fingerprint

    def state():
        return {c["name"]: c for c in vp.status()["collections"]}[name]

    old_snapshot = next(s for s in state()["snapshots"] if s["serving"])

    # A bad model: its snapshot is written, its gate fails, the collection keeps serving mini, cold.
    bad = vp.upgrade([name], keys["random"], say=lambda m: None)
    [run] = bad.runs
    assert run.checks["snapshot_passes_quality_gate"] is False and not run.success
    assert "nDCG@10" in bad.refused[name]
    assert {(h.model, h.source_tier) for h in vp.search(texts[0], [name]).hits} == {(keys["mini"], "cold")}
    vp.abandon_upgrade(name, keys["random"])  # given up: its snapshot no longer counts

    good = vp.upgrade([name], keys["rotated"], say=lambda m: None)
    [run] = good.runs
    assert run.success and run.checks["snapshot_passes_quality_gate"] is True, run.error
    assert run.checks["snapshot_matches_table"] is True  # the new snapshot read back in full
    assert good.swaps[name]["to_model"] == keys["rotated"] and good.refused == {}
    status = state()
    assert status["tier"] == "cold" and status["serving_model"] == keys["rotated"] and status["tables"] == {}
    serving = {s["model"]: s for s in status["snapshots"] if s["serving"]}
    assert set(serving) == {keys["mini"], keys["rotated"]}  # the old snapshot stays for rollback
    assert serving[keys["mini"]]["id"] == old_snapshot["id"] and serving[keys["rotated"]]["rows"] == old_snapshot["rows"]
    with psycopg.connect(vp.postgres.resolved_dsn()) as conn:
        new = tier_sql.get_snapshot(conn, serving[keys["rotated"]]["id"])
        old = tier_sql.get_snapshot(conn, old_snapshot["id"])
    assert new.manifest["fingerprint"] == rotated_fp and new.manifest["source_snapshot"] == old.id
    assert new.table_digest == old.table_digest  # the same rows, new vectors
    gate = status["upgrade"]["gates"][keys["rotated"]]
    assert gate["figures"]["search"] == "cold_exact" and gate["figures"]["ndcg_serving"] > 0.5
    assert abs(gate["figures"]["ndcg_shadow"] - gate["figures"]["ndcg_serving"]) < 0.01

    # Searched cold, with the new model's query encoder: the rotation keeps every cosine, so the
    # same documents come back only if the query was embedded by the new model too.
    for q, docs in before.items():
        hits = vp.search(q, [name]).hits
        assert {(h.source_tier, h.model, h.fingerprint) for h in hits} == {("cold", keys["rotated"], rotated_fp)}
        assert [h.doc_id for h in hits][:5] == docs[:5]

    mini_vec = servers["mini"].vector(texts[0])  # a vector made by the old model, pinned: refused, not compared
    pinned = vp.search(vector=mini_vec, collections=[name], fingerprint=mini_fp)
    assert pinned.hits == [] and "refused" in pinned.warnings[0]
    assert {h.fingerprint for h in vp.search(vector=servers["rotated"].vector(texts[0]), collections=[name],
                                             fingerprint=rotated_fp).hits} == {rotated_fp}

    vp.rollback(name)  # cold too: back to the old snapshot
    hits = vp.search(texts[0], [name]).hits
    assert {(h.model, h.fingerprint, h.snapshot_id) for h in hits} == {(keys["mini"], mini_fp, old.id)}
    vp.rollback(name)  # and undone

    # A second upgrade within the retention: one model is kept for rollback, the older one retires.
    again = vp.upgrade([name], keys["rotated2"], say=lambda m: None)
    assert again.swaps[name]["to_model"] == keys["rotated2"], again.refused
    status = state()
    assert set(status["models"]) == {keys["rotated"], keys["rotated2"]}  # mini retired: no longer written
    assert status["upgrade"]["previous_model"] == keys["rotated"]
    assert {s["model"] for s in status["snapshots"] if s["serving"]} == {keys["rotated"], keys["rotated2"]}
    vp.rollback(name)  # still cold: the snapshot made two upgrades ago holds the same rows
    assert {h.model for h in vp.search(texts[0], [name]).hits} == {keys["rotated"]}
    vp.rollback(name)
    with pytest.raises(ValueError, match="kept for rollback"):
        vp.upgrade([name], keys["rotated"], say=lambda m: None)

    assert vp.tier(name, "active").success  # rehydrated: both retained models' tables come back
    status = state()
    assert status["tier"] == "active" and set(status["tables"]) == {keys["rotated"], keys["rotated2"]}
    assert status["tables"][keys["rotated"]]["fingerprint"] == rotated_fp
    hits = vp.search(texts[0], [name]).hits
    assert {(h.source_tier, h.model) for h in hits} == {("active", keys["rotated2"])}
    assert [h.doc_id for h in hits][:5] == before[texts[0]][:5]
    vp.rollback(name)
    assert {h.model for h in vp.search(texts[0], [name]).hits} == {keys["rotated"]}


def test_a_cold_upgrade_of_an_ivf_snapshot_is_gated_on_its_nearest_lists(make_platform, servers, tmp_path, unique_name,
                                                                        monkeypatch):
    """A cold collection whose snapshot has the IVF layout (a large one's: here the threshold is
    lowered) is upgraded into an IVF snapshot of the new model, and its gate searches both as
    cold search does, by their nearest lists, never loading either whole."""
    from vector_platform.search import cold_cache

    monkeypatch.setenv("VP_COLD_IVF_MIN_ROWS", "200")
    vp = make_platform()
    keys = _models(vp, {k: servers[k] for k in ("mini", "rotated", "random")}, unique_name[-6:])
    name = unique_name
    _ingested(vp, tmp_path, name, keys["mini"], data.docs_with_judged(400))
    assert vp.tier(name, "cold").success
    vp.set_settings(name, cold_nprobe=6)

    def serving_snapshot(model):
        (snap,) = [s for c in vp.status()["collections"] if c["name"] == name for s in c["snapshots"]
                   if s["serving"] and s["model"] == model]
        return snap

    assert serving_snapshot(keys["mini"])["layout"] == "ivf"
    cold_cache.forget()
    loaded = []
    original = cold_cache.get
    cold_cache.get = lambda *a, **kw: loaded.append(a) or original(*a, **kw)  # a whole-snapshot load
    try:
        good = vp.upgrade([name], keys["rotated"], say=lambda m: None)  # no query texts: stored vectors time both
        assert good.swaps[name]["to_model"] == keys["rotated"], good.refused
        new = serving_snapshot(keys["rotated"])
        assert new["layout"] == "ivf" and new["nprobe"] == 6 and new["rows"] == serving_snapshot(keys["mini"])["rows"]
        gate = {c["name"]: c for c in vp.status()["collections"]}[name]["upgrade"]["gates"][keys["rotated"]]
        assert gate["figures"]["search"] == "cold_pruned vs serving cold_pruned"
        assert gate["figures"]["quality_measured"] is False and gate["figures"]["p95_ms_shadow"] is not None
        hits = vp.search(list(data.queries().values())[0], [name]).hits
        assert hits and {(h.model, h.source_tier, h.exact) for h in hits} == {(keys["rotated"], "cold", False)}
        vp.rollback(name)

        vp.set_qrels(name, data.SCIFACT)  # labelled queries: the gate measures quality on the nearest lists
        bad = vp.upgrade([name], keys["random"], say=lambda m: None)
        assert not bad.runs[0].success and "nDCG@10" in bad.refused[name]
        gate = {c["name"]: c for c in vp.status()["collections"]}[name]["upgrade"]["gates"][keys["random"]]
        assert gate["figures"]["search"] == "cold_pruned vs serving cold_pruned" and gate["figures"]["ndcg_serving"] > 0.4
    finally:
        cold_cache.get = original
    assert loaded == []
