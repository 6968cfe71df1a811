"""Catalog rows for models (`vector_platform.models`): one identity per key, for ever."""

from __future__ import annotations

import psycopg
from psycopg.types.json import Jsonb

from vector_platform.models import BUILTIN_MODELS, ModelConflict, ModelSpec
from vector_platform.names import validate_name

_SELECT = (
    "SELECT key, provider, model_name, dims, distance, storage_type, max_tokens, options FROM vector_platform.models"
)



def register_model(conn: psycopg.Connection, spec: ModelSpec) -> ModelSpec:
    """Add a model, or update its operational options (rate limits, URL…) when its identity is unchanged.

    A key already registered with another fingerprint is refused: a different model needs a new key.
    """
    with conn.transaction():
        existing = get_model(conn, spec.key, missing_ok=True, for_update=True)
        if existing is not None and existing.fingerprint != spec.fingerprint:
            builtin = " (a built-in model)" if spec.key in BUILTIN_MODELS else ""
            raise ModelConflict(
                f"model key {spec.key!r}{builtin} is already registered as {existing.provider} {existing.model_name!r} "
                f"({existing.dims} d, {existing.distance}, fingerprint {existing.fingerprint}); the new registration "
                f"differs in {'; '.join(existing.differences(spec))}. A model key is one model for ever: "
                "register the new model under a new key"
            )
        conn.execute(
            """
            INSERT INTO vector_platform.models
                (key, provider, model_name, dims, distance, storage_type, max_tokens, options, fingerprint, identity)
            VALUES (%(key)s, %(provider)s, %(model_name)s, %(dims)s, %(distance)s, %(storage_type)s, %(max_tokens)s,
                    %(options)s, %(fingerprint)s, %(identity)s)
            ON CONFLICT (key) DO UPDATE SET options = excluded.options
            WHERE models.fingerprint = excluded.fingerprint
            """,
            {**spec.to_row(), "options": Jsonb(spec.options), "fingerprint": spec.fingerprint, "identity": Jsonb(spec.identity)},
        )
        if get_model(conn, spec.key).fingerprint != spec.fingerprint:  # registered concurrently with another identity
            raise ModelConflict(f"model key {spec.key!r} was registered meanwhile with another identity; use a new key")
    return spec


def get_model(conn: psycopg.Connection, key: str, missing_ok: bool = False, for_update: bool = False) -> ModelSpec | None:
    validate_name(key, "model key")  # a key that cannot exist is refused as such, before it reaches SQL
    query = _SELECT + (" WHERE key = %s FOR UPDATE" if for_update else " WHERE key = %s")
    row = conn.execute(query, (key,)).fetchone()
    if row is None:
        if missing_ok:
            return None
        raise KeyError(f"unknown model {key!r}; registered models: {', '.join(list_model_keys(conn))}")
    return ModelSpec(*row)


def list_model_keys(conn: psycopg.Connection) -> list[str]:
    return [r[0] for r in conn.execute("SELECT key FROM vector_platform.models ORDER BY key")]


def backfill_fingerprints(conn: psycopg.Connection) -> None:
    """Fingerprints for models registered before they existed, and for their vector tables."""
    for row in conn.execute(_SELECT + " WHERE fingerprint IS NULL").fetchall():
        spec = ModelSpec(*row)
        conn.execute(
            "UPDATE vector_platform.models SET fingerprint = %s, identity = %s WHERE key = %s",
            (spec.fingerprint, Jsonb(spec.identity), spec.key),
        )
    conn.execute(
        """
        UPDATE vector_platform.collection_models cm SET fingerprint = m.fingerprint
        FROM vector_platform.models m WHERE m.key = cm.model_key AND cm.fingerprint IS NULL
        """
    )


def register_builtin_models(conn: psycopg.Connection) -> None:
    for spec in BUILTIN_MODELS.values():
        register_model(conn, spec)
