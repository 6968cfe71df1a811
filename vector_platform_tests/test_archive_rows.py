"""Row archival (issue 9): documents older than the cutoff, with their chunks and vectors,
move to verified Parquet files with receipts before any delete; search stops returning them;
ingest leaves them archived; a kill between the receipts and the delete loses nothing and
duplicates nothing. Tests marked with a `layout` run on both layouts: a plain vector table
(rows deleted by key) and a month-partitioned one (old months detached and dropped); what
only the partitioned layout does is in test_archive_partitions."""

import datetime as dt
import io
import json
import os
import socket
import subprocess
import sys
import threading
import uuid

import psycopg
import numpy as np
import pytest
import pyarrow as pa
import pyarrow.parquet as pq

from vector_platform import catalog, clock, tables
from vector_platform.archive import rows as archive
from vector_platform.archive.reconcile import archive_reconciles as reconcile
from vector_platform.locks import lock_key
from vector_platform.models import MINILM

from .conftest import write_jsonl
from .test_tiers import corpus

NOW = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)


def dated(n: int, months: int = 36) -> list[dict]:
    """The tiers corpus with source timestamps spread evenly over `months` months before NOW."""
    docs = corpus(n, "r")
    for i, doc in enumerate(docs):
        doc["timestamp"] = (NOW - dt.timedelta(days=30.4 * months * i / n)).timestamp()
    return docs


def ingested_dated(make_platform, tmp_path, n: int, layout: str = "rows"):
    """(platform, collection, documents, ids older than two years at NOW): a dated collection,
    ingested. The partitioned layout: the rule is set before the first ingest, which then makes
    a month-partitioned vector table; set after it (the row layout), the table stays as it is."""
    vp = make_platform()
    name = f"arch_{uuid.uuid4().hex[:8]}"
    docs = dated(n)
    vp.add_collection(name, write_jsonl(tmp_path / f"{name}.jsonl", docs))
    if layout == "partitions":
        vp.set_rules(name, archive_rows_older_than_days=730)
    assert all(r.success for r in vp.ingest(name))
    with psycopg.connect(vp.postgres.resolved_dsn()) as conn:
        assert tables.is_partitioned(conn, catalog.vector_table_name(conn, name, "minilm_l6_v2")) == (layout == "partitions")
    cutoff = archive.cutoff_for(730, NOW)
    old = {d["id"] for d in docs if dt.datetime.fromtimestamp(d["timestamp"], dt.timezone.utc) < cutoff}
    return vp, name, docs, old


def archive_by_rule(vp, name: str):
    """Set the 730-day rule and run row_archive_job (the asset and its check) at NOW."""
    vp.set_rules(name, archive_rows_older_than_days=730)
    clock.set_now(NOW)
    try:
        return vp.archive_rows(name)
    finally:
        clock.set_now(None)


def old_partitions(dsn: str, name: str, cutoff: dt.datetime, before: bool = False) -> list[str]:
    """The vector table's attached partitions of months wholly before the cutoff (`before`:
    the months of documents that were older than the cutoff, which such partitions held)."""
    with psycopg.connect(dsn) as conn:
        table = catalog.vector_table_name(conn, name, "minilm_l6_v2")
        if before:
            months = {tables.month_of(ts) for (ts,) in conn.execute(
                "SELECT source_ts FROM vector_platform.archived_documents WHERE collection = %s", (name,))}
            return sorted(f"{y}-{m}" for y, m in months if archive.wholly_before((y, m), cutoff))
        return sorted(p for p, ym in tables.partitions(conn, table).items() if ym and archive.wholly_before(ym, cutoff))


def detached_tables(dsn: str, name: str) -> list[str]:
    """Vector tables of the collection left detached (none once archival finished)."""
    with psycopg.connect(dsn) as conn:
        return [r[0] for r in conn.execute(
            "SELECT coalesce(detached_as, partition) FROM vector_platform.archive_partitions "
            "WHERE collection = %s AND state <> 'dropped'", (name,))]


def counts(dsn: str, name: str) -> dict:
    with psycopg.connect(dsn) as conn:
        table = catalog.vector_table_name(conn, name, "minilm_l6_v2")
        return {
            "documents": conn.execute("SELECT count(*) FROM vector_platform.documents WHERE collection = %s", (name,)).fetchone()[0],
            "chunks": conn.execute("SELECT count(*) FROM vector_platform.chunks WHERE collection = %s", (name,)).fetchone()[0],
            "vectors": tables.table_stats(conn, table)[0],
            "archived": conn.execute(
                "SELECT count(*) FROM vector_platform.archived_documents WHERE collection = %s", (name,)).fetchone()[0],
            "live_old": conn.execute(
                "SELECT count(*) FROM vector_platform.documents WHERE collection = %s AND source_ts < %s", (name, NOW - dt.timedelta(days=730))
            ).fetchone()[0],
        }


