"""The catalog's schema: numbered SQL migrations in `migrations/`, applied in order, once.

`schema_version` holds one row per applied migration. A database made by the first release
(which wrote version 1 after creating everything in 0001) is upgraded by the later files
only. Migrations run in one transaction under an advisory lock, so two processes starting
at once apply each file exactly once.
"""

from __future__ import annotations

import re
from importlib import resources

import psycopg

CATALOG = "vector_platform"
VECTORS = "vp_vectors"
SERVING = "vp_serving"

_MIGRATION_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_migrated: set[str] = set()


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, SQL) of every migration shipped with this release, in order."""
    found = []
    for entry in resources.files(__package__).joinpath("migrations").iterdir():
        match = _MIGRATION_FILE.match(entry.name)
        if match:
            found.append((int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8")))
    return sorted(found)


LATEST_VERSION = migrations()[-1][0]


def current_version(conn: psycopg.Connection) -> int:
    exists = conn.execute("SELECT to_regclass('vector_platform.schema_version') IS NOT NULL").fetchone()[0]
    if not exists:
        return 0
    return conn.execute("SELECT coalesce(max(version), 0) FROM vector_platform.schema_version").fetchone()[0]


def applied_versions(conn: psycopg.Connection) -> set[int]:
    if current_version(conn) == 0:
        return set()
    return {row[0] for row in conn.execute("SELECT version FROM vector_platform.schema_version")}


def migrate(conn: psycopg.Connection) -> list[int]:
    """Apply the migrations this database lacks; returns the versions applied."""
    from vector_platform.catalog.models import backfill_fingerprints, register_builtin_models

    applied = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('vector_platform.migrate'))")
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        version = current_version(conn)
        if version > LATEST_VERSION:
            raise RuntimeError(
                f"the catalog is at schema version {version}, newer than this release knows ({LATEST_VERSION}): "
                "upgrade vector_platform"
            )
        done = applied_versions(conn)
        for number, name, text in migrations():
            # every shipped file not applied yet, not only those above the highest applied: two
            # branches may each add a migration, and a database that ran one must still get the other
            if number in done:
                continue
            conn.execute(text)
            if number == 1:  # the first release's table had only this column
                conn.execute("INSERT INTO vector_platform.schema_version (version) VALUES (1)")
            else:
                conn.execute(
                    "INSERT INTO vector_platform.schema_version (version, name) VALUES (%s, %s)", (number, name)
                )
            applied.append(number)
        backfill_fingerprints(conn)
        register_builtin_models(conn)
        if version < 4 <= LATEST_VERSION:
            _republish_serving_views(conn)
    return applied


def _republish_serving_views(conn: psycopg.Connection) -> None:
    """Serving views made before 0004 lack the fingerprint column search pins: recreate them."""
    from vector_platform import tables

    rows = conn.execute(
        """
        SELECT c.name, m.table_name FROM vector_platform.collections c
        JOIN vector_platform.collection_models m ON m.collection = c.name AND m.model_key = c.serving_model
        WHERE to_regclass(format('%%I.%%I', %s::text, c.name)) IS NOT NULL
          AND to_regclass(format('%%I.%%I', %s::text, m.table_name)) IS NOT NULL
        """,
        (SERVING, VECTORS),
    ).fetchall()
    for collection, table in rows:
        tables.publish_view(conn, collection, table)


def bootstrap(conn: psycopg.Connection) -> None:
    """Bring the catalog up to date, once per process and database."""
    key = conn.info.dsn
    if key in _migrated:
        return
    migrate(conn)
    _migrated.add(key)


__all__ = ["CATALOG", "VECTORS", "SERVING", "LATEST_VERSION", "migrate", "bootstrap", "current_version"]
