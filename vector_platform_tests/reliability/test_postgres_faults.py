"""PostgreSQL stopped (`pg_ctl stop -m immediate`, the wheel's own pg_ctl) in the middle of a
bulk load and of an index build, on a server of this module's own: never the session's
shared `pg_server`, which other tests use.

Each stop lands at a known moment: between two committed COPY batches of the load (the
`load.after_batch` failpoint, replaced here by a function that stops the server), and while
CREATE INDEX CONCURRENTLY waits for old snapshots (pg_stat_progress_create_index says so:
the new index is built but not yet valid; a transaction of the test holds the snapshot).

What a user would notice is asserted: the run fails saying the database is unreachable and
naming it; once the server is back a re-run in the same process (whose pools the stop cut)
converges to exactly the rows of a clean run, each chunk once, none missing; a restart
shorter than the wait for a connection is ridden out; and search never uses an invalid
index (`pg_index.indisvalid` is read and the plan of a search is explained).

The product's index build: the first build of a table is a plain CREATE INDEX (one
transaction: a crash leaves no index, and search scans exactly until the re-run builds it);
a rebuild (m or ef_construction changed) is CREATE INDEX CONCURRENTLY into `<table>_hnsw_new`,
swapped in once valid; a crash leaves that index invalid, and the next build drops it.
"""

from __future__ import annotations

import threading
import time
import uuid

import dagster as dg
import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from vector_platform import catalog, faults, tables
from vector_platform.api import Platform
from vector_platform.defs.resources import ObjectStoreResource, PostgresResource
from vector_platform.models import MINILM
from vector_platform.search import active, flush_query_log

from ..conftest import FakeEmbedderResource, write_jsonl
from .faultkit import Figures, OwnPostgres, wait_for

WAIT_S = 3.0  # how long a step waits for a connection before it fails (the product's default is 30 s)


@pytest.fixture(scope="module")
def own_pg(tmp_path_factory):
    server = OwnPostgres(tmp_path_factory.mktemp("pg_faults") / "data")
    yield server
    server.cleanup()


def _platform(own_pg, instance, tmp_path, wait_s: float) -> Platform:
    """A platform on a fresh database of the module's own server, with the fake embedder."""
    dsn = own_pg.create_database(f"faults_{uuid.uuid4().hex[:8]}")
    resources = {
        "postgres": PostgresResource(dsn=dsn, wait_for_connection_s=wait_s),
        "object_store": ObjectStoreResource(url=(tmp_path / "objects").as_uri()),
        "embedder": FakeEmbedderResource(),
    }
    return Platform(resources=resources, instance=instance)


@pytest.fixture
def platform(own_pg, dagster_instance, tmp_path, fake_embedder):
    vp = _platform(own_pg, dagster_instance, tmp_path, WAIT_S)
    yield vp
    if own_pg.running():
        flush_query_log(vp.pool())  # now, not at exit, when this server is gone


def _docs(n: int) -> list[dict]:
    return [{"id": f"doc{i:05d}", "text": " ".join(f"term{(i * 13 + j) % 211}" for j in range(60)) + f" unique{i}"}
            for i in range(n)]


def _state(dsn: str, name: str) -> dict:
    """What a user compares: the catalog's chunk ids against the table's rows."""
    with psycopg.connect(dsn) as conn:
        table = catalog.vector_table_name(conn, name, MINILM.key)
        chunk_ids = {r[0] for r in conn.execute("SELECT chunk_id FROM vector_platform.chunks WHERE collection = %s", (name,))}
        rows, docs = [], set()
        if tables.table_exists(conn, table):
            for chunk_id, doc_id in conn.execute(sql.SQL("SELECT chunk_id, doc_id FROM {}").format(sql.Identifier("vp_vectors", table))):
                rows.append(chunk_id)
                docs.add(doc_id)
    return {"table": table, "chunk_ids": chunk_ids, "rows": len(rows), "distinct": len(set(rows)),
            "missing": len(chunk_ids - set(rows)), "extra": len(set(rows) - chunk_ids), "docs": docs}


def _indexes(dsn: str, table: str) -> list[tuple[str, bool, list[str]]]:
    """(name, indisvalid, options) of the table's HNSW indexes."""
    with psycopg.connect(dsn) as conn:
        return [tuple(r) for r in conn.execute(
            """
            SELECT i.relname, x.indisvalid, coalesce(i.reloptions, '{}')
            FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid
            JOIN pg_namespace n ON n.oid = t.relnamespace JOIN pg_am am ON am.oid = i.relam
            WHERE n.nspname = 'vp_vectors' AND t.relname = %s AND am.amname = 'hnsw' ORDER BY i.relname
            """, (table,))]


