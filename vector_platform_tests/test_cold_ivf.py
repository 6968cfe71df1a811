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

ROWS = 3000  # SciFact abstracts (every judged one first)
RARE_EVERY = 250  # documents with metadata {"rare": true}: 12 of them


@pytest.fixture
def ivf_snapshots(monkeypatch):
    monkeypatch.setenv("VP_COLD_IVF_MIN_ROWS", "2000")  # 3,000 SciFact rows get the layout a million would


def _cold_collection(vp, tmp_path, name, key):
    """Every SciFact abstract with its real vector (the test server answers them), ingested,
    then evicted to the cold tier; the receipt of its snapshot."""
    from vector_platform.catalog import tiers as tier_sql

    docs = data.docs_with_judged(ROWS)
    for doc in docs[::RARE_EVERY]:  # a dozen documents, in lists all over the snapshot
        doc["metadata"] = {"rare": True}
    vp.add_collection(name, write_jsonl(tmp_path / "scifact.jsonl", docs), model=key)
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
    assert receipt.manifest["layout"] == "ivf" and layout["lists"] == ivf.lists_for(ROWS) == 55
    assert sum(entry[2] for entry in layout["directory"]) == receipt.rows == ROWS
    assert vp.store().get_bytes(layout["centroids"]["key"])  # the centroids are a file of the snapshot
    (shown,) = [s for c in vp.status()["collections"] if c["name"] == name for s in c["snapshots"] if s["serving"]]
    assert (shown["layout"], shown["lists"], shown["nprobe"]) == ("ivf", 55, 30)  # 30 of 55: the default share

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
    assert np.mean(scanned) < 0.75 * ROWS  # 30 of 55 lists (at a million rows: 30 of 1,000)
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

    # A selective filter: the nearest 30 lists hold only some of the 12 matches, so the search
    # reads on until it has k. Before it, the list folders on disk are deleted while their
    # vectors stay in memory: the rows, opened only now, are read again from the store.
    ivf_cache.forget()
    vp.search(vector=queries[2], collections=[name], k=10)
    for folder in ivf_cache.folder(vp.store(), receipt).glob("list-*"):
        shutil.rmtree(folder)
    rare = vp.search(vector=queries[2], collections=[name], k=10, filters={"rare": True})
    rare_exact = vp.search(vector=queries[2], collections=[name], k=10, filters={"rare": True}, exact=True)
    assert len(rare_exact.hits) == 10 and all(h.metadata == {"rare": True} for h in rare.hits)
    assert [h.chunk_id for h in rare.hits] == [h.chunk_id for h in rare_exact.hits]
    assert rare.stats["tiers"]["cold"]["rows_scanned"] > scanned[2]
    assert not any("hold no more" in w for w in rare.warnings)
    every = vp.search(vector=queries[2], collections=[name], k=20, filters={"rare": True})
    assert len(every.hits) == len(docs_rare := range(0, ROWS, RARE_EVERY)) == 12
    assert every.stats["tiers"]["cold"]["rows_scanned"] == ROWS  # every list read: the snapshot holds no more
    assert all(h.exact for h in every.hits)  # every list was read: the answer is exact
    assert any("hold no more that match the filters" in w for w in every.warnings)

    # more lists probed: more rows read, and recall at least as high
    vp.set_settings(name, cold_nprobe=45)
    from vector_platform.search import runtime

    runtime(vp.pool()).facts.invalidate(name)
    wider = vp.search(vector=queries[0], collections=[name], k=10)
    assert wider.stats["tiers"]["cold"]["rows_scanned"] > scanned[0]
    (shown,) = [s for c in vp.status()["collections"] if c["name"] == name for s in c["snapshots"] if s["serving"]]
    assert (shown["id"], shown["layout"], shown["lists"], shown["nprobe"]) == (receipt.id, "ivf", 55, 45)

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
    assert counts.min() > 0 and counts.max() < 10 * len(vectors) / 72
    # every vector's list is the one whose centroid is nearest
    assert np.array_equal(labels, np.argmax(vectors @ a.T, axis=1))
    first = ivf.nearest_lists(a, vectors[0], "cosine", 5)
    assert labels[0] == first[0] and len(set(first)) == 5


