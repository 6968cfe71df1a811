"""Backup, list, drop and restore of collections: against the embedded PostgreSQL, a file://
primary store, and backup locations on file:// and on moto's S3 over HTTP."""

import json
import signal
import subprocess
import uuid

import numpy as np
import psycopg
import pytest

from vector_platform import catalog, tables
from vector_platform.backup import BackupCorrupt, BackupError
from vector_platform.backup.drop import DropRefused
from vector_platform.backup.restore import RestoreRefused

from .conftest import FAKES, cli, cli_env, write_jsonl

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()
QUERIES = ["gamma delta", "alpha kappa sigma", "tau rho pi omicron", "beta", "zeta eta theta iota"]


def corpus(n: int, tag: str) -> list[dict]:
    return [
        {
            "id": f"{tag}{i}",
            "title": f"title {tag}{i}",
            "text": f"{tag}{i} " + " ".join(WORDS[(i * 7 + j * (1 + i % 3)) % len(WORDS)] for j in range(4 + i % 7)),
            "timestamp": f"2024-{1 + i % 12:02d}-15T00:00:00Z",
            "metadata": {"tag": tag, "odd": i % 2},
        }
        for i in range(n)
    ]


def ingested(vp, tmp_path, n=80, tag="d"):
    name = f"bk_{uuid.uuid4().hex[:8]}"
    vp.add_collection(name, write_jsonl(tmp_path / f"{name}.jsonl", corpus(n, tag)))
    runs = vp.ingest(name)
    assert all(r.success for r in runs), [r.error for r in runs]
    return name


def answers(vp, name: str, exact: bool) -> dict:
    """Per query: (doc id, chunk id, score) of the hits, and the tier they came from."""
    out = {}
    for q in QUERIES:
        result = vp.search(q, [name], k=10, exact=exact)
        out[q] = [(h.doc_id, h.chunk_id, h.score) for h in result.hits]
        assert result.hits
    return out


def without_chunk_ids(found: dict) -> dict:
    return {q: [(doc, score) for doc, _, score in hits] for q, hits in found.items()}


def same_up_to_float32(a: dict, b: dict) -> bool:
    return all([h[:2] for h in a[q]] == [h[:2] for h in b[q]] and np.allclose([h[2] for h in a[q]], [h[2] for h in b[q]], atol=1e-5)
               for q in QUERIES)


def table_rows(pg_dsn, name: str) -> int:
    with psycopg.connect(pg_dsn) as conn:
        table = catalog.vector_table_name(conn, name, "minilm_l6_v2")
        return tables.table_stats(conn, table)[0]


def vector_tables_of(pg_dsn, name: str) -> list[str]:
    with psycopg.connect(pg_dsn) as conn:
        return [r[0] for r in conn.execute(
            "SELECT relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname IN ('vp_vectors', 'vp_serving') AND relname LIKE %s", (name + "%",))]


def test_backup_drop_restore_returns_the_same_answers_without_embedding(make_platform, pg_dsn, tmp_path):
    vp = make_platform()
    name = ingested(vp, tmp_path)
    hnsw, exact = answers(vp, name, exact=False), answers(vp, name, exact=True)
    docs = {d: vp.get(name, d) for d in ("d0", "d7", "d42")}
    location = (tmp_path / "backups").as_uri()

    info = vp.backup(name, to=location)
    assert info.rows == {"minilm_l6_v2": table_rows(pg_dsn, name)} and info.documents == 80 and info.tier == "active"
    listed = vp.backups(name, location)
    assert [b.id for b in listed] == [info.id]
    assert listed[0].bytes == info.bytes > 0 and listed[0].row_archive["included"] is False

    report = vp.drop_collection(name, backups=location)
    assert report.backup_id == info.id and report.tables
    with pytest.raises(KeyError):
        vp.collection(name)
    assert vector_tables_of(pg_dsn, name) == []
    assert name not in vp.instance.get_dynamic_partitions("collection")

    embedded = FAKES["minilm_l6_v2"].calls
    restored = vp.restore(name, location)
    assert restored.collection == name and restored.backup_id == info.id and restored.vectors == info.rows
    assert FAKES["minilm_l6_v2"].calls == embedded, "a restore never embeds"
    assert name in vp.instance.get_dynamic_partitions("collection")
    assert answers(vp, name, exact=True) == exact
    assert answers(vp, name, exact=False) == hnsw
    assert {d: vp.get(name, d) for d in docs} == docs
    with psycopg.connect(pg_dsn) as conn:
        assert tables.current_index(conn, catalog.vector_table_name(conn, name, "minilm_l6_v2")) is not None


