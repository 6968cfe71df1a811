"""Row archival, partitioned layout (issue 9): a collection with a row-archival rule keeps its
vectors in month partitions, each with its own HNSW index; archival detaches whole old months,
checks them against the archive and drops them. A kill during `DETACH ... CONCURRENTLY` is
finished by the next run, a detached partition that cannot be checked is kept and reported,
and a month still holding a live document stays attached."""

import datetime as dt
import os
import socket
import subprocess
import sys
import time

import numpy as np
import psycopg
import pytest
from pgvector.psycopg import register_vector

from vector_platform import catalog, tables
from vector_platform.archive import rows as archive
from vector_platform.archive.partitions import partition_summary
from vector_platform.archive.reconcile import archive_reconciles as reconcile
from vector_platform.models import MINILM
from vector_platform.search import active
from vector_platform.object_store import ObjectStore

from .conftest import write_jsonl
from .test_archive_rows import NOW, counts, detached_tables, ingested_dated, old_partitions

CUTOFF = archive.cutoff_for(730, NOW)


def vector_table(dsn: str, name: str) -> str:
    with psycopg.connect(dsn) as conn:
        return catalog.vector_table_name(conn, name, "minilm_l6_v2")


def hnsw_per_partition(dsn: str, table: str) -> dict[str, bool]:
    """Each partition of the table -> whether it has a valid HNSW index attached to the parent's."""
    with psycopg.connect(dsn) as conn:
        return dict(conn.execute(
            """
            SELECT c.relname, bool_or(x.indisvalid AND ii.inhparent IS NOT NULL)
            FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
            LEFT JOIN pg_index x ON x.indrelid = c.oid
                AND x.indexrelid IN (SELECT oid FROM pg_class WHERE relam = (SELECT oid FROM pg_am WHERE amname = 'hnsw'))
            LEFT JOIN pg_inherits ii ON ii.inhrelid = x.indexrelid
            WHERE i.inhparent = %s::regclass GROUP BY c.relname
            """,
            (f"{tables.VECTORS}.{table}",),
        ).fetchall())


def test_every_partition_is_indexed_and_top_k_across_partitions_returns_k(make_platform, pg_dsn, tmp_path):
    vp, name, docs, old = ingested_dated(make_platform, tmp_path, 150, "partitions")
    table = vector_table(pg_dsn, name)
    indexed = hnsw_per_partition(pg_dsn, table)
    assert len(indexed) >= 37 and all(indexed.values()), indexed  # 36 months and the undated partition
    with psycopg.connect(pg_dsn) as conn:
        index = tables.current_index(conn, table)
    assert index is not None and index["bytes"] > 0  # the partitioned index is valid, its size the partitions'

    # ef_search 10 and 150 rows over 37 partitions (4 or 5 rows each): a scan of one partition's
    # index returns at most ef_search rows, yet a top-60 across them returns 60, by the index.
    vp.set_settings(name, hnsw_ef_search=10)
    for q in (docs[0]["text"], docs[77]["text"]):
        ann = vp.search(q, [name], k=60)
        exact = vp.search(q, [name], k=60, exact=True)
        assert len(ann.hits) == 60 and not any(h.exact for h in ann.hits)
        overlap = len({h.chunk_id for h in ann.hits} & {h.chunk_id for h in exact.hits})
        assert overlap >= 55, overlap
    # With a time window (iterative scans): every row of the window, nothing outside it.
    since, until = CUTOFF - dt.timedelta(days=100), CUTOFF + dt.timedelta(days=100)
    stamps = {d["id"]: dt.datetime.fromtimestamp(d["timestamp"], dt.timezone.utc) for d in docs}
    window = vp.search(docs[0]["text"], [name], k=100, since=since, until=until)
    assert {h.doc_id for h in window.hits} == {i for i, ts in stamps.items() if since <= ts < until}
    with psycopg.connect(pg_dsn) as conn:  # and it reads only the partitions of the window's months
        register_vector(conn)
        query = active._nearest_query(conn, tables.view_id(name), MINILM, False, None, exact=False, timed=True)
        with conn.transaction():  # the settings search runs with
            active._apply_settings(conn, active.plan_settings(False, 100, iterative=True), None)
            plan = [r[0] for r in conn.execute(
                "EXPLAIN " + query, {"q": np.ones(384, np.float32), "k": 100, "since": since, "until": until}, prepare=False)]
    scanned = [line for line in plan if "Scan" in line]
    assert 6 <= len(scanned) <= 8 and all("Index Scan using" in line and "hnsw" in line for line in scanned), plan

    # A document dated in a month with no partition yet gets one, indexed by PostgreSQL itself;
    # a document moved to another month leaves its old partition (one row per chunk, always).
    later = NOW + dt.timedelta(days=45)
    moved = dict(docs[-1], timestamp=later.timestamp())
    fresh = {"id": "fresh", "text": "a fresh document about partitions", "timestamp": later.timestamp(), "metadata": {}}
    write_jsonl(tmp_path / f"{name}.jsonl", docs[:-1] + [moved, fresh])
    vp.set_settings(name, hnsw_m=8)  # and the partitioned index is rebuilt, partition by partition, then swapped
    assert all(r.success for r in vp.ingest(name))
    with psycopg.connect(pg_dsn) as conn:
        assert tables.current_index(conn, table)["m"] == 8
    assert all(hnsw_per_partition(pg_dsn, table).values())
    with psycopg.connect(pg_dsn) as conn:
        part = tables.partition_name(table, *tables.month_of(later))
        assert part in tables.partitions(conn, table)
        placed = conn.execute(
            f"SELECT v.doc_id, v.tableoid::regclass::text, count(*) OVER (PARTITION BY v.chunk_id) FROM {tables.VECTORS}.{table} v "
            "WHERE v.doc_id IN ('fresh', %s)", (moved["id"],)).fetchall()
        dupes = conn.execute(f"SELECT count(*) - count(DISTINCT chunk_id) FROM {tables.VECTORS}.{table}").fetchone()[0]
    assert {doc for doc, _, _ in placed} == {"fresh", moved["id"]}
    assert all(where.endswith(part) and n == 1 for _, where, n in placed) and dupes == 0
    assert hnsw_per_partition(pg_dsn, table)[part] is True