def _search_plan(dsn: str, name: str) -> str:
    """The plan of an ANN search of the collection's serving view, with search's own settings."""
    from pgvector.psycopg import register_vector

    with psycopg.connect(dsn, autocommit=True) as conn:
        register_vector(conn)
        view = sql.Identifier("vp_serving", name)
        vector = conn.execute(sql.SQL("SELECT embedding FROM {} LIMIT 1").format(view)).fetchone()[0]
        return active.explain_nearest(conn, view, MINILM, vector.to_numpy(), exact=False)


def _assert_clear(error: str | None, dsn: str) -> None:
    """The error a user reads says the database is unreachable and which one; no traceback."""
    assert error, "the run failed without an error"
    dbname = conninfo_to_dict(dsn)["dbname"]
    assert "database is unreachable" in error and dbname in error, error
    assert "Traceback" not in error and "run it again" in error.lower(), error


def _runs(runs) -> list[dict]:
    return [{"job": r.job, "success": r.success, "error": r.error} for r in runs]


def test_postgres_stopped_during_the_bulk_load_then_a_rerun_converges(platform, own_pg, tmp_path, monkeypatch, capsys):
    figures = Figures("postgres_stopped_during_bulk_load")
    vp = platform
    dsn = vp.postgres.resolved_dsn()
    name = f"pgload_{uuid.uuid4().hex[:6]}"
    docs = _docs(300)
    vp.add_collection(name, write_jsonl(tmp_path / "docs.jsonl", docs))
    monkeypatch.setenv("VP_LOAD_BATCH_ROWS", "50")

    batches, stopped = [], {}

    def stop_after_two_batches(point: str) -> None:
        if point == "load.after_batch":
            batches.append(point)
            if len(batches) == 2:
                stopped["stop_seconds"] = own_pg.stop_immediately()
                stopped["at"] = time.monotonic()

    monkeypatch.setattr(faults, "point", stop_after_two_batches)
    runs = vp.ingest(name)
    failed_after = time.monotonic() - stopped["at"]
    monkeypatch.setattr(faults, "point", lambda point: None)
    figures.update(first_runs=_runs(runs), seconds_from_stop_to_failure=round(failed_after, 2), wait_for_connection_s=WAIT_S)

    assert [r.job for r in runs] == ["ingest_documents_job", "embed_and_index_job"] and runs[0].success
    assert not runs[1].success
    _assert_clear(runs[1].error, dsn)
    assert failed_after < WAIT_S + 15, "the run must fail soon after the database went away, not hang"

    # While it is down, the command line says so too, without a traceback (`main` is what the
    # `vector-platform` command runs; a DSN of its own, so that it makes its own pool).
    from vector_platform import cli

    monkeypatch.setenv("VP_PG_DSN", f"{dsn}&application_name=vp_cli")
    monkeypatch.setenv("VP_HOME", str(tmp_path / "cli_home"))
    began = time.monotonic()
    code = cli.main(["ingest", name, "--quiet"])
    said = capsys.readouterr().err
    figures.update(cli_exit_code=code, cli_error=said.strip(), cli_seconds=round(time.monotonic() - began, 2))
    assert code == 2 and said.startswith("error: the database is unreachable") and "Traceback" not in said, said
    _assert_clear(said, dsn)

    figures["seconds_to_start_again"] = round(own_pg.start(), 2)
    mid = _state(dsn, name)
    figures.update(chunks=len(mid["chunk_ids"]), rows_after_stop=mid["rows"])
    assert len(mid["chunk_ids"]) == len(docs)  # one chunk per document
    assert mid["rows"] == 100 and mid["distinct"] == 100 and mid["extra"] == 0  # the two committed batches, whole

    began = time.monotonic()
    # The same process: its pools hold connections the stop cut, and were backing their
    # reconnection attempts off while the server was down (the first re-run timed out here
    # before the pools gave up on backed-off attempts after 2 s: db.RECONNECT_S).
    runs = vp.ingest(name)
    figures.update(rerun=_runs(runs), rerun_seconds=round(time.monotonic() - began, 2))
    assert all(r.success for r in runs), _runs(runs)
    embed_run = runs[1]
    figures.update(rerun_embedded=embed_run.metadata["embeddings"]["embedded"],
                   rerun_from_cache=embed_run.metadata["embeddings"]["from_cache"],
                   rerun_inserted=embed_run.metadata["vector_table"]["inserted"])
    assert embed_run.metadata["embeddings"]["embedded"] == 0  # every vector came from the cache
    assert embed_run.metadata["vector_table"]["inserted"] == len(docs) - 100
    assert embed_run.checks["no_chunk_lost"] is True and embed_run.checks["embeddings_are_valid"] is True

    end = _state(dsn, name)
    figures.update(rows_after_rerun=end["rows"], distinct_after_rerun=end["distinct"], missing=end["missing"], extra=end["extra"])
    assert end["rows"] == end["distinct"] == len(end["chunk_ids"]) == len(docs)
    assert end["missing"] == end["extra"] == 0 and end["docs"] == {d["id"] for d in docs}
    [(index, valid, _)] = _indexes(dsn, end["table"])
    plan = _search_plan(dsn, name)
    figures["plan_after_rerun"] = plan.splitlines()[1].strip()
    assert valid and f"Index Scan using {index} " in plan
    assert len(vp.search("term5 term17", [name], k=5).hits) == 5
    figures.save()