@pytest.mark.parametrize("layout", ["rows", "partitions"])
def test_old_rows_move_to_verified_files_and_stay_archived(make_platform, pg_dsn, tmp_path, layout):
    vp, name, docs, old = ingested_dated(make_platform, tmp_path, 240, layout)
    cutoff = archive.cutoff_for(730, NOW)
    assert 60 < len(old) < 90
    before = counts(pg_dsn, name)

    report = archive.archive_rows(vp.pool(), vp.store(), pg_dsn, name, cutoff, batch_documents=25)
    assert report.documents == len(old) and report.batches == -(-len(old) // 25)
    after = counts(pg_dsn, name)
    assert after["documents"] == before["documents"] - len(old) and after["archived"] == len(old) and after["live_old"] == 0
    assert after["vectors"] == before["vectors"] - report.vectors and after["chunks"] == before["chunks"] - report.chunks
    if layout == "partitions":  # the months wholly before the cutoff left as partitions, detached and dropped
        assert report.layout == "partitions" and report.partitions_dropped == len(old_partitions(pg_dsn, name, cutoff, before=True)) >= 11
        assert old_partitions(pg_dsn, name, cutoff) == [] and detached_tables(pg_dsn, name) == []

    # Every receipt's file is on the store with its bytes; together they hold exactly the old documents.
    store = vp.store()
    with psycopg.connect(pg_dsn) as conn:
        files = conn.execute(
            "SELECT key, kind, sha256, bytes, rows, year, month FROM vector_platform.archive_files WHERE collection = %s", (name,)
        ).fetchall()
    archived_ids, vector_rows = set(), 0
    for key, kind, sha, nbytes, nrows, year, month in files:
        assert key.startswith(f"archive/{name}/year={year:04d}/month={month:02d}/{kind}/")
        data = store.get_bytes(key)
        assert len(data) == nbytes and pq.ParquetFile(io.BytesIO(data)).metadata.num_rows == nrows
        table = pq.read_table(io.BytesIO(data))
        if kind == "documents":
            archived_ids |= set(table.column("doc_id").to_pylist())
            assert all(ts < cutoff for ts in table.column("source_ts").to_pylist())
        else:
            vector_rows += nrows
    assert archived_ids == old and vector_rows == report.vectors

    # Search no longer returns them.
    for doc in docs[-5:]:
        hits = vp.search(doc["text"], [name], k=10).hits
        assert hits and not ({h.doc_id for h in hits} & old)

    # Ingest leaves them archived (the source still has them); a changed one comes back live.
    changed = sorted(old)[0]
    docs = [{**d, "text": d["text"] + " revised"} if d["id"] == changed else d for d in docs]
    write_jsonl(tmp_path / f"{name}.jsonl", docs)
    runs = vp.ingest(name)
    assert all(r.success for r in runs), [r.error for r in runs]
    assert runs[0].metadata["source_documents"]["left_archived"] == len(old) - 1
    assert counts(pg_dsn, name)["documents"] == after["documents"] + 1

    # A second pass archives the revived one again, and nothing else.
    again = archive.archive_rows(vp.pool(), vp.store(), pg_dsn, name, cutoff, batch_documents=25)
    assert again.documents == 1 and counts(pg_dsn, name)["archived"] == len(old)


@pytest.mark.parametrize("point", ["archive_rows.after_upload", "archive_rows.after_receipts", "archive_rows.after_batch"])
def test_a_kill_anywhere_in_a_batch_loses_nothing_and_duplicates_nothing(make_platform, pg_dsn, tmp_path, point):
    """SIGKILL after the files are written (no receipts yet), after the receipts (nothing
    deleted yet), and between batches (the first one done): the re-run resumes the job."""
    vp, name, docs, old = ingested_dated(make_platform, tmp_path, 120)
    cutoff = archive.cutoff_for(730, NOW)
    before = counts(pg_dsn, name)
    script = (
        "import datetime as dt, sys; from vector_platform.archive import rows as a; "
        "from vector_platform_tests.conftest import build_platform; "
        f"vp = build_platform({pg_dsn!r}, None, {vp.store().url!r}); "
        f"a.archive_rows(vp.pool(), vp.store(), {pg_dsn!r}, {name!r}, dt.datetime.fromisoformat({cutoff.isoformat()!r}), batch_documents=15)"
    )
    env = {**os.environ, "VP_FAILPOINT": point}
    killed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    mid = counts(pg_dsn, name)
    done = 15 if point == "archive_rows.after_batch" else 0  # the first batch committed, or nothing deleted
    assert mid["archived"] == done and mid["documents"] == before["documents"] - done
    assert vp.store().list(f"archive/{name}")  # its files were written

    report = archive.archive_rows(vp.pool(), vp.store(), pg_dsn, name, cutoff, batch_documents=15)
    assert report.resumed and report.documents == len(old) - done  # this run's share; the job's totals below
    after = counts(pg_dsn, name)
    assert after["archived"] == len(old) and after["documents"] == before["documents"] - len(old)
    with psycopg.connect(pg_dsn) as conn:
        keys = [r[0] for r in conn.execute("SELECT key FROM vector_platform.archive_files WHERE collection = %s", (name,))]
        jobs = conn.execute("SELECT status, documents FROM vector_platform.archival_jobs WHERE collection = %s", (name,)).fetchall()
    assert len(keys) == len(set(keys)) and jobs == [("completed", len(old))]
    listed = vp.store().list(f"archive/{name}")
    with psycopg.connect(pg_dsn) as conn:
        [(job_id,)] = conn.execute("SELECT id FROM vector_platform.archival_jobs WHERE collection = %s", (name,)).fetchall()
    manifest = archive.manifest_key(name, job_id)
    assert sorted(listed) == sorted(keys + [manifest])  # the re-run rewrote the same objects: none left over
    written = json.loads(vp.store().get_bytes(manifest))
    assert sorted(f["key"] for f in written["files"]) == sorted(keys) and written["documents"] == len(old)
    assert {f["fingerprint"] for f in written["files"] if f["kind"] == "vectors"} == {MINILM.fingerprint}
    figures = reconcile(vp.pool(), vp.store(), name)
    assert figures["problems"] == [] and figures["sampled_documents"] == min(20, len(old)) and figures["sampled_vectors"] > 0


def test_the_row_archive_asset_applies_the_collections_rule(make_platform, pg_dsn, tmp_path):
    vp, name, docs, old = ingested_dated(make_platform, tmp_path, 90)
    run = vp._run("row_archive_job", name)
    assert run.success and run.metadata["row_archive"]["why"] == "no archive_rows_older_than_days rule"
    run = archive_by_rule(vp, name)
    assert run.success, run.error
    assert run.metadata["row_archive"]["documents"] == len(old) > 0
    assert counts(pg_dsn, name)["archived"] == len(old)
    assert "| completed |" in run.metadata["row_archive"]["recent_jobs"]

    # status: rows and bytes in Postgres vs archived, the last job, a monthly cost estimate.
    [status] = [c for c in vp.status()["collections"] if c["name"] == name]
    assert status["archive"]["documents"] == len(old) and status["documents"] == len(docs) - len(old)
    assert status["archive"]["jobs"][0]["status"] == "completed" and status["archive"]["bytes"] > 0
    assert status["bytes_object_store"] >= status["archive"]["bytes"]
    cost = status["cost"]
    expected = status["bytes_postgres"] / 1e9 * 0.12 + status["bytes_object_store"] / 1e9 * 0.023
    assert cost["usd_per_month"] == pytest.approx(expected, abs=1e-4) and cost["usd_per_gb_month"] == {"postgres": 0.12, "object_store": 0.023}


def test_archival_refuses_a_second_run_a_cold_collection_and_half_ingested_documents(make_platform, pg_dsn, tmp_path):
    vp, name, docs, old = ingested_dated(make_platform, tmp_path, 90)
    cutoff = archive.cutoff_for(730, NOW)
    old = sorted(old)

    with psycopg.connect(pg_dsn, autocommit=True) as other:  # another run holds the collection's archival lock
        assert other.execute("SELECT pg_try_advisory_lock(%s)", (lock_key("row_archive", name),)).fetchone()[0]
        with pytest.raises(archive.ArchiveError, match="already running"):
            archive.archive_rows(vp.pool(), vp.store(), pg_dsn, name, cutoff)
    assert counts(pg_dsn, name)["archived"] == 0

    # A document whose new content is not chunked and embedded yet stays until ingest finishes it.
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("UPDATE vector_platform.documents SET content_hash = 'changed' WHERE collection = %s AND doc_id = %s",
                     (name, old[0]))
    report = archive.archive_rows(vp.pool(), vp.store(), pg_dsn, name, cutoff)
    assert report.documents == len(old) - 1
    with psycopg.connect(pg_dsn) as conn:
        live = [r[0] for r in conn.execute("SELECT doc_id FROM vector_platform.documents WHERE collection = %s AND source_ts < %s",
                                           (name, cutoff))]
    assert live == [old[0]]

    assert vp.tier(name, "cold").success
    with pytest.raises(archive.ArchiveError, match="is cold"):
        archive.archive_rows(vp.pool(), vp.store(), pg_dsn, name, cutoff)


@pytest.mark.parametrize("layout", ["rows", "partitions"])
def test_get_and_search_still_find_archived_rows_labelled_and_scored_as_before(make_platform, pg_dsn, tmp_path, layout):
    vp, name, docs, old = ingested_dated(make_platform, tmp_path, 200, layout)
    cutoff = archive.cutoff_for(730, NOW)
    queries = [d["text"] for d in docs[::17]]
    before = {q: [(h.doc_id, h.chunk_id, round(h.score, 5)) for h in vp.search(q, [name], k=8, exact=True).hits] for q in queries}
    archive.archive_rows(vp.pool(), vp.store(), pg_dsn, name, cutoff, batch_documents=20)

    # get: Postgres first, then one ranged read of the archive; the same document either way.
    by_id = {d["id"]: d for d in docs}
    some_old, some_live = sorted(old)[3], next(d["id"] for d in docs if d["id"] not in old)
    got = vp.get(name, some_old)
    assert got["source_tier"] == "archive" and got["body"] == by_id[some_old]["text"]
    assert got["metadata"] == by_id[some_old]["metadata"] and got["archive"]["uri"].endswith(".parquet")
    assert vp.get(name, some_live)["source_tier"] == "active"
    assert vp.get(name, "no-such-document") is None

    # Without the archive no archived row comes back; with it, the answer is the one exact
    # search gave before archiving: the same chunks, the same scores, old rows labelled.
    for q in queries:
        assert not {h.doc_id for h in vp.search(q, [name], k=8, exact=True).hits} & old
        result = vp.search(q, [name], k=8, exact=True, include_archive=True)
        assert [(h.doc_id, h.chunk_id, round(h.score, 5)) for h in result.hits] == before[q]
        assert all((h.source_tier == "archive") == (h.doc_id in old) for h in result.hits)
        assert all(h.exact for h in result.hits if h.source_tier == "archive")
    assert result.stats["tiers"]["archive"]["rows_scanned"] > 0

    # A time window reads only the months it overlaps, in every tier.
    since, until = cutoff - dt.timedelta(days=60), cutoff + dt.timedelta(days=60)
    window = vp.search(queries[0], [name], k=50, exact=True, include_archive=True, since=since, until=until)
    stamps = {d["id"]: dt.datetime.fromtimestamp(d["timestamp"], dt.timezone.utc) for d in docs}
    in_window = {i for i, ts in stamps.items() if since <= ts < until}
    assert {h.doc_id for h in window.hits} == in_window  # every document has one chunk here
    assert {h.source_tier for h in window.hits} == {"active", "archive"}
    everything = vp.search(queries[0], [name], k=5, include_archive=True)
    assert window.stats["tiers"]["archive"]["rows_scanned"] < everything.stats["tiers"]["archive"]["rows_scanned"]

    # A document that changed at the source comes back live: neither get nor search answers
    # with its archived version any more.
    revived = sorted(old)[0]
    write_jsonl(tmp_path / f"{name}.jsonl", [{**d, "text": "revised " + d["text"]} if d["id"] == revived else d for d in docs])
    assert all(r.success for r in vp.ingest(name))
    assert vp.get(name, revived)["source_tier"] == "active"
    hits = vp.search(by_id[revived]["text"], [name], k=10, exact=True, include_archive=True).hits
    assert [h.source_tier for h in hits if h.doc_id == revived] == ["active"]


def test_archive_reconciles_catches_a_missing_file_a_damaged_row_and_a_row_both_live_and_archived(make_platform, pg_dsn, tmp_path):
    vp, name, docs, old = ingested_dated(make_platform, tmp_path, 150)
    run = archive_by_rule(vp, name)
    assert run.success and run.checks == {"archive_reconciles": True}, run.error
    store = vp.store()
    assert reconcile(vp.pool(), store, name, sample_fraction=1.0)["sampled_documents"] == len(old)

    with psycopg.connect(pg_dsn) as conn:
        doc_key, vec_key = (conn.execute(
            "SELECT key FROM vector_platform.archive_files WHERE collection = %s AND kind = %s ORDER BY id LIMIT 1", (name, kind)
        ).fetchone()[0] for kind in ("documents", "vectors"))
    # A documents file rewritten with one body changed (same rows, same ids): the content no
    # longer hashes to what was archived.
    table = pq.read_table(io.BytesIO(store.get_bytes(doc_key)))
    bodies = table.column("body").to_pylist()
    bodies[0] = bodies[0] + " tampered"
    buf = io.BytesIO()
    pq.write_table(table.set_column(table.schema.get_field_index("body"), "body", pa.array(bodies)), buf, row_group_size=100)
    store.put_bytes(doc_key, buf.getvalue())
    store.delete(vec_key)
    with psycopg.connect(pg_dsn) as conn:  # a document put back live behind the archive's back
        conn.execute(
            "INSERT INTO vector_platform.documents (collection, doc_id, body, content_hash, metadata, first_seen_at, updated_at) "
            "SELECT collection, doc_id, 'x', content_hash, '{}', now(), now() FROM vector_platform.archived_documents "
            "WHERE collection = %s ORDER BY doc_id DESC LIMIT 1", (name,))
    figures = reconcile(vp.pool(), store, name, sample_fraction=1.0)
    text = " | ".join(figures["problems"])
    assert f"{vec_key} has a receipt but is not on the object store" in text
    assert "does not hash to its content_hash" in text
    assert figures["live_and_archived"] == 1 and "1 documents are both live and archived" in text
    assert f"{doc_key} is " in text  # its size changed too
    assert vp._run("row_archive_job", name).checks == {"archive_reconciles": False}


def test_the_nightly_schedule_asks_for_one_run_per_active_collection_with_a_rule(pg_dsn, unique_name, tmp_path, dagster_instance):
    import dagster as dg

    from vector_platform.catalog import tiers as tier_sql
    from vector_platform.defs.archive.schedules import row_archive_schedule
    from vector_platform.defs.resources import PostgresResource

    postgres = PostgresResource(dsn=pg_dsn)
    names = [f"{unique_name[:40]}_{c}" for c in "abc"]
    with postgres.pool().connection() as conn:
        for name in names:
            catalog.add_collection(conn, name, str(tmp_path), "minilm_l6_v2")
    with postgres.pool().connection() as conn:
        tier_sql.set_rules(conn, names[0], archive_rows_older_than_days=365)
        tier_sql.set_rules(conn, names[1], archive_rows_older_than_days=30)
    instance = dagster_instance  # a second instance_for_test would unset the session's
    instance.add_dynamic_partitions("collection", names[:1])  # names[1] not discovered yet
    when = dt.datetime(2026, 11, 25, 2, 41, tzinfo=dt.timezone.utc)
    context = dg.build_schedule_context(instance=instance, resources={"postgres": postgres}, scheduled_execution_time=when)
    requests = row_archive_schedule(context)
    mine = [r for r in requests if r.partition_key in names]
    assert [(r.partition_key, r.run_key) for r in mine] == [(names[0], f"row_archive:{names[0]}:2026-11-25")]


def test_an_unavailable_object_store_deletes_nothing_records_the_error_and_a_later_run_completes(make_platform, pg_dsn, tmp_path, s3_url):
    from vector_platform.object_store import ObjectStore

    vp, name, docs, old = ingested_dated(make_platform, tmp_path, 90)
    vp = make_platform(store_url=s3_url)
    cutoff = archive.cutoff_for(730, NOW)
    before = counts(pg_dsn, name)
    with socket.socket() as s:  # a port nothing listens on: the store is down
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    down = ObjectStore.from_url(s3_url, endpoint_url=dead)
    with pytest.raises(OSError):
        archive.archive_rows(vp.pool(), down, pg_dsn, name, cutoff, batch_documents=20)
    assert counts(pg_dsn, name) == before
    with psycopg.connect(pg_dsn) as conn:
        [(status, error, receipts)] = conn.execute(
            "SELECT status, error, (SELECT count(*) FROM vector_platform.archive_files f WHERE f.job_id = j.id) "
            "FROM vector_platform.archival_jobs j WHERE collection = %s", (name,)).fetchall()
    assert status == "failed" and "127.0.0.1" in error and receipts == 0

    report = archive.archive_rows(vp.pool(), vp.store(), pg_dsn, name, cutoff, batch_documents=20)
    assert report.resumed and report.documents == len(old)
    assert reconcile(vp.pool(), vp.store(), name)["problems"] == []


@pytest.mark.parametrize("layout", ["rows", "partitions"])
def test_ingest_and_search_go_on_during_archival(make_platform, pg_dsn, tmp_path, layout):
    vp, name, docs, old = ingested_dated(make_platform, tmp_path, 200, layout)
    cutoff = archive.cutoff_for(730, NOW)
    errors, answers = [], []

    def archival():
        try:
            archive.archive_rows(vp.pool(), vp.store(), pg_dsn, name, cutoff, batch_documents=3)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    stop = threading.Event()

    def searching():
        while not stop.is_set():
            try:
                answers.append(len(vp.search(docs[-1]["text"], [name], k=5).hits))
            except Exception as err:  # noqa: BLE001 - reported below
                errors.append(err)

    workers = [threading.Thread(target=archival), threading.Thread(target=searching)]
    for w in workers:
        w.start()
    new = [{"id": f"new{i}", "text": f"new{i} fresh words about archival", "timestamp": NOW.timestamp()} for i in range(30)]
    write_jsonl(tmp_path / f"{name}.jsonl", docs + new)
    runs = vp.ingest(name)  # takes the writer lock between archival batches
    workers[0].join()
    stop.set()
    workers[1].join()
    assert not errors and all(r.success for r in runs), (errors, [r.error for r in runs])
    assert len(answers) > 10 and min(answers) == 5  # never an error, never short
    after = counts(pg_dsn, name)
    assert after["archived"] == len(old) and after["documents"] == len(docs) + len(new) - len(old)
    assert all(vp.get(name, d["id"])["source_tier"] == "active" for d in new)
    assert {h.doc_id for h in vp.search("new7 fresh words about archival", [name], k=3).hits} & {"new7"}
    assert reconcile(vp.pool(), vp.store(), name)["problems"] == []


def test_an_archived_document_gone_from_the_source_is_no_longer_answered_and_comes_back_with_it(make_platform, pg_dsn, tmp_path):
    vp, name, docs, old = ingested_dated(make_platform, tmp_path, 90)
    archive.archive_rows(vp.pool(), vp.store(), pg_dsn, name, archive.cutoff_for(730, NOW))
    gone = sorted(old)[1]
    text = next(d["text"] for d in docs if d["id"] == gone)
    assert vp.search(text, [name], k=1, include_archive=True).hits[0].doc_id == gone

    write_jsonl(tmp_path / f"{name}.jsonl", [d for d in docs if d["id"] != gone])
    assert all(r.success for r in vp.ingest(name))
    got = vp.get(name, gone)
    assert got["source_tier"] == "archive" and got["deleted_at"] is not None  # still in its file, said to be gone
    assert gone not in {h.doc_id for h in vp.search(text, [name], k=10, include_archive=True).hits}

    write_jsonl(tmp_path / f"{name}.jsonl", docs)  # the source has it again, unchanged
    assert all(r.success for r in vp.ingest(name))
    assert vp.get(name, gone)["deleted_at"] is None
    assert vp.search(text, [name], k=1, include_archive=True).hits[0].doc_id == gone
    assert reconcile(vp.pool(), vp.store(), name)["problems"] == []
    # An archive larger than the memory budget is searched in parts of whole months: same answer.
    from vector_platform.archive.reads import ArchiveSearch

    whole = ArchiveSearch(root=tmp_path / "cache-a")
    parts = ArchiveSearch(root=tmp_path / "cache-b", memory_bytes=8 * 1024)  # a month or two at a time
    query = np.asarray(vp.embed_query(MINILM, text), dtype=np.float32)
    query /= np.linalg.norm(query)
    a = whole.search(vp.pool(), vp.store(), name, MINILM, MINILM.fingerprint, query, 7)
    b = parts.search(vp.pool(), vp.store(), name, MINILM, MINILM.fingerprint, query, 7)
    assert [r["chunk_id"] for r, _ in a.hits] == [r["chunk_id"] for r, _ in b.hits] and len(a.hits) == 7
    assert len(parts._memory) < a.months  # no part held more than the budget allows
