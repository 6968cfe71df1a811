"""Cold snapshots in the IVF layout (tiers/ivf.py) on the real SciFact vectors, over moto's S3:
rows grouped by k-means list, a query reads only the nearest lists' row groups (ranged reads,
checked against their digests) and labels its hits `exact: false`; `exact` still scans every
row; a rehydrate restores every row and resumes in list order after an interruption."""

import shutil

import numpy as np
import pytest
from psycopg import sql

from vector_platform import catalog, tables
from vector_platform.metrics import recall_at_k
from vector_platform.search import cold_cache, cold_ivf, ivf_cache
from vector_platform.tiers import ivf

from . import upgrade_data as data
from .conftest import write_jsonl
from .scifact import SCIFACT

ROWS = 5183


@pytest.fixture
def ivf_snapshots(monkeypatch):
    monkeypatch.setenv("VP_COLD_IVF_MIN_ROWS", "2000")  # SciFact's 5,183 rows get the layout a million would


def _cold_collection(vp, tmp_path, name, key):
    """Every SciFact abstract with its real vector (the test server answers them), ingested,
    then evicted to the cold tier; the receipt of its snapshot."""
    from vector_platform.catalog import tiers as tier_sql

    vp.add_collection(name, write_jsonl(tmp_path / "scifact.jsonl", data.docs_with_judged(ROWS)), model=key)
    assert all(r.success for r in vp.ingest(name))
    assert vp.tier(name, "cold").success
    with vp.pool().connection() as conn:
        return tier_sql.get_snapshot(conn, tier_sql.cold_snapshots(conn, name)[key])


def test_an_ivf_snapshot_is_searched_by_its_nearest_lists_and_restored_whole(
        make_platform, s3_url, tmp_path, unique_name, ivf_snapshots, server):
    vp = make_platform(store_url=s3_url)
    name, key = unique_name, f"mini_{unique_name[-6:]}"
    vp.add_model(data.spec(key, server))
    receipt = _cold_collection(vp, tmp_path, name, key)
    layout = receipt.manifest["ivf"]
    assert receipt.manifest["layout"] == "ivf" and layout["lists"] == ivf.lists_for(ROWS) == 72
    assert sum(entry[2] for entry in layout["directory"]) == receipt.rows == ROWS
    assert vp.store().get_bytes(layout["centroids"]["key"])  # the centroids are a file of the snapshot

    queries = np.load(SCIFACT / "queries_minilm.npy").astype(np.float32)[:100]
    recalls, scanned = [], []
    ivf_cache.forget()
    for i, q in enumerate(queries):
        pruned = vp.search(vector=q, collections=[name], k=10)
        exact = vp.search(vector=q, collections=[name], k=10, exact=True)
        assert pruned.hits and {h.source_tier for h in pruned.hits} == {"cold"}
        assert not any(h.exact for h in pruned.hits) and all(h.exact for h in exact.hits)
        stats = pruned.stats["tiers"]["cold"]
        scanned.append(stats["rows_scanned"])
        if i == 0:
            assert stats["data_from"][name] == "object_store"  # the probed lists' row groups, by ranged reads
        recalls.append(recall_at_k([h.chunk_id for h in pruned.hits], [h.chunk_id for h in exact.hits]))
        scores = {h.chunk_id: h.score for h in exact.hits}
        assert all(abs(h.score - scores[h.chunk_id]) < 1e-6 for h in pruned.hits if h.chunk_id in scores)
    print(f"IVF on SciFact: recall@10 {np.mean(recalls):.4f}, rows scanned per query {np.mean(scanned):.0f} of {ROWS}")
    assert np.mean(recalls) >= 0.95
    assert np.mean(scanned) < 0.6 * ROWS  # 30 of 72 lists (at a million rows: 30 of 1,000)
    again = vp.search(vector=queries[0], collections=[name], k=10)
    assert again.stats["tiers"]["cold"]["data_from"][name] == "memory"
    ivf_cache.forget()
    assert vp.search(vector=queries[0], collections=[name], k=10).stats["tiers"]["cold"]["data_from"][name] == "local_disk"

    # a list whose bytes differ from its receipt's digest is never served
    tampered = receipt.manifest["ivf"]["directory"][int(ivf.nearest_lists(
        ivf_cache.centroids(vp.store(), receipt), queries[1] / np.linalg.norm(queries[1]), "cosine", 1)[0])]
    good = tampered[3]
    try:
        tampered[3] = "0" * 64
        ivf_cache.forget()
        for folder in ivf_cache.folder(vp.store(), receipt).glob("list-*"):
            shutil.rmtree(folder)

        with pytest.raises(Exception, match="differs from its receipt"):
            cold_ivf.search(ivf_cache, vp.store(), receipt, _spec(vp, name), queries[1] / np.linalg.norm(queries[1]),
                            10, None, (None, None), 0)
    finally:
        tampered[3] = good

    # more lists probed: more rows read, and recall at least as high
    vp.set_settings(name, cold_nprobe=48)
    from vector_platform.search import runtime

    runtime(vp.pool()).facts.invalidate(name)
    wider = vp.search(vector=queries[0], collections=[name], k=10)
    assert wider.stats["tiers"]["cold"]["rows_scanned"] > scanned[0]

    # back to active: every row restored, in list order, and resumable
    from vector_platform import faults
    from vector_platform.tiers import moves

    class Interrupted(Exception):
        pass

    def interrupt(point):
        if point == "rehydrate.after_first_batch":
            raise Interrupted

    original_rows, original_point = moves.RESTORE_BATCH_ROWS, faults.point
    moves.RESTORE_BATCH_ROWS, faults.point = 1000, interrupt
    try:
        with pytest.raises(Interrupted):
            moves.move(vp.pool(), vp.store(), name, "active", work_dir=tmp_path / "restore")
    finally:
        moves.RESTORE_BATCH_ROWS, faults.point = original_rows, original_point
    with vp.pool().connection() as conn:
        table = catalog.vector_table_name(conn, name, vp.collection(name).serving_model)
        count = sql.SQL("SELECT count(*) FROM {}").format(tables.table_id(table))
        assert conn.execute(count).fetchone()[0] == 1000
    run = vp.tier(name, "active")  # resumes after the first 1,000 rows of the snapshot's list order
    assert run.success, run.error
    with vp.pool().connection() as conn:
        assert conn.execute(count).fetchone()[0] == ROWS
    assert {h.source_tier for h in vp.search(vector=queries[0], collections=[name], k=10).hits} == {"active"}
    cold_cache.forget()


def _spec(vp, name):
    with vp.pool().connection() as conn:
        return catalog.get_model(conn, vp.collection(name).serving_model)


@pytest.fixture
def server():
    srv = data.server()
    yield srv
    srv.stop()


def test_k_means_lists_are_balanced_enough_and_deterministic():
    vectors = np.load(SCIFACT / "corpus_minilm.npy").astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    a = ivf.train(vectors, 72, "cosine", seed=3)
    b = ivf.train(vectors, 72, "cosine", seed=3)
    assert np.array_equal(a, b)
    labels = ivf.assign(vectors, a, "cosine")
    counts = np.bincount(labels, minlength=72)
    assert counts.min() > 0 and counts.max() < 10 * ROWS / 72
    # every vector's list is the one whose centroid is nearest
    assert np.array_equal(labels, np.argmax(vectors @ a.T, axis=1))
    first = ivf.nearest_lists(a, vectors[0], "cosine", 5)
    assert labels[0] == first[0] and len(set(first)) == 5
