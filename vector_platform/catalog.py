"""The catalog (schema `vector_platform`): collections, models, documents, chunks, dead letters.

Every function takes an open psycopg connection; the caller owns the transaction.
Vectors do not live here: one table per (collection, model) in schema `vp_vectors`, and the
serving view per collection in `vp_serving` (see `vector_sql`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import psycopg
from psycopg.types.json import Jsonb

from vector_platform import clock
from vector_platform.models import BUILTIN_MODELS, ModelSpec
from vector_platform.names import bounded_identifier, validate_name
from vector_platform.settings import CollectionSettings

CATALOG = "vector_platform"
VECTORS = "vp_vectors"
SERVING = "vp_serving"

# Bump SCHEMA_VERSION with every change below; `bootstrap` applies the DDL idempotently.
SCHEMA_VERSION = 1
DDL = """
CREATE SCHEMA IF NOT EXISTS vector_platform;
CREATE SCHEMA IF NOT EXISTS vp_vectors;
CREATE SCHEMA IF NOT EXISTS vp_serving;

CREATE TABLE IF NOT EXISTS vector_platform.models (
    key text PRIMARY KEY,
    provider text NOT NULL,
    model_name text NOT NULL,
    dims int NOT NULL,
    distance text NOT NULL,
    storage_type text NOT NULL,
    max_tokens int NOT NULL,
    options jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS vector_platform.collections (
    name text PRIMARY KEY,
    source text NOT NULL,
    settings jsonb NOT NULL DEFAULT '{}',
    serving_model text REFERENCES vector_platform.models (key),
    tier text NOT NULL DEFAULT 'active' CHECK (tier IN ('active', 'cold', 'archived')),
    tier_rules jsonb NOT NULL DEFAULT '{}',
    tier_changed_at timestamptz,
    last_queried_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS vector_platform.collection_models (
    collection text NOT NULL REFERENCES vector_platform.collections (name) ON DELETE CASCADE,
    model_key text NOT NULL REFERENCES vector_platform.models (key),
    table_name text NOT NULL UNIQUE,
    added_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (collection, model_key)
);

CREATE TABLE IF NOT EXISTS vector_platform.documents (
    collection text NOT NULL REFERENCES vector_platform.collections (name) ON DELETE CASCADE,
    doc_id text NOT NULL,
    title text,
    body text NOT NULL,
    content_hash text NOT NULL,
    metadata jsonb NOT NULL DEFAULT '{}',
    source_ts timestamptz,
    chunked_hash text,
    first_seen_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    deleted_at timestamptz,
    PRIMARY KEY (collection, doc_id)
);

CREATE TABLE IF NOT EXISTS vector_platform.chunks (
    chunk_id uuid PRIMARY KEY,
    collection text NOT NULL,
    doc_id text NOT NULL,
    seq int NOT NULL,
    text text NOT NULL,
    content_hash text NOT NULL,
    token_count int NOT NULL,
    FOREIGN KEY (collection, doc_id) REFERENCES vector_platform.documents ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS chunks_by_document ON vector_platform.chunks (collection, doc_id);

CREATE TABLE IF NOT EXISTS vector_platform.dead_letters (
    id bigserial PRIMARY KEY,
    collection text NOT NULL,
    model_key text NOT NULL DEFAULT '',
    stage text NOT NULL,
    ref text NOT NULL,
    error text NOT NULL,
    payload text,
    attempts int NOT NULL DEFAULT 1,
    created_at timestamptz NOT NULL,
    last_seen_at timestamptz NOT NULL,
    resolved_at timestamptz,
    resolution text
);
CREATE UNIQUE INDEX IF NOT EXISTS dead_letters_open
    ON vector_platform.dead_letters (collection, model_key, stage, ref) WHERE resolved_at IS NULL;

CREATE TABLE IF NOT EXISTS vector_platform.tier_events (
    id bigserial PRIMARY KEY,
    collection text NOT NULL,
    from_tier text,
    to_tier text NOT NULL,
    at timestamptz NOT NULL,
    actor text NOT NULL,
    reason text,
    rows bigint,
    bytes bigint
);

CREATE TABLE IF NOT EXISTS vector_platform.snapshots (
    id bigserial PRIMARY KEY,
    collection text NOT NULL,
    model_key text NOT NULL,
    uri text NOT NULL,
    rows bigint NOT NULL,
    bytes bigint NOT NULL,
    sha256 text NOT NULL,
    manifest jsonb NOT NULL,
    created_at timestamptz NOT NULL
);

CREATE TABLE IF NOT EXISTS vector_platform.archival_jobs (
    id bigserial PRIMARY KEY,
    collection text NOT NULL,
    cutoff timestamptz NOT NULL,
    cursor text,
    status text NOT NULL,
    rows_archived bigint NOT NULL DEFAULT 0,
    error text,
    started_at timestamptz NOT NULL,
    finished_at timestamptz
);

CREATE TABLE IF NOT EXISTS vector_platform.query_stats (
    id bigserial PRIMARY KEY,
    collection text NOT NULL,
    model_key text NOT NULL,
    queried_at timestamptz NOT NULL,
    mode text NOT NULL,
    k int NOT NULL,
    latency_ms real NOT NULL,
    hits int NOT NULL,
    query_text text,
    query_vector vector
);
CREATE INDEX IF NOT EXISTS query_stats_recent ON vector_platform.query_stats (collection, model_key, queried_at DESC);

CREATE TABLE IF NOT EXISTS vector_platform.schema_version (version int NOT NULL);
"""

_bootstrapped: set[str] = set()


def bootstrap(conn: psycopg.Connection) -> None:
    """Create the schemas and catalog tables (idempotent) and register built-in models."""
    key = conn.info.dsn
    if key in _bootstrapped:
        return
    with conn.transaction():
        # One bootstrap at a time per database, even across processes.
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('vector_platform.bootstrap'))")
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        conn.execute(DDL)
        row = conn.execute("SELECT max(version) FROM vector_platform.schema_version").fetchone()
        if row[0] is None:
            conn.execute("INSERT INTO vector_platform.schema_version VALUES (%s)", (SCHEMA_VERSION,))
        for spec in BUILTIN_MODELS.values():
            upsert_model(conn, spec)
    _bootstrapped.add(key)


# ---------------------------------------------------------------- models

def upsert_model(conn: psycopg.Connection, spec: ModelSpec) -> None:
    existing = get_model(conn, spec.key, missing_ok=True)
    if existing and (existing.dims, existing.distance, existing.storage_type) != (
        spec.dims,
        spec.distance,
        spec.storage_type,
    ):
        raise ValueError(
            f"model {spec.key!r} is already registered with {existing.dims} dims, {existing.distance}, "
            f"{existing.storage_type}; a different model version needs a new key"
        )
    conn.execute(
        """
        INSERT INTO vector_platform.models (key, provider, model_name, dims, distance, storage_type, max_tokens, options)
        VALUES (%(key)s, %(provider)s, %(model_name)s, %(dims)s, %(distance)s, %(storage_type)s, %(max_tokens)s, %(options)s)
        ON CONFLICT (key) DO UPDATE SET provider = excluded.provider, model_name = excluded.model_name,
            max_tokens = excluded.max_tokens, options = excluded.options
        """,
        {**spec.to_row(), "options": Jsonb(spec.options)},
    )


def get_model(conn: psycopg.Connection, key: str, missing_ok: bool = False) -> ModelSpec | None:
    row = conn.execute(
        "SELECT key, provider, model_name, dims, distance, storage_type, max_tokens, options "
        "FROM vector_platform.models WHERE key = %s",
        (key,),
    ).fetchone()
    if row is None:
        if missing_ok:
            return None
        raise KeyError(f"unknown model {key!r}; registered models: {', '.join(list_model_keys(conn))}")
    return ModelSpec(*row)


def list_model_keys(conn: psycopg.Connection) -> list[str]:
    return [r[0] for r in conn.execute("SELECT key FROM vector_platform.models ORDER BY key")]


# ---------------------------------------------------------------- collections

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
    source: str,
    model_key: str,
    settings: CollectionSettings | None = None,
) -> Collection:
    """Declare a collection (or update its source/settings) and attach `model_key` to it."""
    validate_name(name)
    settings = settings or CollectionSettings()
    get_model(conn, model_key)  # clear error for an unknown model
    existing = get_collection(conn, name, missing_ok=True)
    if existing and existing.tier == "archived":
        raise ValueError(f"collection {name!r} is archived; archived collections cannot be changed")
    conn.execute(
        """
        INSERT INTO vector_platform.collections (name, source, settings, serving_model, tier_changed_at)
        VALUES (%s, %s, %s, %s, %s)
        ON CONFLICT (name) DO UPDATE SET source = excluded.source, settings = excluded.settings
        """,
        (name, source, Jsonb(settings.to_json()), model_key, clock.now()),
    )
    attach_model(conn, name, model_key)
    return get_collection(conn, name)


def attach_model(conn: psycopg.Connection, collection: str, model_key: str) -> str:
    """Attach a model to a collection; returns the vector table's name (fixed once chosen)."""
    table = bounded_identifier(collection, model_key)
    conn.execute(
        """
        INSERT INTO vector_platform.collection_models (collection, model_key, table_name)
        VALUES (%s, %s, %s) ON CONFLICT (collection, model_key) DO NOTHING
        """,
        (collection, model_key, table),
    )
    return vector_table_name(conn, collection, model_key)


def get_collection(conn: psycopg.Connection, name: str, missing_ok: bool = False) -> Collection | None:
    row = conn.execute(
        """
        SELECT c.name, c.source, c.settings, c.serving_model, c.tier,
               coalesce(array_agg(m.model_key ORDER BY m.added_at) FILTER (WHERE m.model_key IS NOT NULL), '{}')
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


def vector_table_name(conn: psycopg.Connection, collection: str, model_key: str) -> str:
    row = conn.execute(
        "SELECT table_name FROM vector_platform.collection_models WHERE collection = %s AND model_key = %s",
        (collection, model_key),
    ).fetchone()
    if row is None:
        raise KeyError(f"model {model_key!r} is not attached to collection {collection!r}")
    return row[0]


def touch_queried(conn: psycopg.Connection, collections: Iterable[str]) -> None:
    conn.execute(
        "UPDATE vector_platform.collections SET last_queried_at = %s WHERE name = ANY(%s)",
        (clock.now(), list(collections)),
    )


# ---------------------------------------------------------------- dead letters

def dead_letter(
    conn: psycopg.Connection,
    collection: str,
    stage: str,
    ref: str,
    error: str,
    payload: str | None = None,
    model_key: str = "",
) -> None:
    """Record (or re-record, counting attempts) an open dead letter for one input."""
    now = clock.now()
    conn.execute(
        """
        INSERT INTO vector_platform.dead_letters (collection, model_key, stage, ref, error, payload, created_at, last_seen_at)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
        ON CONFLICT (collection, model_key, stage, ref) WHERE resolved_at IS NULL
        DO UPDATE SET error = excluded.error, payload = excluded.payload,
                      attempts = vector_platform.dead_letters.attempts + 1, last_seen_at = excluded.last_seen_at
        """,
        (collection, model_key, stage, ref, error[:2000], (payload or "")[:500], now, now),
    )


def resolve_dead_letters(
    conn: psycopg.Connection, collection: str, stage: str, refs: Iterable[str], resolution: str, model_key: str = ""
) -> int:
    """Mark open dead letters resolved (never deleted: they are the audit trail)."""
    cur = conn.execute(
        """
        UPDATE vector_platform.dead_letters SET resolved_at = %s, resolution = %s
        WHERE collection = %s AND model_key = %s AND stage = %s AND ref = ANY(%s) AND resolved_at IS NULL
        """,
        (clock.now(), resolution, collection, model_key, stage, list(refs)),
    )
    return cur.rowcount


def open_dead_letters(conn: psycopg.Connection, collection: str | None = None) -> list[dict[str, Any]]:
    cur = conn.execute(
        """
        SELECT id, collection, model_key, stage, ref, error, attempts, created_at, last_seen_at
        FROM vector_platform.dead_letters
        WHERE resolved_at IS NULL AND (%(c)s::text IS NULL OR collection = %(c)s)
        ORDER BY id
        """,
        {"c": collection},
    )
    cols = [d.name for d in cur.description]
    return [dict(zip(cols, row)) for row in cur]

