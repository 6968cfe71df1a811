"""Dead letters (`dead_letters`): every input that could not become a document, a chunk or a
vector, with the reason. Never deleted: resolved ones are the audit trail.

Stages: `source` (ref: the document id, or `line N` when no id could be read), `chunk`
(ref: document id), `embed` (ref: chunk id, per model).
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Iterable, Sequence

import psycopg

from vector_platform import clock
from vector_platform.names import validate_name

_UPSERT = """
    INSERT INTO vector_platform.dead_letters (collection, model_key, stage, ref, error, payload, created_at, last_seen_at)
    VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
    ON CONFLICT (collection, model_key, stage, ref) WHERE resolved_at IS NULL
    DO UPDATE SET error = excluded.error, payload = excluded.payload,
                  attempts = vector_platform.dead_letters.attempts + 1, last_seen_at = excluded.last_seen_at
"""


REF_LIMIT = 600  # document ids are at most 512 characters; duplicates add "@<position>"


def clean_ref(ref: str) -> str:
    """A ref as it is stored (and so as it must be compared)."""
    return _clean(ref, REF_LIMIT)


def _clean(text: str | None, limit: int) -> str:
    # Postgres text cannot hold NUL, and a lone surrogate cannot be encoded: keep the reason readable.
    return (text or "").replace("\x00", "\\0").encode("utf-8", "replace").decode("utf-8")[:limit]


def dead_letter_many(
    conn: psycopg.Connection,
    collection: str,
    stage: str,
    items: Sequence[tuple[str, str, str | None]],
    model_key: str = "",
) -> int:
    """Record many (ref, error, payload) at once."""
    if not items:
        return 0
    now = clock.now()
    with conn.cursor() as cur:
        cur.executemany(
            _UPSERT,
            [
                (collection, model_key, stage, _clean(ref, REF_LIMIT), _clean(error, 2000), _clean(payload, 500), now, now)
                for ref, error, payload in items
            ],
        )
    return len(items)


def resolve_dead_letters(
    conn: psycopg.Connection, collection: str, stage: str, refs: Iterable[str], resolution: str, model_key: str = ""
) -> int:
    """Mark open dead letters of these refs resolved."""
    cur = conn.execute(
        """
        UPDATE vector_platform.dead_letters SET resolved_at = %s, resolution = %s
        WHERE collection = %s AND model_key = %s AND stage = %s AND ref = ANY(%s) AND resolved_at IS NULL
        """,
        (clock.now(), resolution, collection, model_key, stage, [_clean(r, REF_LIMIT) for r in refs]),
    )
    return cur.rowcount


def resolve_model_letters(conn: psycopg.Connection, collection: str, model_key: str, resolution: str) -> int:
    """Close every open dead letter of one (collection, model), e.g. when the model is given up."""
    return conn.execute(
        "UPDATE vector_platform.dead_letters SET resolved_at = %s, resolution = %s "
        "WHERE collection = %s AND model_key = %s AND resolved_at IS NULL",
        (clock.now(), resolution, collection, model_key),
    ).rowcount


def open_dead_letters(conn: psycopg.Connection, collection: str | None = None) -> list[dict[str, Any]]:
    if collection is not None:
        validate_name(collection)
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


def count_open(conn: psycopg.Connection, collection: str, model_key: str | None = None) -> int:
    """Open dead letters of a collection (of one model's embeddings plus the model-free stages)."""
    if model_key is None:
        query, params = "SELECT count(*) FROM vector_platform.dead_letters WHERE collection = %s AND resolved_at IS NULL", (collection,)
    else:
        query = (
            "SELECT count(*) FROM vector_platform.dead_letters "
            "WHERE collection = %s AND model_key IN (%s, '') AND resolved_at IS NULL"
        )
        params = (collection, model_key)
    return conn.execute(query, params).fetchone()[0]


def models_with_open_embed_letters(conn: psycopg.Connection, collection: str) -> list[str]:
    return [
        r[0]
        for r in conn.execute(
            "SELECT DISTINCT model_key FROM vector_platform.dead_letters "
            "WHERE collection = %s AND stage = 'embed' AND resolved_at IS NULL ORDER BY 1",
            (collection,),
        )
    ]


def replay_candidates(conn: psycopg.Connection, cool_down_s: float, max_attempts: int) -> list[tuple[str, str, dt.datetime]]:
    """(collection, model, newest last_seen_at) with open embed dead letters past the cool-down."""
    cutoff = clock.now() - dt.timedelta(seconds=cool_down_s)
    return conn.execute(
        """
        SELECT dl.collection, dl.model_key, max(dl.last_seen_at)
        FROM vector_platform.dead_letters dl
        JOIN vector_platform.collections c ON c.name = dl.collection AND c.tier = 'active'
        JOIN vector_platform.collection_models m ON m.collection = dl.collection AND m.model_key = dl.model_key
            AND m.retired_at IS NULL
        WHERE dl.stage = 'embed' AND dl.resolved_at IS NULL AND dl.attempts < %s
        GROUP BY dl.collection, dl.model_key
        HAVING max(dl.last_seen_at) <= %s
        ORDER BY 1, 2
        """,
        (max_attempts, cutoff),
    ).fetchall()
