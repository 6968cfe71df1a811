"""Catalog rows for storage tiers: snapshot receipts, tier events, tier rules, and the switch.

A `snapshots` row is a receipt: it is written only after the snapshot's files were read back
from the object store and verified, and nothing is dropped from Postgres unless a receipt
matches the table being dropped (DESIGN invariant 11). The tier of a collection changes in
one transaction with the rows that say what now serves it (`switch_tier`).
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from vector_platform import clock
from vector_platform.names import validate_name

TIERS = ("active", "cold", "archived")
# (from, to) -> the move's name. Everything else is refused.
MOVES = {("active", "cold"): "evict", ("cold", "active"): "rehydrate", ("active", "archived"): "archive", ("cold", "archived"): "archive"}


class InvalidMove(ValueError):
    """A tier change the lifecycle does not allow (e.g. anything out of archived)."""


def check_move(collection: str, current: str, target: str) -> str | None:
    """The move's name, None when already there; InvalidMove for a move that is not allowed."""
    if target not in TIERS:
        raise InvalidMove(f"unknown tier {target!r}: choose one of {', '.join(TIERS)}")
    if current == target:
        return None
    move = MOVES.get((current, target))
    if move is None:
        allowed = ", ".join(f"{a}->{b}" for a, b in MOVES)
        why = "archived is terminal" if current == "archived" else f"allowed moves: {allowed}"
        raise InvalidMove(f"collection {collection!r} cannot move from {current} to {target} ({why})")
    return move


# ---------------------------------------------------------------- snapshots (receipts)


@dataclass(frozen=True)
class SnapshotReceipt:
    id: int
    collection: str
    model_key: str
    uri: str
    rows: int
    bytes: int
    manifest: dict[str, Any]
    table_digest: str
    created_at: dt.datetime

    @property
    def prefix(self) -> str:
        """The snapshot's folder on the object store (a key, relative to the store's root)."""
        return self.manifest["prefix"]


_SNAPSHOT_COLUMNS = "id, collection, model_key, uri, rows, bytes, manifest, table_digest, created_at"


def record_snapshot(conn: psycopg.Connection, manifest: dict[str, Any], uri: str, manifest_sha256: str) -> SnapshotReceipt:
    """Write the receipt of a verified snapshot."""
    row = conn.execute(
        f"""
        INSERT INTO vector_platform.snapshots
            (collection, model_key, uri, rows, bytes, sha256, manifest, table_digest, created_at, verified_at)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING {_SNAPSHOT_COLUMNS}
        """,
        (
            manifest["collection"], manifest["model_key"], uri, manifest["rows"],
            sum(f["bytes"] for f in manifest["files"]), manifest_sha256, Jsonb(manifest),
            manifest["table_digest"], manifest["created_at"], clock.now(),
        ),
    ).fetchone()
    return SnapshotReceipt(*row)


def latest_snapshot(conn: psycopg.Connection, collection: str, model_key: str) -> SnapshotReceipt | None:
    """The newest receipt whose files still exist."""
    row = conn.execute(
        f"""
        SELECT {_SNAPSHOT_COLUMNS} FROM vector_platform.snapshots
        WHERE collection = %s AND model_key = %s AND deleted_at IS NULL AND verified_at IS NOT NULL
        ORDER BY id DESC LIMIT 1
        """,
        (collection, model_key),
    ).fetchone()
    return SnapshotReceipt(*row) if row else None


def get_snapshot(conn: psycopg.Connection, snapshot_id: int) -> SnapshotReceipt | None:
    row = conn.execute(
        f"SELECT {_SNAPSHOT_COLUMNS} FROM vector_platform.snapshots WHERE id = %s AND deleted_at IS NULL", (snapshot_id,)
    ).fetchone()
    return SnapshotReceipt(*row) if row else None


def live_snapshots(conn: psycopg.Connection, collection: str, model_key: str | None = None) -> list[SnapshotReceipt]:
    rows = conn.execute(
        f"""
        SELECT {_SNAPSHOT_COLUMNS} FROM vector_platform.snapshots
        WHERE collection = %s AND (%s::text IS NULL OR model_key = %s) AND deleted_at IS NULL ORDER BY id
        """,
        (collection, model_key, model_key),
    ).fetchall()
    return [SnapshotReceipt(*r) for r in rows]


def snapshot_in_use(conn: psycopg.Connection, snapshot_id: int) -> bool:
    """Whether a cold collection is served from this snapshot (then its files must stay)."""
    return conn.execute(
        "SELECT EXISTS (SELECT 1 FROM vector_platform.collection_models WHERE cold_snapshot_id = %s)", (snapshot_id,)
    ).fetchone()[0]


def mark_snapshot_deleted(conn: psycopg.Connection, snapshot_id: int) -> None:
    conn.execute("UPDATE vector_platform.snapshots SET deleted_at = %s WHERE id = %s", (clock.now(), snapshot_id))


