"""The audit log: who searched which collections, when, what came back, how long it took.

Off by default. `VP_AUDIT=1` makes the HTTP API and the CLI write one `audit_log` row per
search, in the request (an audit row is not dropped under load the way the batched query
log may drop rows). A failed search is recorded too, with its error.

Who: over HTTP, the name of the API key that was presented (`VP_API_KEYS="alice:KEY,bob:KEY2"`;
a single `VP_API_KEY` is named `api-key`; no key configured: `anonymous`), plus the client's
address; from the CLI, the operating-system user. Keys themselves are never stored.

Rows older than `VP_AUDIT_RETENTION_DAYS` (default 90) are deleted by the maintenance job
(`purge`). `vector-platform audit` reads the log.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import logging
import os
from typing import Any, Sequence

import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from vector_platform import clock
from vector_platform.names import storable_text, validate_name

log = logging.getLogger(__name__)


def enabled() -> bool:
    return os.environ.get("VP_AUDIT", "").strip().lower() in {"1", "true", "yes", "on"}


def retention_days() -> int:
    value = os.environ.get("VP_AUDIT_RETENTION_DAYS", "90")
    try:
        days = int(value)
    except ValueError:
        raise ValueError(f"VP_AUDIT_RETENTION_DAYS must be a whole number of days, got {value!r}") from None
    if days < 1:
        raise ValueError(f"VP_AUDIT_RETENTION_DAYS must be at least 1, got {days}")
    return days


def cli_principal() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user name in a container without /etc/passwd entry
        return f"uid:{os.getuid()}"


def hits_of(result) -> list[dict[str, Any]]:
    """The result ids of a `SearchResult`, in rank order."""
    return [{"collection": h.collection, "doc_id": h.doc_id, "chunk_id": h.chunk_id, "tier": h.source_tier} for h in result.hits]


def record(
    pool: ConnectionPool,
    *,
    principal: str,
    channel: str,
    collections: Sequence[str],
    query_text: str | None,
    k: int,
    results: list[dict[str, Any]],
    latency_ms: float,
    client: str | None = None,
    error: str | None = None,
) -> None:
    """Write one audit row. A failure to write is logged, never raised over the search's answer."""
    # what the user typed (and errors quoting it), as text columns can hold it
    query_text = storable_text(query_text) if isinstance(query_text, str) else query_text
    error = storable_text(error) if isinstance(error, str) else error
    try:
        with pool.connection() as conn:
            conn.execute(
                """
                INSERT INTO vector_platform.audit_log
                    (at, principal, channel, client, collections, query_text, k, results, latency_ms, error)
                VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
                """,
                (clock.now(), principal, channel, client, list(collections), query_text, k, Jsonb(results),
                 latency_ms, error),
            )
    except psycopg.Error as err:
        log.error("could not write the audit log: %s", err.__class__.__name__)


def entries(
    conn: psycopg.Connection,
    since: dt.datetime | None = None,
    collection: str | None = None,
    principal: str | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """The newest audit rows first, optionally of one collection or one principal."""
    if collection is not None:
        validate_name(collection)
    if principal is not None and not _storable(principal):
        return []  # no principal is named so (names are stored as text): none of its rows
    rows = conn.execute(
        """
        SELECT at, principal, channel, client, collections, query_text, k, results, latency_ms, error
        FROM vector_platform.audit_log
        WHERE (%(since)s::timestamptz IS NULL OR at >= %(since)s)
          AND (%(collection)s::text IS NULL OR %(collection)s = ANY (collections))
          AND (%(principal)s::text IS NULL OR principal = %(principal)s)
        ORDER BY at DESC, id DESC LIMIT %(limit)s
        """,
        {"since": since, "collection": collection, "principal": principal, "limit": limit},
    ).fetchall()
    names = ("at", "principal", "channel", "client", "collections", "query_text", "k", "results", "latency_ms", "error")
    return [dict(zip(names, row)) for row in rows]


def _storable(text: str) -> bool:
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def purge(conn: psycopg.Connection, days: int | None = None) -> int:
    """Delete rows older than the retention; returns how many."""
    days = days if days is not None else retention_days()
    cur = conn.execute(
        "DELETE FROM vector_platform.audit_log WHERE at < %s", (clock.now() - dt.timedelta(days=days),)
    )
    return cur.rowcount


def as_json(entry: dict[str, Any]) -> str:
    return json.dumps({**entry, "at": entry["at"].isoformat()}, default=str)