def test_a_kill_during_detach_concurrently_is_finalized_by_the_next_run(make_platform, pg_dsn, tmp_path):
    vp, name, docs, old = ingested_dated(make_platform, tmp_path, 90, "partitions")
    before = counts(pg_dsn, name)
    script = (
        "import datetime as dt; from vector_platform.archive import rows as a; "
        "from vector_platform_tests.conftest import build_platform; "
        f"vp = build_platform({pg_dsn!r}, None, {vp.store().url!r}); "
        f"a.archive_rows(vp.pool(), vp.store(), {pg_dsn!r}, {name!r}, dt.datetime.fromisoformat({CUTOFF.isoformat()!r}))"
    )
    # A reader holds the table open: DETACH ... CONCURRENTLY marks the partition detached, then
    # waits for it. The archival process is killed there, and its server session ended.
    table = vector_table(pg_dsn, name)
    reader = psycopg.connect(pg_dsn)
    reader.execute(f"SELECT count(*) FROM {tables.VECTORS}.{table}")
    worker = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        with psycopg.connect(pg_dsn, autocommit=True) as watch:
            for _ in range(600):
                waiting = watch.execute(
                    "SELECT pid FROM pg_stat_activity WHERE query ILIKE '%%DETACH PARTITION%%CONCURRENTLY%%' AND pid <> pg_backend_pid()"
                ).fetchall()
                if waiting or worker.poll() is not None:
                    break
                time.sleep(0.1)
            assert waiting, worker.stdout.read().decode()[-2000:] if worker.poll() is not None else "no DETACH seen"
            worker.kill()
            worker.wait()
            watch.execute("SELECT pg_terminate_backend(%s)", (waiting[0][0],))
            reader.close()
            pending = watch.execute(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "WHERE i.inhdetachpending AND i.inhparent = %s::regclass", (f"{tables.VECTORS}.{table}",)).fetchall()
            assert len(pending) == 1  # what an interrupted DETACH ... CONCURRENTLY leaves
    finally:
        worker.kill()
        reader.close()
    # The month being detached is out of the table already: search does not see its rows.
    [(part,)] = pending
    in_month = {d["id"] for d in docs
                if tables.partition_name(table, *tables.month_of(dt.datetime.fromtimestamp(d["timestamp"], dt.timezone.utc))) == part}
    assert in_month and counts(pg_dsn, name)["archived"] >= len(in_month)
    for doc in docs:
        if doc["id"] in in_month:
            assert not {h.doc_id for h in vp.search(doc["text"], [name], k=10).hits} & in_month

    report = archive.archive_rows(vp.pool(), vp.store(), pg_dsn, name, CUTOFF)
    assert report.resumed and report.documents == 0 and report.partitions_dropped == len(old_partitions(pg_dsn, name, CUTOFF, before=True))
    after = counts(pg_dsn, name)
    assert after["archived"] == len(old) and after["vectors"] == before["vectors"] - sum(
        1 for d in docs if d["id"] in old)  # one chunk per document here: every old vector gone, no other
    assert old_partitions(pg_dsn, name, CUTOFF) == [] and detached_tables(pg_dsn, name) == []
    figures = reconcile(vp.pool(), vp.store(), name)
    assert figures["problems"] == [] and figures["vectors_of_archived_still_live"] == 0


