"""The embedding cache against the real catalog and both object stores: what a lookup reads,
what compaction keeps, and that it never deletes a file a running lookup may be reading."""

import threading

import numpy as np
import pytest

from vector_platform import catalog, db, locks
from vector_platform.catalog import cache_index
from vector_platform.ingest import embedding_cache
from vector_platform.object_store import ObjectStore


@pytest.fixture
def pool(pg_dsn):
    pool = db.get_pool(pg_dsn)
    with pool.connection() as conn:
        catalog.bootstrap(conn)
    return pool


class CountingStore(ObjectStore):
    """An object store that counts the files opened for reading."""

    opened: list

    def open_input(self, key):
        self.opened.append(key)
        return super().open_input(key)


def _store(url):
    base = ObjectStore.from_url(url)
    store = CountingStore(base.fs, base.root, base.url)
    store.opened = []
    return store


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_lookup_reads_only_the_files_that_hold_what_it_asks_for(kind, tmp_path, request, pool, unique_name):
    url = (tmp_path / "store").as_uri() if kind == "file" else request.getfixturevalue("s3_url")
    store = _store(url)
    store.put_bytes("a/b.bin", b"hello")
    assert store.get_bytes("a/b.bin") == b"hello" and store.list("a") == ["a/b.bin"]
    with pytest.raises(ValueError):
        store.path("../escape")
    fingerprint = f"fp_{unique_name}"
    rng = np.random.default_rng(0)
    written = {}
    for part in range(20):
        hashes = [f"{unique_name}-{part}-{i}" for i in range(5)]
        vectors = rng.standard_normal((5, 8)).astype(np.float32)
        embedding_cache.write(pool, store, fingerprint, hashes, vectors)
        written.update(zip(hashes, vectors))
    wanted = [f"{unique_name}-3-1", f"{unique_name}-3-4", f"{unique_name}-17-0", "missing"]
    found = embedding_cache.lookup(pool, store, fingerprint, wanted)
    assert set(found) == set(wanted[:3])
    for h in found:
        np.testing.assert_array_equal(found[h], written[h])
    assert len(store.opened) == 2  # two files of twenty
    assert embedding_cache.cached(pool, store, fingerprint, wanted) == set(wanted[:3])
    assert embedding_cache.cached_count(pool, store, fingerprint) == 100
    # Another model's cache never answers for this one, even for the same content.
    assert embedding_cache.lookup(pool, store, "other_fingerprint", wanted) == {}


def test_compaction_keeps_every_vector_and_waits_for_readers_before_deleting(tmp_path, pool, unique_name):
    store = _store((tmp_path / "store").as_uri())
    fingerprint = f"fp_{unique_name}"
    rng = np.random.default_rng(1)
    written = {}
    for part in range(6):
        hashes = [f"h{part}{i}" for i in range(3)]
        vectors = rng.standard_normal((3, 4)).astype(np.float32)
        embedding_cache.write(pool, store, fingerprint, hashes, vectors)
        written.update(zip(hashes, vectors))
    assert embedding_cache.compact(pool, store, fingerprint, max_files=10) == 0

    # A lookup in flight (it holds the readers' lock) while compaction runs.
    reading = threading.Event()
    release = threading.Event()

    def slow_reader():
        with pool.connection() as conn, locks.cache_readers(conn, fingerprint):
            reading.set()
            release.wait(30)

    reader = threading.Thread(target=slow_reader)
    reader.start()
    reading.wait(10)
    before = set(store.list(embedding_cache.prefix(fingerprint)))
    assert embedding_cache.compact(pool, store, fingerprint, max_files=2) == 6
    after = set(store.list(embedding_cache.prefix(fingerprint)))
    assert before <= after and len(after) == 7  # merged file written, nothing deleted under the reader
    release.set()
    reader.join()

    found = embedding_cache.lookup(pool, store, fingerprint, written)
    assert set(found) == set(written)
    for h, v in written.items():
        np.testing.assert_array_equal(found[h], v)
    with pool.connection() as conn:
        assert len(cache_index.live_files(conn, store.url, fingerprint)) == 1
    # With no reader left, the next compaction deletes the retired files.
    embedding_cache.compact(pool, store, fingerprint, max_files=2)
    assert len(store.list(embedding_cache.prefix(fingerprint))) == 1
    assert set(embedding_cache.lookup(pool, store, fingerprint, written)) == set(written)


def test_a_regional_cache_on_another_store_is_shared_by_fingerprint_and_never_beside_the_snapshots(
        make_platform, s3_url, tmp_path, monkeypatch, unique_name):
    """VP_EMBEDDING_CACHE: the cache in the workers' region (here an S3 bucket) while snapshots
    and archives stay on the main store (here a folder); another region's cache (another
    folder) fills itself from the same model, and both hold the same vectors."""
    from psycopg import sql

    from vector_platform import tables

    from . import upgrade_data as data
    from .conftest import write_jsonl

    srv = data.server()
    try:
        docs = write_jsonl(tmp_path / "docs.jsonl", data.docs_with_judged(120))
        key = f"mini_{unique_name[-6:]}"

        def ingest_in(region_url: str, name: str) -> int:
            monkeypatch.setenv("VP_EMBEDDING_CACHE", region_url)
            vp = make_platform()
            vp.add_model(data.spec(key, srv))
            before = srv.counters.inputs
            vp.add_collection(name, docs, model=key)
            assert all(r.success for r in vp.ingest(name))
            return srv.counters.inputs - before

        region_a, region_b = s3_url + "/cache-a", (tmp_path / "region-b").as_uri()
        assert ingest_in(region_a, f"{unique_name}_a1") == 120  # embedded once, cached in region A
        assert ingest_in(region_a, f"{unique_name}_a2") == 0  # the same chunks in region A: from its cache
        assert ingest_in(region_b, f"{unique_name}_b1") == 120  # region B fills its own cache
        fingerprint = data.spec(key, srv).fingerprint
        assert ObjectStore.from_url(region_a).list(embedding_cache.prefix(fingerprint))
        assert ObjectStore.from_url(region_b).list(embedding_cache.prefix(fingerprint))
        assert not ObjectStore.from_url((tmp_path / "objects").as_uri()).list("embedding_cache")  # never on the main store
        vp = make_platform()
        with vp.pool().connection() as conn:
            def vectors(name):
                table = tables.table_id(catalog.vector_table_name(conn, name, key))
                return dict(conn.execute(sql.SQL("SELECT content_hash, embedding::text FROM {}").format(table)).fetchall())

            a1, b1 = vectors(f"{unique_name}_a1"), vectors(f"{unique_name}_b1")
        assert len(a1) == 120 and a1 == b1  # keyed by fingerprint: the regions agree vector for vector
    finally:
        srv.stop()
