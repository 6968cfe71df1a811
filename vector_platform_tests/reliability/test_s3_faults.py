"""The S3 endpoint killed in the middle of a snapshot (evict, active -> cold), a rehydrate
(cold -> active) and a row archival (`archive_rows`).

How the kill is made: moto_server keeps its objects in memory, so killing the moto process
would lose every object, which is another failure (a store that forgets). Instead the
platform's object store (`s3://bucket/prefix`, with the endpoint setting and
AWS_ENDPOINT_URL both pointing at it) talks to a TCP proxy of this test's own in front of the
session's moto_server (`faultkit.TcpProxy`). "Killing S3" closes the proxy's listener and
resets every open connection mid-transfer: clients see connections reset, then refused,
as when an S3 endpoint dies; "restarting" listens again on the same port, and moto still
holds what was written. Each kill is armed to land after a number of bytes have gone through
(inside a snapshot file's upload, a snapshot file's download, and an archive batch's
uploads after a first batch was committed).

What is asserted, as a user would see it: the move fails and nothing is deleted (every row
is still in Postgres or in a receipted file on S3, read from moto directly while the proxy
is down), searches go on, a later run completes, and the product's own asset checks pass,
run as the product runs them: `snapshot_matches_table` by `cold_snapshot_job`,
`archive_reconciles` by `row_archive_job` (`Platform.archive_rows`).
"""

from __future__ import annotations

import time
from urllib.parse import urlparse

import boto3
import dagster as dg
import psycopg
import pytest

from vector_platform import catalog, clock, faults
from vector_platform.api import Platform
from vector_platform.archive import rows as archive
from vector_platform.archive.reconcile import archive_reconciles as reconcile
from vector_platform.defs.resources import ObjectStoreResource, PostgresResource
from vector_platform.models import MINILM
from vector_platform.tiers import snapshots

from ..conftest import FakeEmbedderResource, write_jsonl
from ..test_archive_rows import NOW, counts, dated
from .faultkit import Figures, TcpProxy

QUERIES = ["gamma delta", "alpha kappa sigma", "tau rho pi omicron", "zeta eta theta iota"]


@pytest.fixture
def s3_proxy(s3_endpoint, monkeypatch):
    """A TCP proxy in front of the session's moto_server; every S3 client of the platform
    (the endpoint setting, and AWS_ENDPOINT_URL for any store made from a URL alone) uses it."""
    proxy = TcpProxy(("127.0.0.1", urlparse(s3_endpoint).port))
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    yield proxy
    proxy.close()


@pytest.fixture
def platform(pg_dsn, dagster_instance, s3_url, s3_proxy, fake_embedder, tmp_path, monkeypatch) -> Platform:
    monkeypatch.setenv("VP_HOME", str(tmp_path / "vp"))  # restore downloads and cold caches of this test's own
    resources = {
        "postgres": PostgresResource(dsn=pg_dsn),
        "object_store": ObjectStoreResource(url=s3_url, endpoint_url=s3_proxy.url),
        "embedder": FakeEmbedderResource(),
    }
    return Platform(resources=resources, instance=dagster_instance)


def _moto_keys(s3_endpoint: str, s3_url: str, prefix: str) -> dict[str, int]:
    """Objects under `prefix` as moto holds them (read around the proxy): key -> size. The
    empty "folder/" markers pyarrow leaves when it deletes a folder's last file are no objects."""
    bucket, root = urlparse(s3_url).netloc, urlparse(s3_url).path.strip("/")
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{root}/{prefix}"):
        for item in page.get("Contents", []):
            if not item["Key"].endswith("/"):
                found[item["Key"][len(root) + 1:]] = item["Size"]
    return found


def _table_state(dsn: str, name: str) -> dict:
    with psycopg.connect(dsn) as conn:
        table = catalog.vector_table_name(conn, name, MINILM.key)
        coll = catalog.get_collection(conn, name)
        exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f"vp_vectors.{table}",)).fetchone()[0]
        rows, digest = snapshots.table_digest(conn, table) if exists else (None, None)
        receipts = conn.execute(
            "SELECT id, rows FROM vector_platform.snapshots WHERE collection = %s AND deleted_at IS NULL ORDER BY id", (name,)
        ).fetchall()
    return {"tier": coll.tier, "table_exists": exists, "rows": rows, "digest": digest, "receipts": receipts}


def _search(vp, name) -> dict:
    return {q: [h.chunk_id for h in vp.search(q, [name], k=10, exact=True).hits] for q in QUERIES}


def _check_snapshot(vp, name) -> tuple[bool, dict]:
    """snapshot_matches_table, as the product runs it: cold_snapshot_job of (collection, model)."""
    run = vp._run("cold_snapshot_job", dg.MultiPartitionKey({"collection": name, "model": MINILM.key}))
    assert run.success, run.error
    return run.checks["snapshot_matches_table"], run.check_metadata["snapshot_matches_table"]


