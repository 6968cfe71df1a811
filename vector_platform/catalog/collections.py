"""Catalog rows for collections (`collections`, `collection_models`) and their settings.

Settings change only when asked: `add_collection` on an existing collection changes only the
fields it is given, and `update_settings` applies a set of changes and says what changed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from vector_platform import clock
from vector_platform.catalog.models import get_model
from vector_platform.names import MAX_IDENTIFIER, validate_name
from vector_platform.settings import CollectionSettings


@dataclass(frozen=True)
class Collection:
    name: str
    source: str
    settings: CollectionSettings
    serving_model: str | None
    tier: str
    models: tuple[str, ...]


def add_collection(
    conn: psycopg.Connection,
    name: str,
    source: str | None,
    model_key: str | None = None,
    settings: dict[str, Any] | None = None,
) -> Collection:
    """Declare a collection, or change the given fields of an existing one.

    New: `source` is required; `model_key` (the default model when None) becomes the serving
    model. Existing: a given `source` replaces the old one, a given `model_key` is attached
    (the serving model stays), each given setting changes; nothing else does.
    """
    validate_name(name)
    settings = settings or {}
    with conn.transaction():
        existing = get_collection(conn, name, missing_ok=True, for_update=True)
        if existing is None:
            from vector_platform.models import DEFAULT_MODEL_KEY

            if not source:
                raise ValueError(f"collection {name!r} does not exist yet: give its --source")
            model_key = model_key or DEFAULT_MODEL_KEY
            get_model(conn, model_key)  # a clear error for an unknown model
            conn.execute(
                """
                INSERT INTO vector_platform.collections (name, source, settings, serving_model, tier_changed_at)
                VALUES (%s, %s, %s, %s, %s)
                """,
                (name, source, Jsonb(CollectionSettings().changed(**settings).to_json()), model_key, clock.now()),
            )
        else:
            if existing.tier == "archived":
                raise ValueError(f"collection {name!r} is archived; archived collections cannot be changed")
            if source and source != existing.source:
                conn.execute("UPDATE vector_platform.collections SET source = %s WHERE name = %s", (source, name))
            if settings:
                update_settings(conn, name, **settings)
        if model_key:
            attach_model(conn, name, model_key)
    return get_collection(conn, name)


def update_settings(conn: psycopg.Connection, name: str, **changes: Any) -> tuple[CollectionSettings, CollectionSettings]:
    """Apply `changes` to a collection's settings; returns (before, after).

    A change of chunking settings marks every document for re-chunking (only chunks whose
    text changes are embedded again); HNSW parameters are picked up by the next hnsw_index run.
    """
    with conn.transaction():
        coll = get_collection(conn, name, for_update=True)
        before = coll.settings
        after = before.changed(**changes)
        conn.execute(
            "UPDATE vector_platform.collections SET settings = %s WHERE name = %s", (Jsonb(after.to_json()), name)
        )
        if any(getattr(before, f) != getattr(after, f) for f in CollectionSettings.CHUNKING):
            conn.execute("UPDATE vector_platform.documents SET chunked_hash = NULL WHERE collection = %s", (name,))
    return before, after


def table_name_for(collection: str, model_key: str) -> str:
    """A vector table's name: readable, and unique for the pair even when names contain '__'."""
    digest = hashlib.sha1(f"{collection}\x00{model_key}".encode()).hexdigest()[:8]
    readable = f"{collection}__{model_key}"[: MAX_IDENTIFIER - len(digest) - 1]
    return f"{readable}_{digest}"


def attach_model(conn: psycopg.Connection, collection: str, model_key: str) -> str:
    """Attach a model to a collection (again, if it was retired); returns the vector table's
    name (fixed once chosen)."""
    spec = get_model(conn, model_key)
    conn.execute(
        """
        INSERT INTO vector_platform.collection_models (collection, model_key, table_name, fingerprint)
        VALUES (%s, %s, %s, %s) ON CONFLICT (collection, model_key) DO UPDATE SET retired_at = NULL
        WHERE collection_models.retired_at IS NOT NULL
        """,
        (collection, model_key, table_name_for(collection, model_key), spec.fingerprint),
    )
    return vector_table_name(conn, collection, model_key)


def get_collection(
    conn: psycopg.Connection, name: str, missing_ok: bool = False, for_update: bool = False
) -> Collection | None:
    validate_name(name)  # a name that cannot exist is refused as such, before it reaches SQL
    if for_update:
        conn.execute("SELECT 1 FROM vector_platform.collections WHERE name = %s FOR UPDATE", (name,))
    row = conn.execute(
        """
        SELECT c.name, c.source, c.settings, c.serving_model, c.tier,
               coalesce(array_agg(m.model_key ORDER BY m.added_at)
                        FILTER (WHERE m.model_key IS NOT NULL AND m.retired_at IS NULL), '{}')
        FROM vector_platform.collections c
        LEFT JOIN vector_platform.collection_models m ON m.collection = c.name
        WHERE c.name = %s GROUP BY c.name
        """,
        (name,),
    ).fetchone()
    if row is None:
        if missing_ok:
            return None
        raise KeyError(f"unknown collection {name!r}; add it with `vector-platform collections add`")
    return Collection(row[0], row[1], CollectionSettings.from_json(row[2]), row[3], row[4], tuple(row[5]))


def list_collections(conn: psycopg.Connection) -> list[Collection]:
    names = [r[0] for r in conn.execute("SELECT name FROM vector_platform.collections ORDER BY name")]
    return [get_collection(conn, n) for n in names]


def _attachment(conn: psycopg.Connection, collection: str, model_key: str) -> tuple[str, str]:
    """(table name, fingerprint of its vectors) of a model attached to a collection."""
    row = conn.execute(
        "SELECT table_name, fingerprint FROM vector_platform.collection_models WHERE collection = %s AND model_key = %s",
        (collection, model_key),
    ).fetchone()
    if row is None:
        raise KeyError(f"model {model_key!r} is not attached to collection {collection!r}")
    return row


def vector_table_name(conn: psycopg.Connection, collection: str, model_key: str) -> str:
    return _attachment(conn, collection, model_key)[0]


def table_fingerprint(conn: psycopg.Connection, collection: str, model_key: str) -> str:
    return _attachment(conn, collection, model_key)[1]


# Catalog changes that search caches are announced here (see migration 0003 and search/facts.py).
CHANGES_CHANNEL = "vector_platform_catalog"


def announce_change(conn: psycopg.Connection, collection: str) -> None:
    """Tell every process's search cache that a collection's serving relations changed
    (delivered when the caller's transaction commits)."""
    conn.execute("SELECT pg_notify(%s, %s)", (CHANGES_CHANNEL, collection))
