"""Least privilege: search runs as a read-only role the platform makes (`vector-platform db
reader-role`, `Platform.create_reader_role`, `db.ensure_reader_role`) and reads through
VP_PG_READ_DSN, from the CLI, the Python API and `serve`, with the same hits as the owner
gets; writes (the query log, last_queried_at) still reach the catalog through VP_PG_DSN; the
role can write, create, drop or truncate nothing; a collection made after the role is
readable by it (default privileges)."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg import errors, sql

from vector_platform import catalog, db
from vector_platform.api import Platform
from vector_platform.defs.resources import ObjectStoreResource, PostgresResource
from vector_platform.models import ModelSpec
from vector_platform.names import NAME_PATTERN
from vector_platform.search import flush_query_log

from ..conftest import FakeEmbedderResource, cli, cli_env, write_jsonl
from ..fault_server import FaultServer
from .hostile import CORE, Sentinel, corpus, shared_collections

API_KEY = "lp-" + uuid.uuid4().hex


class Reader:
    """The role, its DSN, and platforms over the owner's DSN and over the reader's."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def _hba_requires_password(pg_server, role: str) -> None:
    """Make the socket ask `role` for its password (the embedded server trusts local users)."""
    with psycopg.connect(pg_server.get_uri(), autocommit=True) as admin:
        hba = Path(admin.execute("SHOW hba_file").fetchone()[0])
        hba.write_text(f"local all {role} scram-sha-256\n" + hba.read_text())
        admin.execute("SELECT pg_reload_conf()")


def _platform(pg_dsn, instance, store_url, read_dsn=None) -> Platform:
    return Platform(resources={"postgres": PostgresResource(dsn=pg_dsn, read_dsn=read_dsn),
                               "object_store": ObjectStoreResource(url=store_url),
                               "embedder": FakeEmbedderResource()}, instance=instance)