@pytest.fixture(autouse=True)
def _flush_query_log(pg_dsn):
    """Searches log in batches off the request path: written before the server stops at the end."""
    yield
    from vector_platform import db
    from vector_platform.search import flush_query_log

    flush_query_log(db.get_pool(pg_dsn))


def collection_exists(pg_dsn, name: str) -> bool:
    with psycopg.connect(pg_dsn) as conn:
        return catalog.get_collection(conn, name, missing_ok=True) is not None


def test_restore_as_new_beside_the_original_from_s3_and_a_later_ingest_adds_nothing(make_platform, pg_dsn, tmp_path, s3_url):
    vp = make_platform()
    docs = corpus(60, "s") + [{"id": "poison", "text": "POISON_NAN this one the model answers with a NaN"}]
    name = f"bk_{uuid.uuid4().hex[:8]}"
    source = write_jsonl(tmp_path / "s.jsonl", docs)
    vp.add_collection(name, source)
    assert all(r.success for r in vp.ingest(name))
    exact = answers(vp, name, exact=True)
    location = s3_url.replace("/platform", "/backups")  # the same bucket, another prefix than the primary's

    info = vp.backup(name, to=location)
    assert info.uri.startswith("s3://") and vp.backups(name, location)[0].id == info.id
    new = f"{name}_copy"
    fake = FAKES["minilm_l6_v2"]
    calls = fake.calls
    report = vp.restore(name, location, as_name=new)
    assert report.renamed_from == name and report.vectors == info.rows and fake.calls == calls

    # Both serve the same documents with the same scores; the copy's chunk ids are its own.
    assert without_chunk_ids(answers(vp, new, exact=True)) == without_chunk_ids(exact)
    assert without_chunk_ids(answers(vp, new, exact=False)) == without_chunk_ids(answers(vp, name, exact=False))
    assert answers(vp, name, exact=True) == exact
    assert vp.get(new, "s3")["body"] == vp.get(name, "s3")["body"]
    with psycopg.connect(pg_dsn) as conn:
        from vector_platform.catalog import documents as docs_sql
        from vector_platform.ingest.chunking import chunk_id

        table = catalog.vector_table_name(conn, new, "minilm_l6_v2")
        for chunk, doc, text in conn.execute("SELECT chunk_id, doc_id, text FROM vector_platform.chunks WHERE collection = %s", (new,)):
            assert chunk == chunk_id(new, doc, text)
        assert docs_sql.count_lost(conn, new, "minilm_l6_v2", tables.table_id(table)) == {
            "lost": 0, "orphans": 0, "live_chunks": len(docs)}
        (ref,) = conn.execute("SELECT ref FROM vector_platform.dead_letters WHERE collection = %s AND resolved_at IS NULL", (new,)).fetchone()
        assert ref == str(chunk_id(new, "poison", docs[-1]["text"])), "the dead letter follows its chunk's new id"

    # An ingest of the same source into the copy finds everything in place: only the dead-lettered
    # chunk goes to the model again (as every ingest retries it), nothing is written.
    rows, texts = table_rows(pg_dsn, new), len(fake.texts)
    runs = vp.ingest(new)
    assert all(r.success for r in runs), [r.error for r in runs]
    assert set(fake.texts[texts:]) <= {docs[-1]["text"]}
    assert table_rows(pg_dsn, new) == rows
    assert all(passed for run in runs for passed in run.checks.values())