def cold_snapshots(conn: psycopg.Connection, collection: str) -> dict[str, int]:
    """model key -> the snapshot that holds that model's vectors while the collection is cold."""
    rows = conn.execute(
        "SELECT model_key, cold_snapshot_id FROM vector_platform.collection_models "
        "WHERE collection = %s AND cold_snapshot_id IS NOT NULL",
        (collection,),
    ).fetchall()
    return dict(rows)


def set_cold_snapshot(conn: psycopg.Connection, collection: str, model_key: str, snapshot_id: int | None) -> None:
    """Which snapshot holds `model_key`'s vectors while the collection stays cold (None: none;
    a cold upgrade adds one, retiring a previous model removes it)."""
    conn.execute(
        "UPDATE vector_platform.collection_models SET cold_snapshot_id = %s WHERE collection = %s AND model_key = %s",
        (snapshot_id, collection, model_key),
    )


# ---------------------------------------------------------------- the switch and its events


def lock_collection_row(conn: psycopg.Connection, collection: str) -> tuple[str, dt.datetime | None]:
    """(tier, tier_changed_at), the row locked for the caller's transaction."""
    row = conn.execute(
        "SELECT tier, tier_changed_at FROM vector_platform.collections WHERE name = %s FOR UPDATE", (collection,)
    ).fetchone()
    if row is None:
        raise KeyError(f"unknown collection {collection!r}")
    return row


def switch_tier(
    conn: psycopg.Connection,
    collection: str,
    to_tier: str,
    cold_snapshot_ids: dict[str, int] | None = None,
) -> None:
    """Set the tier and what serves it, in the caller's transaction.

    `cold_snapshot_ids`: model key -> snapshot, for a switch to cold; other switches clear them.
    """
    conn.execute(
        """
        UPDATE vector_platform.collections
        SET tier = %s, tier_changed_at = %s, rehydrate_requested_at = NULL WHERE name = %s
        """,
        (to_tier, clock.now(), collection),
    )
    conn.execute(
        "UPDATE vector_platform.collection_models SET cold_snapshot_id = NULL WHERE collection = %s", (collection,)
    )
    for model_key, snapshot_id in (cold_snapshot_ids or {}).items():
        conn.execute(
            "UPDATE vector_platform.collection_models SET cold_snapshot_id = %s WHERE collection = %s AND model_key = %s",
            (snapshot_id, collection, model_key),
        )


def record_tier_event(
    conn: psycopg.Connection,
    collection: str,
    from_tier: str,
    to_tier: str,
    reason: str,
    rows: int,
    nbytes: int,
    seconds: float,
    run_id: str | None,
    snapshot_id: int | None = None,
    actor: str = "vector_platform",
) -> None:
    conn.execute(
        """
        INSERT INTO vector_platform.tier_events
            (collection, from_tier, to_tier, at, actor, reason, rows, bytes, seconds, run_id, snapshot_id)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
        """,
        (collection, from_tier, to_tier, clock.now(), actor, reason, rows, nbytes, seconds, run_id, snapshot_id),
    )


def tier_events(conn: psycopg.Connection, collection: str, limit: int = 5) -> list[dict[str, Any]]:
    rows = conn.execute(
        """
        SELECT from_tier, to_tier, at, reason, rows, bytes, seconds, run_id, snapshot_id
        FROM vector_platform.tier_events WHERE collection = %s ORDER BY id DESC LIMIT %s
        """,
        (collection, limit),
    ).fetchall()
    keys = ("from", "to", "at", "reason", "rows", "bytes", "seconds", "run_id", "snapshot_id")
    return [
        {k: (v.isoformat() if isinstance(v, dt.datetime) else v) for k, v in zip(keys, row)} for row in rows
    ]


# ---------------------------------------------------------------- rules


@dataclass(frozen=True)
class TierRules:
    """Per collection: evict after N idle days, archive after N cold days, rehydrate on query,
    and move rows whose source timestamp is older than N days to the row archive."""

    evict_after_days: float | None = None
    archive_after_days: float | None = None
    rehydrate_on_query: bool = False
    archive_rows_older_than_days: float | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> "TierRules":
        data = data or {}
        return cls(
            data.get("evict_after_days"), data.get("archive_after_days"), bool(data.get("rehydrate_on_query", False)),
            data.get("archive_rows_older_than_days"),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "evict_after_days": self.evict_after_days,
            "archive_after_days": self.archive_after_days,
            "rehydrate_on_query": self.rehydrate_on_query,
            "archive_rows_older_than_days": self.archive_rows_older_than_days,
        }


_UNSET = object()