@pytest.fixture(scope="module")
def reader(pg_server, pg_dsn, dagster_instance, tmp_path_factory):
    shared = shared_collections(pg_dsn, dagster_instance, tmp_path_factory)  # made before the role
    tmp = tmp_path_factory.mktemp("least_privilege")
    role, password = f"vp_reader_{uuid.uuid4().hex[:8]}", secrets.token_urlsafe(24)
    store_url = shared.folder.joinpath("objects").as_uri()  # where the cold collection's snapshot is
    env = {**cli_env(pg_dsn, tmp), "VP_OBJECT_STORE": store_url, "VP_PG_READ_PASSWORD": password}
    made = subprocess.run(cli("db", "reader-role", "--name", role), env=env, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stdout + made.stderr
    _hba_requires_password(pg_server, role)
    reader_dsn = db.reader_dsn(pg_dsn, role, password)
    deadline = time.time() + 10
    while True:  # the reload is asynchronous
        try:
            psycopg.connect(db.reader_dsn(pg_dsn, role, "not-the-password")).close()
        except psycopg.OperationalError as err:
            assert "password authentication failed" in str(err)
            break
        assert time.time() < deadline, "pg_hba.conf reload did not take"
        time.sleep(0.2)

    # A collection made after the role, embedded by an OpenAI-compatible server (the CLI's and
    # the server's query embedding then costs an HTTP call, not a model load).
    embeddings = FaultServer(space="random").start()
    owner = _platform(pg_dsn, dagster_instance, store_url)
    model = f"lp_api_{uuid.uuid4().hex[:6]}"
    owner.add_model(ModelSpec(model, "openai", "fake-small", 384, options={"base_url": embeddings.base_url}))
    later = f"lp_{uuid.uuid4().hex[:6]}_later"
    owner.add_collection(later, write_jsonl(tmp / "later.jsonl", corpus(40, "l")), model=model)
    assert all(r.success for r in owner.ingest(later))
    sentinel = Sentinel(pg_dsn).plant()
    yield Reader(role=role, password=password, dsn=reader_dsn, env={**env, "VP_PG_READ_DSN": reader_dsn}, made=made,
                 shared=shared, owner=owner, as_reader=_platform(pg_dsn, dagster_instance, store_url, reader_dsn),
                 later=later, store_url=store_url, tmp=tmp, pg_dsn=pg_dsn)
    embeddings.stop()
    sentinel.check()
    sentinel.remove()


def _hits(result) -> list[tuple]:
    return [(h.collection, h.chunk_id, round(h.score, 5), h.source_tier) for h in result.hits]


def _json_hits(answer: dict) -> list[tuple]:
    return [(h["collection"], h["chunk_id"], round(h["score"], 5), h["source_tier"]) for h in answer["hits"]]


def _backends(pg_dsn, role: str) -> list[str]:
    with psycopg.connect(pg_dsn) as conn:
        return [r[0] for r in conn.execute("SELECT application_name FROM pg_stat_activity WHERE usename = %s", (role,))]


# ---------------------------------------------------------------- the role

def test_the_cli_makes_a_login_role_with_the_password_from_the_environment_and_never_prints_it(reader):
    out = reader.made.stdout + reader.made.stderr
    assert reader.password not in out
    assert f"role {reader.role} created: LOGIN, password from $VP_PG_READ_PASSWORD" in out
    assert f"user={reader.role}" in out and "VP_PG_READ_DSN=" in out
    with psycopg.connect(reader.dsn) as conn:  # the password works (the socket asks for it)
        assert conn.execute("SELECT current_user").fetchone()[0] == reader.role
    with psycopg.connect(reader.pg_dsn) as conn:
        attrs = conn.execute("SELECT rolcanlogin, rolsuper, rolcreaterole, rolcreatedb, rolbypassrls, rolreplication "
                             "FROM pg_roles WHERE rolname = %s", (reader.role,)).fetchone()
    assert attrs == (True, False, False, False, False, False)
    # idempotent: again, through the API, changes nothing and says so
    os.environ["VP_PG_READ_PASSWORD"] = reader.password
    try:
        again = reader.owner.create_reader_role(reader.role)
    finally:
        del os.environ["VP_PG_READ_PASSWORD"]
    assert again["created"] is False and again["login"] is True and reader.password not in json.dumps(again)
    with psycopg.connect(reader.dsn) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_without_a_password_the_role_is_nologin_and_dangerous_roles_are_refused(reader, monkeypatch):
    monkeypatch.delenv("VP_PG_READ_PASSWORD", raising=False)
    group = f"vp_reader_{uuid.uuid4().hex[:8]}"
    made = reader.owner.create_reader_role(group)
    assert made["created"] and made["login"] is False
    with psycopg.connect(reader.pg_dsn, autocommit=True) as admin:
        owner = admin.execute("SELECT current_user").fetchone()[0]
        strong = f"vp_reader_{uuid.uuid4().hex[:8]}"
        admin.execute(sql.SQL("CREATE ROLE {} CREATEDB").format(sql.Identifier(strong)))
        member = f"vp_reader_{uuid.uuid4().hex[:8]}"
        admin.execute(sql.SQL("CREATE ROLE {} IN ROLE {}").format(sql.Identifier(member), sql.Identifier(owner)))
    for name, says in ((owner, "the role this connection"), (strong, "createdb"), (member, "member of")):
        with pytest.raises(ValueError, match=says):
            reader.owner.create_reader_role(name)
    for name in [n for n in CORE if not NAME_PATTERN.fullmatch(n)] + ["pg_monitor", "pg_reader"]:
        with pytest.raises(ValueError, match="invalid role name|reserved"):
            reader.owner.create_reader_role(name)
    with psycopg.connect(reader.pg_dsn, autocommit=True) as admin:
        for name in (group, strong, member):
            admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


# ---------------------------------------------------------------- what it cannot do

def test_the_reader_cannot_write_create_drop_or_truncate_anything(reader):
    with psycopg.connect(reader.pg_dsn) as conn:
        table = catalog.vector_table_name(conn, reader.shared.active, "minilm_l6_v2")
    vectors, view = sql.Identifier("vp_vectors", table), sql.Identifier("vp_serving", reader.shared.active)
    attempts = {
        "insert into a vector table": sql.SQL("INSERT INTO {} (chunk_id, doc_id, seq, content_hash, text, metadata, embedding) "
                                              "SELECT chunk_id, doc_id, seq + 1000, content_hash, text, metadata, embedding "
                                              "FROM {} LIMIT 1").format(vectors, vectors),
        "update a vector table": sql.SQL("UPDATE {} SET text = 'pwned'").format(vectors),
        "delete from a vector table": sql.SQL("DELETE FROM {}").format(vectors),
        "update the serving view": sql.SQL("UPDATE {} SET text = 'pwned'").format(view),
        "truncate a vector table": sql.SQL("TRUNCATE {}").format(vectors),
        "drop a vector table": sql.SQL("DROP TABLE {}").format(vectors),
        "drop the serving view": sql.SQL("DROP VIEW {}").format(view),
        "alter a vector table": sql.SQL("ALTER TABLE {} ADD COLUMN x int").format(vectors),
        "index a vector table": sql.SQL("CREATE INDEX ON {} (doc_id)").format(vectors),
        "update the catalog": sql.SQL("UPDATE vector_platform.collections SET tier = 'archived'"),
        "delete from the catalog": sql.SQL("DELETE FROM vector_platform.models"),
        "truncate the catalog": sql.SQL("TRUNCATE vector_platform.collections CASCADE"),
        "drop the catalog": sql.SQL("DROP TABLE vector_platform.collections CASCADE"),
        "write the query log": sql.SQL("INSERT INTO vector_platform.query_stats (collection, model_key, mode, k, latency_ms, "
                                       "hits, queried_at) VALUES ('x', 'y', 'ann', 1, 1, 1, now())"),
        "read the query log": sql.SQL("SELECT query_text FROM vector_platform.query_stats LIMIT 1"),
        "read the audit log": sql.SQL("SELECT query_text FROM vector_platform.audit_log LIMIT 1"),
        "read the embedding cache index": sql.SQL("SELECT * FROM vector_platform.embedding_cache LIMIT 1"),
        "create a table in public": sql.SQL("CREATE TABLE public.pwned (x int)"),
        "create a table in vp_vectors": sql.SQL("CREATE TABLE vp_vectors.pwned (x int)"),
        "create a table in the catalog": sql.SQL("CREATE TABLE vector_platform.pwned (x int)"),
        "create a schema": sql.SQL("CREATE SCHEMA pwned"),
        "touch the canary": sql.SQL("DELETE FROM public.canary"),
        "drop the canary": sql.SQL("DROP TABLE public.canary"),
        "become the owner": sql.SQL("SET ROLE postgres"),
        "create a role": sql.SQL("CREATE ROLE pwned"),
        "grant itself more": sql.SQL("GRANT INSERT ON vector_platform.collections TO CURRENT_USER"),
        "create a database": sql.SQL("CREATE DATABASE pwned"),
    }
    allowed = []
    for label, statement in attempts.items():
        with psycopg.connect(reader.dsn, autocommit=True) as conn:
            try:
                conn.execute(statement)
            except errors.InsufficientPrivilege:
                continue
            except psycopg.Error as err:
                allowed.append(f"{label}: not refused for want of privilege but {type(err).__name__}: {err}")
                continue
        if label != "grant itself more":  # a GRANT of what one lacks only warns: its effect is checked below
            allowed.append(f"{label}: succeeded")
    with psycopg.connect(reader.pg_dsn) as conn:
        if conn.execute("SELECT has_table_privilege(%s, 'vector_platform.collections', 'INSERT')", (reader.role,)).fetchone()[0]:
            allowed.append("grant itself more: it holds INSERT now")
        assert conn.execute("SELECT id, v FROM public.canary").fetchall() == [(1, "the canary sings")]
    assert not allowed, "the reader could: " + "; ".join(allowed)


# ---------------------------------------------------------------- search through it

def test_the_python_api_searches_through_the_reader_with_the_owner_hits_and_still_logs(reader):
    shared, owner, as_reader = reader.shared, reader.owner, reader.as_reader
    assert as_reader.postgres.read_dsns() == [reader.dsn]
    cases = [
        dict(query="alpha beta", collections=[shared.active, shared.cold], k=7),
        dict(query="gamma", collections=[shared.active], k=5, exact=True),
        dict(query="delta", collections=[shared.active, shared.cold], k=10, filters={"even": True}),
        dict(query="epsilon", collections=[shared.active], k=3, include_archive=True),
        dict(query="zeta eta", collections=[reader.later], k=6),
    ]
    marker = f"reader marker {uuid.uuid4().hex}"
    for case in cases + [dict(query=marker, collections=[shared.active], k=2)]:
        theirs, ours = owner.search(**case), as_reader.search(**case)
        assert _hits(ours) == _hits(theirs) and _hits(ours), case
        assert ours.warnings == theirs.warnings
    assert any(name == "vector_platform search" for name in _backends(reader.pg_dsn, reader.role))
    assert as_reader.get(shared.active, "tive3") == owner.get(shared.active, "tive3") is not None
    # what the search wrote (query log, last_queried_at) went through the owner's DSN
    flush_query_log(as_reader.pool())
    with psycopg.connect(reader.pg_dsn) as conn:
        logged = conn.execute("SELECT count(*) FROM vector_platform.query_stats WHERE query_text = %s", (marker,)).fetchone()[0]
    assert logged >= 2  # the owner's search and the reader's


def test_a_reader_dsn_without_grants_is_refused_by_the_database_so_search_really_reads_through_it(reader):
    """The control: the same platform on a role without the grants fails on its first read."""
    bare = f"vp_bare_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(reader.pg_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(bare)))
    try:
        platform = _platform(reader.pg_dsn, reader.owner.instance, reader.store_url, db.reader_dsn(reader.pg_dsn, bare))
        with pytest.raises(errors.InsufficientPrivilege):
            platform.search("alpha", [reader.shared.active], k=3)
    finally:
        db.close_pools()  # its pools hold connections of the role about to go
        with psycopg.connect(reader.pg_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(bare)))
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(bare)))