def test_a_detached_partition_that_cannot_be_checked_is_kept_reported_and_finished_later(make_platform, pg_dsn, tmp_path, s3_url):
    vp, name, docs, old = ingested_dated(make_platform, tmp_path, 90, "partitions")
    vp = make_platform(store_url=s3_url)
    script = (
        "import datetime as dt; from vector_platform.archive import rows as a; "
        "from vector_platform_tests.conftest import build_platform; "
        f"vp = build_platform({pg_dsn!r}, None, {s3_url!r}); "
        f"a.archive_rows(vp.pool(), vp.store(), {pg_dsn!r}, {name!r}, dt.datetime.fromisoformat({CUTOFF.isoformat()!r}))"
    )
    env = {**os.environ, "VP_FAILPOINT": "archive_partitions.before_drop"}
    killed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    [left] = detached_tables(pg_dsn, name)  # detached, checked, not dropped: the kill came first
    # A row no archive file holds turns up in it (a write that slipped in): it must reach the
    # archive before the partition may go.
    with psycopg.connect(pg_dsn) as conn:
        conn.execute(
            f"INSERT INTO {tables.VECTORS}.{left} (chunk_id, doc_id, seq, content_hash, text, metadata, source_ts, embedding) "
            f"SELECT gen_random_uuid(), doc_id, 99, 'stray', 'a stray row', metadata, source_ts, embedding "
            f"FROM {tables.VECTORS}.{left} LIMIT 1")

    with socket.socket() as s:  # then the object store is down: nothing can be checked
        s.bind(("127.0.0.1", 0))
        down = ObjectStore.from_url(s3_url, endpoint_url=f"http://127.0.0.1:{s.getsockname()[1]}")
    with pytest.raises(OSError):
        archive.archive_rows(vp.pool(), down, pg_dsn, name, CUTOFF)
    assert detached_tables(pg_dsn, name) == [left]  # kept, unchecked, never dropped
    with psycopg.connect(pg_dsn) as conn:
        [pending] = partition_summary(conn, name)["pending"]
        assert pending["table"] == left and pending["state"] == "detached" and "127.0.0.1" in pending["error"]
    problems = " | ".join(reconcile(vp.pool(), vp.store(), name)["problems"])
    assert f"partition {left}" in problems and "is detached, not yet checked" in problems
    [status] = [c for c in vp.status()["collections"] if c["name"] == name]
    assert status["archive"]["partitions_pending"][0]["table"] == left

    report = archive.archive_rows(vp.pool(), vp.store(), pg_dsn, name, CUTOFF)
    assert report.partitions_dropped >= 1 and detached_tables(pg_dsn, name) == []
    with psycopg.connect(pg_dsn) as conn:
        [(key, rows)] = conn.execute(
            "SELECT key, rows FROM vector_platform.archive_files WHERE collection = %s AND kind = 'partition_rows'", (name,)).fetchall()
        assert conn.execute("SELECT to_regclass(%s)", (f"{tables.VECTORS}.{left}",)).fetchone()[0] is None
    assert rows == 1 and key.endswith("-rest.parquet")
    assert reconcile(vp.pool(), vp.store(), name)["problems"] == []


def test_a_month_still_holding_a_live_document_stays_attached_and_loses_only_its_archived_rows(make_platform, pg_dsn, tmp_path):
    vp, name, docs, old = ingested_dated(make_platform, tmp_path, 90, "partitions")
    stuck = sorted(old)[4]  # its new content is not embedded yet: it cannot be archived
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("UPDATE vector_platform.documents SET content_hash = 'changed' WHERE collection = %s AND doc_id = %s",
                     (name, stuck))
        ts = conn.execute("SELECT source_ts FROM vector_platform.documents WHERE collection = %s AND doc_id = %s",
                          (name, stuck)).fetchone()[0]
    report = archive.archive_rows(vp.pool(), vp.store(), pg_dsn, name, CUTOFF)
    assert report.documents == len(old) - 1 and len(report.partitions_kept) == 1
    part = tables.partition_name(vector_table(pg_dsn, name), *tables.month_of(ts))
    assert old_partitions(pg_dsn, name, CUTOFF) == [part] and part in report.partitions_kept[0]
    with psycopg.connect(pg_dsn) as conn:
        left = [r[0] for r in conn.execute(f"SELECT doc_id FROM {tables.VECTORS}.{part}")]
    assert left == [stuck]  # the month's archived documents' rows went by key
    for doc in docs[::9]:
        assert not {h.doc_id for h in vp.search(doc["text"], [name], k=10).hits} & (old - {stuck})
    assert reconcile(vp.pool(), vp.store(), name)["problems"] == []


def test_a_partitioned_collection_evicts_and_rehydrates_into_its_partitions(make_platform, pg_dsn, tmp_path):
    vp, name, docs, old = ingested_dated(make_platform, tmp_path, 60, "partitions")
    table = vector_table(pg_dsn, name)
    queries = [d["text"] for d in docs[::20]]
    before = {q: [(h.chunk_id, round(h.score, 5)) for h in vp.search(q, [name], k=8, exact=True).hits] for q in queries}
    partitions_before = sorted(hnsw_per_partition(pg_dsn, table))

    assert vp.tier(name, "cold").success
    assert vp.tier(name, "active").success  # restored from the snapshot: rows routed to their months again
    with psycopg.connect(pg_dsn) as conn:
        assert tables.is_partitioned(conn, table)
    indexed = hnsw_per_partition(pg_dsn, table)
    assert sorted(indexed) == partitions_before and all(indexed.values())
    for q in queries:
        assert [(h.chunk_id, round(h.score, 5)) for h in vp.search(q, [name], k=8, exact=True).hits] == before[q]
