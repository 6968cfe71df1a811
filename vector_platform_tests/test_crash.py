"""SIGKILL the CLI ingest in the middle of the embeddings step; a re-run converges exactly."""

import os
import signal
import subprocess
import time

import psycopg
from psycopg import sql

from vector_platform import catalog
from vector_platform.catalog import cache_index
from vector_platform.models import MINILM

from .conftest import cli, cli_env, scifact_docs, write_jsonl


def test_sigkill_during_embeddings_then_rerun_converges(pg_dsn, tmp_path, unique_name):
    # 120 abstracts: ~300 chunks, five embedding batches of 64 with the real model; the kill
    # comes after two are indexed, so the re-run has both cached batches and batches to embed.
    docs = [{"id": d["_id"], "title": d["title"], "text": d["text"]} for d in scifact_docs(120)]
    source = write_jsonl(tmp_path / "docs.jsonl", docs)
    env = cli_env(pg_dsn, tmp_path)
    subprocess.run(cli("collections", "add", unique_name, "--source", str(source)), env=env, check=True)

    proc = subprocess.Popen(cli("ingest", unique_name, "--quiet"), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    cache = tmp_path / "objects" / "embedding_cache" / MINILM.fingerprint
    store_url = (tmp_path / "objects").as_uri()

    def indexed() -> int:
        # A batch is finished once its file is indexed (files are written first, then indexed:
        # a kill in between leaves a file the re-run does not count on).
        with psycopg.connect(pg_dsn) as conn:
            return cache_index.count(conn, store_url, MINILM.fingerprint)

    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if indexed() >= 2 * 64:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the ingest finished before it could be killed: " + proc.stdout.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    files_at_kill = len(list(cache.glob("*.parquet")))

    with psycopg.connect(pg_dsn) as conn:
        chunks = conn.execute("SELECT count(*) FROM vector_platform.chunks WHERE collection = %s", (unique_name,)).fetchone()[0]
    assert chunks > len(docs)

    rerun = subprocess.run(cli("ingest", unique_name, "--quiet"), env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    out = rerun.stdout
    assert "check no_chunk_lost: passed" in out and "check embeddings_are_valid: passed" in out
    embedded = int(out.split("embedded=")[1].split(",")[0])
    from_cache = int(out.split("from_cache=")[1].split(",")[0])
    # The re-run takes every batch finished before the kill from the cache and embeds only the rest.
    assert from_cache >= 2 * 64 and files_at_kill >= 2
    assert embedded + from_cache == chunks

    with psycopg.connect(pg_dsn) as conn:
        table = catalog.vector_table_name(conn, unique_name, "minilm_l6_v2")
        rows, distinct = conn.execute(
            sql.SQL("SELECT count(*), count(DISTINCT chunk_id) FROM {}").format(sql.Identifier("vp_vectors", table))
        ).fetchone()
        missing = conn.execute(
            sql.SQL(
                "SELECT count(*) FROM vector_platform.chunks c WHERE c.collection = %s "
                "AND NOT EXISTS (SELECT 1 FROM {} v WHERE v.chunk_id = c.chunk_id)"
            ).format(sql.Identifier("vp_vectors", table)),
            (unique_name,),
        ).fetchone()[0]
    assert rows == distinct == chunks and missing == 0