def test_a_restart_shorter_than_the_connection_wait_is_ridden_out(own_pg, dagster_instance, fake_embedder, tmp_path, monkeypatch):
    """The server stopped between two batches and started again a second later: the load
    waits for it and completes in the same run. Before the pools checked their connections,
    the next step was lent one the stop had cut, and the run failed at once."""
    figures = Figures("postgres_restarted_between_batches")
    vp = _platform(own_pg, dagster_instance, tmp_path, wait_s=20.0)
    dsn = vp.postgres.resolved_dsn()
    name = f"pgblip_{uuid.uuid4().hex[:6]}"
    docs = _docs(200)
    vp.add_collection(name, write_jsonl(tmp_path / "docs.jsonl", docs))
    monkeypatch.setenv("VP_LOAD_BATCH_ROWS", "50")
    outage = {}

    def blip(point: str) -> None:
        if point == "load.after_batch" and not outage:
            outage["began"] = time.monotonic()
            own_pg.stop_immediately()
            restarter = threading.Timer(1.0, lambda: outage.update(start_s=own_pg.start(), ended=time.monotonic()))
            restarter.start()
            outage["thread"] = restarter

    monkeypatch.setattr(faults, "point", blip)
    began = time.monotonic()
    runs = vp.ingest(name)
    outage["thread"].join()
    monkeypatch.setattr(faults, "point", lambda point: None)
    figures.update(runs=_runs(runs), run_seconds=round(time.monotonic() - began, 2),
                   outage_seconds=round(outage["ended"] - outage["began"], 2),
                   seconds_from_outage_start_to_run_end=round(time.monotonic() - outage["began"], 2))
    assert all(r.success for r in runs), _runs(runs)
    end = _state(dsn, name)
    figures.update(rows=end["rows"], distinct=end["distinct"], missing=end["missing"])
    assert end["rows"] == end["distinct"] == len(end["chunk_ids"]) == len(docs) and end["missing"] == 0
    figures.save()