def test_a_corrupted_or_incomplete_backup_is_refused_and_nothing_is_created(make_platform, pg_dsn, tmp_path):
    vp = make_platform()
    name = ingested(vp, tmp_path, n=40)
    location = tmp_path / "backups"
    info = vp.backup(name, to=location.as_uri())
    part = next((location / name / info.id / "vectors" / "minilm_l6_v2").glob("part-*.parquet"))
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))

    with pytest.raises(BackupCorrupt, match="does not match its checksum"):
        vp.restore(name, location.as_uri(), as_name=f"{name}_x")
    assert not collection_exists(pg_dsn, f"{name}_x") and vector_tables_of(pg_dsn, f"{name}_x") == []
    with pytest.raises(DropRefused, match="no longer reads back"):
        vp.drop_collection(name, backups=location.as_uri())
    assert collection_exists(pg_dsn, name)

    # A backup without its manifest (one that never finished) is neither listed nor restored.
    (location / name / info.id / "manifest.json").unlink()
    assert vp.backups(name, location.as_uri()) == []
    with pytest.raises(BackupError, match="no complete backup"):
        vp.restore(name, location.as_uri(), as_name=f"{name}_y")
    with pytest.raises(DropRefused, match="no backup of"):
        vp.drop_collection(name, backups=location.as_uri())


def test_a_cold_collection_comes_back_cold_then_rehydrates_without_embedding(make_platform, pg_dsn, tmp_path):
    vp = make_platform()
    name = ingested(vp, tmp_path, n=50)
    hot = answers(vp, name, exact=True)
    assert vp.tier(name, "cold").success
    cold = answers(vp, name, exact=True)
    assert same_up_to_float32(cold, hot)  # cold search scores in numpy, pgvector in C: equal to ~1e-7
    location = (tmp_path / "backups").as_uri()
    info = vp.backup(name, to=location)
    assert info.tier == "cold" and info.manifest["vectors"]["minilm_l6_v2"]["source"].startswith("cold snapshot")
    vp.drop_collection(name, backups=location)
    assert not list((tmp_path / "objects" / "collections").glob(f"{name}/**/*.parquet")), "the snapshot files went with it"

    fake = FAKES["minilm_l6_v2"]
    calls = fake.calls
    report = vp.restore(name, info.uri)  # the backup's own folder
    assert fake.calls == calls, "a restore never embeds"
    assert report.tier == "cold" and vp.collection(name).tier == "cold" and report.snapshots
    assert vector_tables_of(pg_dsn, name) == []
    assert answers(vp, name, exact=True) == cold
    calls = fake.calls
    run = vp.tier(name, "active")  # the new snapshot's digest is what the restored table must have
    assert run.success, run.error
    assert fake.calls == calls
    assert same_up_to_float32(answers(vp, name, exact=True), hot)


def test_drop_needs_a_backup_of_the_current_state(make_platform, pg_dsn, tmp_path):
    vp = make_platform()
    name = ingested(vp, tmp_path, n=30)
    location = (tmp_path / "backups").as_uri()
    with pytest.raises(DropRefused, match="no backup of"):
        vp.drop_collection(name, backups=location)
    with pytest.raises(BackupError, match="overlaps the primary object store"):
        vp.backup(name, to=(tmp_path / "objects" / "backups").as_uri())

    vp.backup(name, to=location)
    vp.set_settings(name, recall_target=0.9)  # the collection changed since its backup
    with pytest.raises(DropRefused, match="does not hold its current state .*definition"):
        vp.drop_collection(name, backups=location)
    assert collection_exists(pg_dsn, name) and table_rows(pg_dsn, name) > 0
    with pytest.raises(RestoreRefused, match="exists"):
        vp.restore(name, location)
    with pytest.raises(BackupError, match="is a backup of collection"):
        vp.restore("another_one", vp.backups(name, location)[0].uri)

    report = vp.drop_collection(name, force=True)
    assert report.forced and report.backup_id is None and not collection_exists(pg_dsn, name)
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT forced, backup_uri, files_removed_at IS NOT NULL FROM vector_platform.dropped_collections "
                            "WHERE collection = %s", (name,)).fetchall() == [(True, None, True)]
    with pytest.raises(KeyError):
        vp.drop_collection(name, force=True)