def _tiled(rows: int) -> np.ndarray:
    """The SciFact vectors tiled to `rows`, each tile perturbed and re-normalised."""
    base = np.load(SCIFACT / "corpus_minilm.npy").astype(np.float32)
    tiles = [base if t == 0 else base + np.random.default_rng(t).normal(0, 0.02, base.shape).astype(np.float32)
             for t in range(-(-rows // len(base)))]
    out = np.vstack(tiles)[:rows]
    return out / np.linalg.norm(out, axis=1, keepdims=True)


SEARCH_IN_A_FRESH_PROCESS = """
import json, sys
import numpy as np
import psutil
from vector_platform import db
from vector_platform.catalog import tiers as tier_sql
from vector_platform.models import MINILM
from vector_platform.object_store import ObjectStore
from vector_platform.search import cold_ivf
dsn, store_url, snapshot, queries = sys.argv[1], sys.argv[2], int(sys.argv[3]), np.load(sys.argv[4])
with db.get_pool(dsn).connection() as conn:
    receipt = tier_sql.get_snapshot(conn, snapshot)
store = ObjectStore.from_url(store_url)
cache = cold_ivf.IvfCache()
me = psutil.Process()
answers, rss = [], []
for q in queries:  # RSS read after every query (ru_maxrss would carry the parent's peak over exec)
    answers.append([row["chunk_id"] for _, row in cold_ivf.search(cache, store, receipt, MINILM, q, 10, None, (None, None), 0).found])
    rss.append(me.memory_info().rss)
print(json.dumps({"answers": answers, "rss": rss}))
"""


def test_a_million_row_cold_snapshot_is_searched_in_bounded_memory(make_platform, tmp_path, unique_name):
    """A 1,000,000-row snapshot (1.43 GiB of vectors: the SciFact vectors tiled and perturbed)
    searched by 100 queries in a fresh process whose list cache may hold 32 MiB: its RSS stays
    far below the vectors' size while most of them pass through, and recall@10 against numpy's
    exact answer is at least 0.95 at the default nprobe."""
    import datetime as dt
    import json
    import os
    import subprocess
    import sys
    import uuid

    import pyarrow as pa

    from vector_platform.models import MINILM
    from vector_platform.tiers import snapshots

    rows = 1_000_000
    vectors = _tiled(rows)
    vp = make_platform()
    name = unique_name
    vp.add_collection(name, write_jsonl(tmp_path / "empty.jsonl", []))
    with vp.pool().connection() as conn:
        coll = catalog.get_collection(conn, name)
    schema = snapshots.arrow_schema(384)
    now = dt.datetime(2026, 11, 25, tzinfo=dt.timezone.utc)

    def pages():
        for start in range(0, rows, 20_000):
            n = min(20_000, rows - start)
            columns = [[str(uuid.UUID(int=start + i + 1)) for i in range(n)], [f"d{start + i}" for i in range(n)], [0] * n,
                       [f"h{start + i}" for i in range(n)], [f"text {start + i}" for i in range(n)], ["{}"] * n, [None] * n, [now] * n]
            arrays = [pa.array(v, type=schema.field(i).type) for i, v in enumerate(columns)]
            arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(vectors[start:start + n].reshape(-1)), 384))
            yield pa.Table.from_arrays(arrays, schema=schema)

    manifest = snapshots.new_manifest(coll, MINILM, "generated", MINILM.fingerprint)
    receipt = snapshots.publish(vp.pool(), vp.store(), manifest, pages(), MINILM, expected_rows=rows,
                                finish=lambda m: m.update(table_digest="generated"), ivf_work_dir=tmp_path / "spill")
    assert receipt.manifest["layout"] == "ivf" and receipt.manifest["ivf"]["lists"] == ivf.lists_for(rows)
    assert not (tmp_path / "spill").exists()  # the spilled pages are gone once written

    queries = np.load(SCIFACT / "queries_minilm.npy").astype(np.float32)[:100]
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    np.save(tmp_path / "queries.npy", queries)
    env = {**os.environ, "VP_HOME": str(tmp_path / "fresh"), "VP_COLD_MEMORY_BYTES": str(32 * 2**20)}
    done = subprocess.run([sys.executable, "-c", SEARCH_IN_A_FRESH_PROCESS, vp.postgres.resolved_dsn(), vp.store().url,
                           str(receipt.id), str(tmp_path / "queries.npy")], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    # after the first query (imports, allocator pools), RSS stays within the caches' budget:
    # the lists read (30 a query, 100 queries: 3,000 list reads of 1,000 lists) come and go
    first, peak = out["rss"][0], max(out["rss"])
    print(f"1M-row IVF snapshot: RSS {first / 2**20:.0f} MiB after the first query, at most {peak / 2**20:.0f} MiB "
          f"over 100 queries ({vectors.nbytes / 2**20:.0f} MiB of vectors)")
    assert peak - first < 256 * 2**20
    assert peak < 0.4 * vectors.nbytes
    truth = np.vstack([_top10(queries[at:at + 10] @ vectors.T) for at in range(0, len(queries), 10)])
    recall = np.mean([recall_at_k([uuid.UUID(c).int - 1 for c in answer], list(t)) for answer, t in zip(out["answers"], truth)])
    print(f"recall@10 at the default nprobe: {recall:.4f}")
    assert recall >= 0.95


def _top10(scores: np.ndarray) -> np.ndarray:
    """Per row, the indices of the 10 highest scores, highest first."""
    top = np.argpartition(-scores, 9, axis=1)[:, :10]
    return np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1), axis=1)


KILLED_WRITER = """
import sys, time
from pathlib import Path
from vector_platform.tiers import ivf
partitioner = ivf.Partitioner(Path(sys.argv[1]), "cosine", 100_000)
(Path(sys.argv[1]) / "run-000000.arrow").write_bytes(b"spilled pages")
print("ready", flush=True)
time.sleep(600)
"""


def test_spill_folders_of_killed_snapshot_writes_are_removed_by_the_next_write(tmp_path, monkeypatch):
    """A snapshot write killed mid-way leaves its spilled pages under $VP_HOME; the next IVF
    write removes them, and never the folder of a write still running."""
    import os
    import subprocess
    import sys
    import time

    from vector_platform.tiers import snapshots

    monkeypatch.setenv("VP_HOME", str(tmp_path / "home"))
    root = tmp_path / "home" / "cache" / "snapshot-spill"
    killed = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(root / "killed")], stdout=subprocess.PIPE, text=True)
    try:
        assert killed.stdout.readline().strip() == "ready"
    finally:
        killed.kill()
        killed.wait()
    running = ivf.Partitioner(root / "running", "cosine", 100_000)
    unclaimed = root / "left-by-an-older-version"
    unclaimed.mkdir()
    os.utime(unclaimed, (time.time() - 7200, time.time() - 7200))
    try:
        assert (root / "killed" / "run-000000.arrow").exists()
        where = snapshots.spill_dir({"prefix": "collections/c/snapshots/m/1"})
        assert where.parent == root
        assert not (root / "killed").exists() and not unclaimed.exists()
        assert (root / "running").is_dir()  # its writer holds the claim
    finally:
        running.close()
    assert not (root / "running").exists()