def test_the_cli_searches_through_vp_pg_read_dsn_with_the_owner_hits(reader, monkeypatch):
    monkeypatch.setenv("VP_PG_DSN", reader.pg_dsn)
    monkeypatch.setenv("VP_PG_READ_DSN", reader.dsn)
    from vector_platform.defs.resources import default_resources

    assert default_resources()["postgres"].read_dsns() == [reader.dsn]  # what `search` and `serve` are built on
    done = subprocess.run(cli("search", "zeta eta", "--collection", reader.later, "-k", "6", "--json"),
                          env=reader.env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert reader.password not in done.stdout + done.stderr
    assert _json_hits(json.loads(done.stdout)) == _hits(reader.owner.search("zeta eta", [reader.later], k=6))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, body: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"X-API-Key": API_KEY, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            raw = response.read()
            return response.status, json.loads(raw) if response.headers.get_content_type() == "application/json" else {}
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_serve_reads_through_the_reader_with_the_owner_hits(reader):
    port = _free_port()
    server = subprocess.Popen(cli("serve", "--port", str(port)), env={**reader.env, "VP_API_KEY": API_KEY},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if _get(f"{base}/healthz")[0] == 200:
                    break
            except OSError:
                assert server.poll() is None and time.time() < deadline
                time.sleep(0.3)
        shared, owner = reader.shared, reader.owner
        status, answer = _get(f"{base}/search", {"query": "zeta eta", "collections": [reader.later], "k": 6})
        assert status == 200 and _json_hits(answer) == _hits(owner.search("zeta eta", [reader.later], k=6))
        vector = [0.05] * 384
        status, answer = _get(f"{base}/search", {"vector": vector, "collections": [shared.active, shared.cold], "k": 8})
        expected = owner.search(None, [shared.active, shared.cold], vector=vector, k=8)
        assert status == 200 and _json_hits(answer) == _hits(expected) and answer["warnings"] == expected.warnings
        assert {h["source_tier"] for h in answer["hits"]} == {"active", "cold"}
        status, listed = _get(f"{base}/collections")
        assert status == 200 and {shared.active, shared.cold, reader.later} <= {c["name"] for c in listed["collections"]}
        status, doc = _get(f"{base}/collections/{reader.later}/documents/l4")
        assert status == 200 and doc["doc_id"] == "l4"
        assert _get(f"{base}/metrics")[0] == 200
        backends = _backends(reader.pg_dsn, reader.role)
        assert "vector_platform search" in backends and "vector_platform reader" in backends, backends
    finally:
        server.terminate()
        out = server.communicate(timeout=30)[0].decode()
    assert "Traceback" not in out and reader.password not in out