def test_missing_models_are_registered_and_a_model_key_with_another_identity_is_refused(make_platform, pg_dsn, tmp_path,
                                                                                         monkeypatch):
    from vector_platform.backup import restore as restore_module
    from vector_platform.models import ModelSpec

    vp = make_platform()
    key = f"m_{uuid.uuid4().hex[:8]}"
    vp.add_model(ModelSpec(key, "local", "fake/small", dims=32, storage_type="halfvec"))
    name = f"bk_{uuid.uuid4().hex[:8]}"
    vp.add_collection(name, write_jsonl(tmp_path / "m.jsonl", corpus(30, "m")), model=key)
    assert all(r.success for r in vp.ingest(name))
    exact = answers(vp, name, exact=True)
    location = (tmp_path / "backups").as_uri()
    vp.backup(name, to=location)
    vp.drop_collection(name, backups=location)

    # As in another database where the key means another model: refused, nothing written.
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("UPDATE vector_platform.models SET dims = 48 WHERE key = %s", (key,))
    with pytest.raises(RestoreRefused, match="registered here as another model"):
        vp.restore(name, location)
    assert not collection_exists(pg_dsn, name)

    # As in a fresh database: the model is registered from the backup's spec. The halfvec rows
    # go through a staging table, several batches in the one transaction.
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM vector_platform.models WHERE key = %s", (key,))
    monkeypatch.setattr(restore_module, "BATCH_ROWS", 7)
    report = vp.restore(name, location)
    assert report.models_registered == [key]
    with psycopg.connect(pg_dsn) as conn:
        assert catalog.get_model(conn, key).storage_type == "halfvec"
    assert key in vp.instance.get_dynamic_partitions("model")
    assert answers(vp, name, exact=True) == exact


def snapshot_files(tmp_path, name: str) -> set[str]:
    root = tmp_path / "objects"
    return {str(p.relative_to(root)) for p in root.glob(f"collections/{name}/snapshots/**/*") if p.is_file()}


def test_cli_backup_list_drop_restore_and_killed_drops_and_restores_are_finished_by_a_rerun(make_platform, pg_dsn, tmp_path):
    vp = make_platform()  # the same database and object store as the CLI's (cli_env)
    name = ingested(vp, tmp_path, n=40)
    assert vp.tier(name, "cold").success  # its vectors are files on the object store
    exact = answers(vp, name, exact=True)
    old_files = snapshot_files(tmp_path, name)
    env = cli_env(pg_dsn, tmp_path)

    def run(*args, **extra):
        return subprocess.run(cli(*args), env={**env, **extra}, capture_output=True, text=True, timeout=300)

    refused = run("collections", "drop", name)
    assert refused.returncode == 2 and "no backup of" in refused.stderr, refused.stderr
    made = run("backup", name, "--json")
    assert made.returncode == 0, made.stderr
    backup_id = json.loads(made.stdout)["id"]
    assert (tmp_path / "home" / "backups" / name / backup_id / "manifest.json").exists()  # the default location
    listed = run("backups", name, "--json")
    assert [b["id"] for b in json.loads(listed.stdout)["backups"]] == [backup_id]
    assert backup_id in run("backups", name).stdout

    # Killed after its commit: the collection is gone, its files are not (yet).
    killed = run("collections", "drop", name, VP_FAILPOINT="drop.after_catalog")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not collection_exists(pg_dsn, name) and snapshot_files(tmp_path, name) == old_files

    # A restore killed before its commit: nothing in Postgres. It finished the drop first.
    killed = run("restore", name, VP_FAILPOINT="restore.before_commit")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not collection_exists(pg_dsn, name) and vector_tables_of(pg_dsn, name) == [], "a killed restore leaves nothing"
    assert not snapshot_files(tmp_path, name) & old_files
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM vector_platform.dropped_collections WHERE collection = %s "
                            "AND files_removed_at IS NULL", (name,)).fetchone()[0] == 0

    restored = run("restore", name)
    assert restored.returncode == 0 and f"restored from backup {backup_id}" in restored.stdout, restored.stderr
    assert vp.collection(name).tier == "cold" and answers(vp, name, exact=True) == exact
    with psycopg.connect(pg_dsn) as conn:  # what the killed attempt published was swept: one snapshot serves
        [(prefix,)] = conn.execute("SELECT manifest->>'prefix' FROM vector_platform.snapshots WHERE collection = %s "
                                   "AND deleted_at IS NULL", (name,)).fetchall()
    assert snapshot_files(tmp_path, name) and all(f.startswith(prefix + "/") for f in snapshot_files(tmp_path, name))
    again = run("restore", name)
    assert again.returncode == 2 and "exists" in again.stderr