def test_s3_killed_during_evict_rehydrate_and_row_archival_loses_nothing(platform, pg_dsn, s3_proxy, s3_endpoint, s3_url,
                                                                           tmp_path, monkeypatch):
    vp, proxy = platform, s3_proxy
    name = f"s3f_{int(time.time() * 1000) % 10**8}"
    docs = dated(240)
    vp.add_collection(name, write_jsonl(tmp_path / "docs.jsonl", docs))
    assert all(r.success for r in vp.ingest(name))
    before = _table_state(pg_dsn, name)
    answers = _search(vp, name)
    assert before["rows"] == len(docs)

    # ---- 1. evict: S3 dies inside the upload of the snapshot's first file.
    figures = Figures("s3_killed_during_snapshot")
    proxy.kill_after_bytes(120_000, "up")
    began = time.monotonic()
    run = vp.tier(name, "cold")
    figures.update(first_run_success=run.success, error=run.error, seconds_to_fail=round(time.monotonic() - began, 2),
                   killed_at=proxy.killed_at, rows_before=before["rows"])
    assert not run.success and proxy.killed_at and "uploading" in proxy.killed_at["reason"]
    assert run.error and "upload" in run.error.lower() and "connect" in run.error.lower(), run.error  # what failed, and why
    mid = _table_state(pg_dsn, name)
    figures.update(rows_after_kill=mid["rows"], tier_after_kill=mid["tier"], receipts_after_kill=len(mid["receipts"]),
                   objects_left_by_the_failed_upload=len(_moto_keys(s3_endpoint, s3_url, f"collections/{name}/snapshots")))
    # Nothing deleted: still active, the same rows, no receipt; search answers as before.
    assert (mid["tier"], mid["rows"], mid["digest"], mid["receipts"]) == ("active", before["rows"], before["digest"], [])
    assert _search(vp, name) == answers

    proxy.restart()
    began = time.monotonic()
    run = vp.tier(name, "cold")
    figures.update(rerun_success=run.success, rerun_seconds=round(time.monotonic() - began, 2))
    assert run.success, run.error
    cold = _table_state(pg_dsn, name)
    assert cold["tier"] == "cold" and not cold["table_exists"] and [r for _, r in cold["receipts"]] == [before["rows"]]
    passed, meta = _check_snapshot(vp, name)  # cold: the serving snapshot read back in full
    figures.update(snapshot_matches_table=passed, snapshot_rows=meta.get("snapshot_rows"),
                   objects_after_rerun=len(_moto_keys(s3_endpoint, s3_url, f"collections/{name}/snapshots")))
    assert passed is True and meta["snapshot_rows"] == before["rows"], meta
    assert _search(vp, name) == answers  # served cold, exactly the same ids
    figures.save()

    # ---- 2. rehydrate: S3 dies inside the download of the snapshot's file.
    figures = Figures("s3_killed_during_rehydrate")
    snapshot_objects = _moto_keys(s3_endpoint, s3_url, f"collections/{name}/snapshots")
    proxy.kill_after_bytes(120_000, "down")
    began = time.monotonic()
    run = vp.tier(name, "active")
    figures.update(first_run_success=run.success, error=run.error, seconds_to_fail=round(time.monotonic() - began, 2),
                   killed_at=proxy.killed_at)
    assert not run.success and "downloading" in proxy.killed_at["reason"]
    assert f"snapshot {cold['receipts'][0][0]}: reading collections/{name}/snapshots/" in run.error, run.error
    assert "from the object store failed" in run.error and "keeps its tier" in run.error
    mid = _table_state(pg_dsn, name)
    cold_during_outage = vp.search(QUERIES[0], [name], k=10)
    figures.update(tier_after_kill=mid["tier"], rows_in_partial_table=mid["rows"],
                   search_during_outage={"hits": len(cold_during_outage.hits), "warnings": cold_during_outage.warnings})
    # Still cold and served from its snapshot, which is whole on S3 (read around the proxy).
    assert mid["tier"] == "cold" and mid["receipts"] == cold["receipts"]
    assert _moto_keys(s3_endpoint, s3_url, f"collections/{name}/snapshots") == snapshot_objects
    assert [h.chunk_id for h in cold_during_outage.hits] == answers[QUERIES[0]]

    proxy.restart()
    began = time.monotonic()
    run = vp.tier(name, "active")
    figures.update(rerun_success=run.success, rerun_seconds=round(time.monotonic() - began, 2))
    assert run.success, run.error
    back = _table_state(pg_dsn, name)
    figures.update(rows_after_rerun=back["rows"])
    assert (back["tier"], back["rows"], back["digest"]) == ("active", before["rows"], before["digest"])
    passed, meta = _check_snapshot(vp, name)  # active: the table's digest is the snapshot's, its files are there
    figures["snapshot_matches_table"] = passed
    assert passed is True, meta
    assert _search(vp, name) == answers
    figures.save()

    # ---- 3. row archival: a first batch archived, S3 dies inside the next batch's uploads.
    figures = Figures("s3_killed_during_row_archival")
    vp.set_rules(name, archive_rows_older_than_days=730)
    cutoff = archive.cutoff_for(730, NOW)
    old = {d["id"] for d in docs if d["timestamp"] < cutoff.timestamp()}
    before = counts(pg_dsn, name)
    armed = []

    def arm_after_first_batch(point: str) -> None:
        if point == "archive_rows.after_batch" and not armed:
            armed.append(point)
            proxy.kill_after_bytes(15_000, "up")

    monkeypatch.setattr(faults, "point", arm_after_first_batch)
    began = time.monotonic()
    with pytest.raises(Exception) as failure:
        archive.archive_rows(vp.pool(), vp.store(), pg_dsn, name, cutoff, batch_documents=20)
    monkeypatch.setattr(faults, "point", lambda point: None)
    mid = counts(pg_dsn, name)
    with psycopg.connect(pg_dsn) as conn:
        [(status, job_error)] = conn.execute(
            "SELECT status, error FROM vector_platform.archival_jobs WHERE collection = %s", (name,)).fetchall()
        archived = {r[0] for r in conn.execute("SELECT doc_id FROM vector_platform.archived_documents WHERE collection = %s", (name,))}
        live = {r[0] for r in conn.execute("SELECT doc_id FROM vector_platform.documents WHERE collection = %s", (name,))}
        receipts = dict(conn.execute("SELECT key, bytes FROM vector_platform.archive_files WHERE collection = %s", (name,)).fetchall())
    on_s3 = _moto_keys(s3_endpoint, s3_url, f"archive/{name}")
    figures.update(old_documents=len(old), error=f"{failure.type.__name__}: {failure.value}"[:500],
                   seconds_to_fail=round(time.monotonic() - began, 2), killed_at=proxy.killed_at, job_status=status,
                   archived_before_kill=mid["archived"], live_old_after_kill=mid["live_old"], receipts_after_kill=len(receipts),
                   objects_on_s3_after_kill=len(on_s3))
    assert "uploading" in proxy.killed_at["reason"] and status == "failed"
    # The job's error (in `status` and the run) names the file and says what it means for the rows.
    assert failure.type is archive.ArchiveStoreError and job_error.startswith(f"ArchiveStoreError: archive/{name}/year="), job_error
    assert "nothing of its batch was deleted" in job_error
    assert mid["archived"] == 20 and mid["live_old"] == len(old) - 20  # the first batch, whole; the rest untouched
    # Nothing lost: every document is live in Postgres or archived under a receipt whose file is on S3.
    assert live | archived == {d["id"] for d in docs} and not live & archived
    assert receipts and all(on_s3.get(key) == size for key, size in receipts.items())

    proxy.restart()
    clock.set_now(NOW)
    try:
        began = time.monotonic()
        run = vp.archive_rows(name)  # row_archive_job: the asset and its archive_reconciles check, at NOW
    finally:
        clock.set_now(None)
    figures.update(rerun_success=run.success, rerun_seconds=round(time.monotonic() - began, 2),
                   archive_reconciles=run.checks.get("archive_reconciles"),
                   rerun_documents=run.metadata.get("row_archive", {}).get("documents"))
    assert run.success and run.checks == {"archive_reconciles": True}, (run.error, run.check_metadata)
    after = counts(pg_dsn, name)
    figures.update(archived_after_rerun=after["archived"], live_old_after_rerun=after["live_old"],
                   documents_after_rerun=after["documents"])
    assert after["archived"] == len(old) and after["live_old"] == 0 and after["documents"] == before["documents"] - len(old)
    full = reconcile(vp.pool(), vp.store(), name, sample_fraction=1.0)  # every archived document read back
    figures["full_reconcile_problems"] = full["problems"]
    assert full["problems"] == [] and full["sampled_documents"] == len(old)
    with psycopg.connect(pg_dsn) as conn:
        keys = [r[0] for r in conn.execute("SELECT key FROM vector_platform.archive_files WHERE collection = %s", (name,))]
    assert len(keys) == len(set(keys))
    # The files the killed batch left without a receipt were swept by the resumed job: on S3,
    # exactly the receipted files and the job's manifest.
    left = set(_moto_keys(s3_endpoint, s3_url, f"archive/{name}")) - set(keys)
    figures["objects_without_receipt_after_rerun"] = sorted(left)
    assert left == {f"archive/{name}/manifests/job-{run.metadata['row_archive']['job_id']:06d}.json"}, left
    figures.save()