def test_postgres_stopped_during_an_index_rebuild_leaves_no_invalid_index_serving(platform, own_pg, tmp_path):
    figures = Figures("postgres_stopped_during_index_build")
    vp = platform
    dsn = vp.postgres.resolved_dsn()
    name = f"pgindex_{uuid.uuid4().hex[:6]}"
    docs = _docs(300)
    vp.add_collection(name, write_jsonl(tmp_path / "docs.jsonl", docs))
    assert all(r.success for r in vp.ingest(name))
    table = _state(dsn, name)["table"]
    [(old_index, valid, options)] = _indexes(dsn, table)
    assert valid and "m=16" in options
    before = [h.chunk_id for h in vp.search("term5 term17", [name], k=10, exact=True).hits]

    vp.set_settings(name, hnsw_m=24)  # the next ingest rebuilds the index concurrently
    # The rebuild runs in embed_and_index_job (embeddings -> vector_table -> hnsw_index and
    # their checks), the job of `ingest` that builds indexes; run alone to save two runs.
    key = dg.MultiPartitionKey({"collection": name, "model": MINILM.key})
    # A transaction holding a snapshot older than the build: CREATE INDEX CONCURRENTLY builds
    # and validates the new index, then waits for it before marking the index valid.
    holder = psycopg.connect(dsn)
    holder.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
    holder.execute("SELECT count(*) FROM vector_platform.collections")
    result: dict = {}
    ingest = threading.Thread(target=lambda: result.update(run=vp._run("embed_and_index_job", key)))
    ingest.start()
    watcher = psycopg.connect(dsn, autocommit=True)
    phase = wait_for(lambda: watcher.execute(
        "SELECT phase FROM pg_stat_progress_create_index p JOIN pg_class c ON c.oid = p.relid WHERE c.relname = %s "
        "AND p.phase = 'waiting for old snapshots'", (table,)).fetchone(), 120, "the rebuild to wait for old snapshots")
    during = _indexes(dsn, table)
    watcher.close()
    figures["indexes_when_stopped"] = during
    figures["phase_when_stopped"] = phase[0]
    stopped_at = time.monotonic()
    own_pg.stop_immediately()
    holder.close()
    ingest.join(120)
    assert not ingest.is_alive(), "the ingest hangs after the database went away"
    run = result["run"]
    figures.update(first_run=_runs([run]), seconds_from_stop_to_failure=round(time.monotonic() - stopped_at, 2))
    assert not run.success
    _assert_clear(run.error, dsn)

    figures["seconds_to_start_again"] = round(own_pg.start(), 2)
    after_crash = _indexes(dsn, table)
    figures["indexes_after_restart"] = after_crash
    # The half-built index survived the crash, invalid; the old one is valid and serves.
    assert {(n, v) for n, v, _ in after_crash} == {(old_index, True), (f"{table}_hnsw_new", False)}
    plan = _search_plan(dsn, name)
    figures["plan_after_restart"] = plan.splitlines()[1].strip()
    assert f"Index Scan using {old_index} " in plan and "_hnsw_new" not in plan
    hits = vp.search("term5 term17", [name], k=10).hits
    assert len(hits) == 10 and len(set(h.chunk_id for h in hits) & set(before)) >= 8

    began = time.monotonic()
    run = vp._run("embed_and_index_job", key)
    figures.update(rerun=_runs([run]), rerun_seconds=round(time.monotonic() - began, 2))
    assert run.success, run.error
    index_meta = run.metadata["hnsw_index"]
    figures.update(rerun_index_action=index_meta["action"], rerun_dropped_invalid=index_meta["dropped_invalid_indexes"])
    assert index_meta["action"] == "rebuilt" and index_meta["dropped_invalid_indexes"] == f"{table}_hnsw_new"
    final = _indexes(dsn, table)
    figures["indexes_after_rerun"] = final
    assert [(n, v) for n, v, _ in final] == [(old_index, True)] and "m=24" in final[0][2]
    plan = _search_plan(dsn, name)
    assert f"Index Scan using {old_index} " in plan
    end = _state(dsn, name)
    assert end["rows"] == end["distinct"] == len(docs) and end["missing"] == 0
    assert [h.chunk_id for h in vp.search("term5 term17", [name], k=10, exact=True).hits] == before
    figures.save()


@pytest.mark.parametrize("checked", [True, False], ids=["idle_connections_checked", "cut_connection_retried"])
def test_search_answers_after_a_restart(platform, own_pg, tmp_path, monkeypatch, checked):
    """Search connections stay in their pool between searches; a restart cuts them all. The
    next search still answers: a connection idle past SEARCH_CHECK_IDLE_S is checked before it
    is lent, and one lent unchecked (the check skipped here) fails once and the search is
    asked again on a fresh connection."""
    from vector_platform import db

    vp = platform
    name = f"pgsearch_{uuid.uuid4().hex[:6]}"
    vp.add_collection(name, write_jsonl(tmp_path / "docs.jsonl", _docs(60)))
    assert all(r.success for r in vp.ingest(name))
    before = [h.chunk_id for h in vp.search("term5 term17", [name], k=5).hits]
    assert len(before) == 5
    # Every connection checked before its loan, or none (each restart below takes about a
    # second, either side of the real threshold).
    monkeypatch.setattr(db, "SEARCH_CHECK_IDLE_S", 0.0 if checked else 3600.0)
    own_pg.stop_immediately()
    own_pg.start()
    after = vp.search("term5 term17", [name], k=5)
    assert [h.chunk_id for h in after.hits] == before
    # The owner's pool holds connections the restart cut too: replaced now, so that the query
    # log's flush at teardown is not left to the check's back-off (1 s, 2 s...) within WAIT_S.
    vp.pool().check()