def test_the_row_archive_is_not_in_backups_so_drop_refuses_and_restore_says_so(make_platform, pg_dsn, tmp_path):
    import datetime as dt

    from vector_platform import clock

    vp = make_platform()
    now = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)
    docs = corpus(40, "r")
    for i, doc in enumerate(docs):  # half of them older than the rule's two years
        doc["timestamp"] = (now - dt.timedelta(days=900 if i % 2 else 30 + i)).timestamp()
    name = f"bk_{uuid.uuid4().hex[:8]}"
    vp.add_collection(name, write_jsonl(tmp_path / "r.jsonl", docs))
    assert all(r.success for r in vp.ingest(name))
    vp.set_rules(name, archive_rows_older_than_days=730)
    clock.set_now(now)
    try:
        assert vp.archive_rows(name).success
    finally:
        clock.set_now(None)
    exact = answers(vp, name, exact=True)
    location = (tmp_path / "backups").as_uri()

    info = vp.backup(name, to=location)
    assert info.row_archive["included"] is False and info.row_archive["documents"] == 20 and info.documents == 20
    with pytest.raises(DropRefused, match="row archive"):
        vp.drop_collection(name, backups=location)

    new = f"{name}_r"
    report = vp.restore(name, location, as_name=new)
    assert any("row archive" in w and "20 documents" in w for w in report.warnings)
    with psycopg.connect(pg_dsn) as conn:  # the rule came along: the table is made month-partitioned
        assert tables.is_partitioned(conn, catalog.vector_table_name(conn, new, "minilm_l6_v2"))
    assert without_chunk_ids(answers(vp, new, exact=True)) == without_chunk_ids(exact)
    assert without_chunk_ids(answers(vp, new, exact=False)) == without_chunk_ids(exact)

    assert list((tmp_path / "objects").glob(f"archive/{name}/**/*.parquet"))
    vp.drop_collection(name, force=True)
    assert list((tmp_path / "objects").glob(f"archive/{name}/**/*.parquet")) == [], "its archive files went too"


def test_a_cold_snapshot_that_no_longer_matches_its_receipt_is_not_backed_up(make_platform, tmp_path, s3_url):
    from vector_platform.object_store import ObjectStore

    vp = make_platform()
    name = ingested(vp, tmp_path, n=20)
    assert vp.tier(name, "cold").success
    part = next((tmp_path / "objects" / "collections" / name / "snapshots").glob("**/part-*.parquet"))
    data = bytearray(part.read_bytes())
    data[len(data) // 3] ^= 0x01
    part.write_bytes(bytes(data))
    location = s3_url.replace("/platform", "/backups")
    with pytest.raises(BackupCorrupt, match="does not match its receipt"):
        vp.backup(name, to=location)
    assert ObjectStore.from_url(location).list(name) == [], "what was written before the check failed is removed"
    assert vp.backups(name, location) == []