def set_rules(
    conn: psycopg.Connection,
    collection: str,
    evict_after_days: Any = _UNSET,
    archive_after_days: Any = _UNSET,
    rehydrate_on_query: Any = _UNSET,
    archive_rows_older_than_days: Any = _UNSET,
) -> TierRules:
    """Change the given rules (None switches a day rule off); the others stay."""
    days = (("evict_after_days", evict_after_days), ("archive_after_days", archive_after_days),
            ("archive_rows_older_than_days", archive_rows_older_than_days))
    for label, value in days:
        if value is not _UNSET and value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e6:
                raise ValueError(f"{label} must be a positive number of days (below a million), got {value!r}"[:300])
    with conn.transaction():
        row = conn.execute(
            "SELECT tier_rules, tier FROM vector_platform.collections WHERE name = %s FOR UPDATE", (collection,)
        ).fetchone()
        if row is None:
            raise KeyError(f"unknown collection {collection!r}")
        if row[1] == "archived":
            raise InvalidMove(f"collection {collection!r} is archived; its rules no longer apply")
        rules = TierRules.from_json(row[0]).to_json()
        for label, value in (*days, ("rehydrate_on_query", rehydrate_on_query)):
            if value is not _UNSET:
                rules[label] = bool(value) if label == "rehydrate_on_query" else value
        conn.execute(
            "UPDATE vector_platform.collections SET tier_rules = %s WHERE name = %s", (Jsonb(rules), collection)
        )
    return TierRules.from_json(rules)


@dataclass(frozen=True)
class TierState:
    """What the tiering rules decide on, for one collection."""

    name: str
    tier: str
    rules: TierRules
    created_at: dt.datetime
    tier_changed_at: dt.datetime | None
    last_queried_at: dt.datetime | None
    rehydrate_requested_at: dt.datetime | None

    def as_json(self) -> dict[str, Any]:
        return {
            "tier": self.tier,
            "rules": self.rules.to_json(),
            "tier_changed_at": _iso(self.tier_changed_at),
            "last_queried_at": _iso(self.last_queried_at),
            "rehydrate_requested_at": _iso(self.rehydrate_requested_at),
        }


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value else None


def tier_states(conn: psycopg.Connection, names: list[str] | None = None) -> list[TierState]:
    if names is not None:
        names = [validate_name(name) for name in names]
    rows = conn.execute(
        """
        SELECT name, tier, tier_rules, created_at, tier_changed_at, last_queried_at, rehydrate_requested_at
        FROM vector_platform.collections WHERE %s::text[] IS NULL OR name = ANY(%s) ORDER BY name
        """,
        (names, names),
    ).fetchall()
    return [TierState(r[0], r[1], TierRules.from_json(r[2]), *r[3:]) for r in rows]


def note_queries(
    conn: psycopg.Connection, last_queried: dict[str, dt.datetime], rehydrate_requests: dict[str, dt.datetime]
) -> None:
    """Batched bookkeeping of searches: last_queried_at, and rehydrate requests of cold collections
    whose rules ask for one (a request stays until the collection changes tier)."""
    if last_queried:
        names, times = zip(*last_queried.items())
        conn.execute(
            """
            UPDATE vector_platform.collections c
            SET last_queried_at = greatest(coalesce(c.last_queried_at, '-infinity'), q.at)
            FROM unnest(%s::text[], %s::timestamptz[]) AS q(name, at) WHERE c.name = q.name
            """,
            (list(names), list(times)),
        )
    if rehydrate_requests:
        names, times = zip(*rehydrate_requests.items())
        conn.execute(
            """
            UPDATE vector_platform.collections c SET rehydrate_requested_at = q.at
            FROM unnest(%s::text[], %s::timestamptz[]) AS q(name, at)
            WHERE c.name = q.name AND c.tier = 'cold' AND c.rehydrate_requested_at IS NULL
              AND coalesce((c.tier_rules ->> 'rehydrate_on_query')::boolean, false)
            """,
            (list(names), list(times)),
        )


def purge_archived_rows(conn: psycopg.Connection, collection: str) -> None:
    """What an archived collection no longer needs: chunks, document bodies, open dead letters.
    Document ids, hashes, metadata and timestamps stay (what was there, and when)."""
    conn.execute("DELETE FROM vector_platform.chunks WHERE collection = %s", (collection,))
    conn.execute(
        "UPDATE vector_platform.documents SET body = '', title = NULL, chunked_hash = NULL WHERE collection = %s AND body <> ''",
        (collection,),
    )
    conn.execute(
        "UPDATE vector_platform.dead_letters SET resolved_at = %s, resolution = 'collection archived' "
        "WHERE collection = %s AND resolved_at IS NULL",
        (clock.now(), collection),
    )


def manifest_text(manifest: dict[str, Any]) -> bytes:
    """The manifest as stored: canonical JSON, so its sha256 is reproducible."""
    return json.dumps(manifest, sort_keys=True, indent=1).encode()


def wants_partitions(conn: psycopg.Connection, collection: str) -> bool:
    """A collection with a row-archival rule gets month-partitioned vector tables (those made
    from now on: an existing table keeps its layout, see `vector_platform.tables`)."""
    row = conn.execute(
        "SELECT tier_rules->>'archive_rows_older_than_days' IS NOT NULL FROM vector_platform.collections WHERE name = %s",
        (collection,),
    ).fetchone()
    return bool(row and row[0])
