"""One writer at a time: two ingests at once, ingest + replay, and kills in the middle of
chunks and of vector_table. Each ends in the state one clean ingest gives."""

import os
import signal
import subprocess
import sys
import threading
import time

import psycopg
from psycopg import sql

from vector_platform import catalog

from .conftest import write_jsonl


def _docs(n, poison=()):
    docs = []
    for i in range(n):
        text = " ".join(f"term{(i * 13 + j) % 211}" for j in range(120))
        if i in poison:
            text += " POISON_NAN"
        docs.append({"id": f"doc{i:05d}", "text": text, "metadata": {"i": i}})
    return docs


def _spawn(pg_dsn, store, dagster_home, command, name, **env):
    return subprocess.Popen(
        [sys.executable, "-m", "vector_platform_tests.fake_ingest", pg_dsn, store, str(dagster_home), command, name],
        env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _state(pg_dsn, name):
    """What a user would compare: chunks, rows (and duplicates), vectors, open dead letters."""
    with psycopg.connect(pg_dsn) as conn:
        table = sql.Identifier("vp_vectors", catalog.vector_table_name(conn, name, "minilm_l6_v2"))
        chunks = conn.execute("SELECT count(*) FROM vector_platform.chunks WHERE collection = %s", (name,)).fetchone()[0]
        rows, distinct = conn.execute(sql.SQL("SELECT count(*), count(DISTINCT chunk_id) FROM {}").format(table)).fetchone()
        vectors = conn.execute(sql.SQL("SELECT md5(string_agg(chunk_id::text || embedding::text, ',' ORDER BY chunk_id)) FROM {}").format(table)).fetchone()[0]
        letters = conn.execute(
            "SELECT count(*) FROM vector_platform.dead_letters WHERE collection = %s AND resolved_at IS NULL", (name,)
        ).fetchone()[0]
    return {"chunks": chunks, "rows": rows, "distinct": distinct, "vectors": vectors, "dead_letters": letters}


def _reference_state(make_platform, tmp_path, unique_name, docs):
    """The same documents ingested once, alone, in another collection (ids differ by name)."""
    vp = make_platform(store_url=(tmp_path / "ref_objects").as_uri())
    name = unique_name + "_ref"
    vp.add_collection(name, write_jsonl(tmp_path / "ref.jsonl", docs))
    assert all(r.success for r in vp.ingest(name))
    state = _state(pg_dsn_of(vp), name)
    state.pop("vectors")
    return state


def pg_dsn_of(vp):
    return vp.postgres.dsn


def test_two_ingests_at_once_wait_for_each_other_and_end_as_one(make_platform, fake_embedder, tmp_path, unique_name, pg_dsn):
    docs = _docs(400, poison={7, 300})
    vp = make_platform()
    vp.add_collection(unique_name, write_jsonl(tmp_path / "docs.jsonl", docs))
    store = (tmp_path / "objects").as_uri()
    home = tmp_path / "dagster"
    home.mkdir()
    procs = [_spawn(pg_dsn, store, home, "ingest", unique_name, FAKE_EMBED_DELAY_S="0.02") for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out + err[-3000:]
        assert "IntegrityError" not in err and "UniqueViolation" not in err
    assert any("waiting for the writer lock" in err for _, err in outs), "the second writer must say it waits"
    state = _state(pg_dsn, unique_name)
    assert state["rows"] == state["distinct"] == state["chunks"] - 2  # two poisoned chunks are dead letters
    assert state["dead_letters"] == 2
    reference = _reference_state(make_platform, tmp_path, unique_name, docs)
    assert {k: state[k] for k in reference} == reference

    # ingest + dead-letter replay at once, with searches all along: the same final state again,
    # and no search errs or comes back empty meanwhile.
    stop, problems, searches = threading.Event(), [], [0]

    def search_loop():
        while not stop.is_set():
            try:
                if len(vp.search("term5 term17", [unique_name], k=5).hits) != 5:
                    problems.append("fewer than 5 hits")
            except Exception as err:  # noqa: BLE001 - any error is what this test looks for
                problems.append(repr(err))
            searches[0] += 1
            time.sleep(0.05)

    searcher = threading.Thread(target=search_loop)
    searcher.start()
    procs = [
        _spawn(pg_dsn, store, home, "ingest", unique_name, FAKE_EMBED_DELAY_S="0.02"),
        _spawn(pg_dsn, store, home, "replay", unique_name, FAKE_EMBED_DELAY_S="0.02"),
    ]
    try:
        for p in procs:
            out, err = p.communicate(timeout=600)
            assert "IntegrityError" not in err and "UniqueViolation" not in err, err[-3000:]
    finally:
        stop.set()
        searcher.join()
    assert searches[0] > 5 and problems == []
    again = _state(pg_dsn, unique_name)
    assert again == state


def _kill_when(proc, ready, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if ready():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.02)
    return False


def test_sigkill_during_chunks_then_rerun_converges(make_platform, fake_embedder, tmp_path, unique_name, pg_dsn):
    docs = _docs(1500)
    vp = make_platform()
    vp.add_collection(unique_name, write_jsonl(tmp_path / "docs.jsonl", docs))
    store = (tmp_path / "objects").as_uri()
    home = tmp_path / "dagster"
    home.mkdir()

    def chunked():
        with psycopg.connect(pg_dsn) as conn:
            return conn.execute(
                "SELECT count(*) FROM vector_platform.documents WHERE collection = %s AND chunked_hash IS NOT NULL", (unique_name,)
            ).fetchone()[0]

    proc = _spawn(pg_dsn, store, home, "ingest", unique_name, VP_CHUNK_BATCH_DOCUMENTS="25")
    assert _kill_when(proc, lambda: 0 < chunked() < 1000), "the run ended before it could be killed mid-chunks"
    partial = chunked()
    assert 0 < partial < len(docs) and partial % 25 == 0  # whole batches only: each committed on its own
    with psycopg.connect(pg_dsn) as conn:
        orphans = conn.execute(
            "SELECT count(*) FROM vector_platform.chunks c JOIN vector_platform.documents d USING (collection, doc_id) "
            "WHERE c.collection = %s AND d.chunked_hash IS NULL", (unique_name,)
        ).fetchone()[0]
    assert orphans == 0  # no half-chunked document

    rerun = _spawn(pg_dsn, store, home, "ingest", unique_name)
    out, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, out + err[-3000:]
    state = _state(pg_dsn, unique_name)
    reference = _reference_state(make_platform, tmp_path, unique_name, docs)
    assert {k: state[k] for k in reference} == reference and state["rows"] == state["distinct"] == state["chunks"]


def test_sigkill_during_vector_table_then_rerun_converges(make_platform, fake_embedder, tmp_path, unique_name, pg_dsn):
    docs = _docs(3000)
    vp = make_platform()
    vp.add_collection(unique_name, write_jsonl(tmp_path / "docs.jsonl", docs))
    # Documents, chunks and embeddings first (in this process), so the kill lands in the load.
    assert vp._run("ingest_documents_job", unique_name).success
    import dagster as dg

    key = dg.MultiPartitionKey({"collection": unique_name, "model": "minilm_l6_v2"})
    with vp.pool().connection() as conn:
        table = catalog.vector_table_name(conn, unique_name, "minilm_l6_v2")
    from vector_platform.ingest import steps

    steps.embed_chunks(vp.pool(), vp.object_store.store(), fake_embedder, unique_name, "minilm_l6_v2")
    ident = sql.Identifier("vp_vectors", table)

    def loaded():
        with psycopg.connect(pg_dsn) as conn:
            if conn.execute("SELECT to_regclass(%s)", (f"vp_vectors.{table}",)).fetchone()[0] is None:
                return 0
            return conn.execute(sql.SQL("SELECT count(*) FROM {}").format(ident)).fetchone()[0]

    store = (tmp_path / "objects").as_uri()
    home = tmp_path / "dagster"
    home.mkdir()
    proc = _spawn(pg_dsn, store, home, "ingest", unique_name, VP_LOAD_BATCH_ROWS="100")
    assert _kill_when(proc, lambda: 0 < loaded() < 2000), "the run ended before it could be killed mid-load"
    partial = loaded()
    assert partial % 100 == 0 and 0 < partial < 3000  # whole COPY batches only
    rerun = _spawn(pg_dsn, store, home, "ingest", unique_name)
    out, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, out + err[-3000:]
    state = _state(pg_dsn, unique_name)
    assert state["rows"] == state["distinct"] == state["chunks"] >= len(docs) and state["dead_letters"] == 0
    assert vp._run("embed_and_index_job", key).checks["no_chunk_lost"] is True
