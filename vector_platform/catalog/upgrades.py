"""Catalog rows of model upgrades: quality gate results, swaps and rollbacks, the model a
rollback returns to, the upgrade in progress, and labelled queries (BEIR qrels).

A swap needs the latest gate result of the (collection, model) to have passed for the
model's current fingerprint; `vector_platform.upgrade.swap` enforces it under the writer lock.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Iterable

import psycopg
from psycopg.types.json import Jsonb


@dataclass(frozen=True)
class GateResult:
    id: int
    collection: str
    model_key: str
    fingerprint: str
    baseline_model: str | None
    passed: bool
    figures: dict[str, Any]
    reasons: list[str]
    rows: int
    evaluated_at: dt.datetime
    run_id: str | None

    def summary(self) -> str:
        """One line with the gate's numbers, for refusals and logs."""
        f = self.figures
        if f.get("search") == "cold_exact":
            parts = ["cold snapshot, exact search"]
        elif str(f.get("search", "")).startswith("cold_"):
            parts = [f"cold snapshots, {f['search']} search"]
        else:
            parts = [f"recall@10 {f.get('recall')!s} (target {f.get('recall_target')})"]
        if f.get("ndcg_shadow") is not None:
            parts.append(f"nDCG@10 {f['ndcg_shadow']:.4f} vs serving {f['ndcg_serving']:.4f} (margin {f.get('ndcg_margin')})")
        if f.get("quality_measured") is False:
            parts.append("quality not measured (no logged or labelled queries)")
        if f.get("overlap_at_10") is not None:
            parts.append(f"overlap@10 with serving {f['overlap_at_10']:.3f}")
        if f.get("p95_ms_shadow") is not None and f.get("p95_ms_serving") is not None:
            parts.append(f"p95 {f['p95_ms_shadow']:.2f} ms vs serving {f['p95_ms_serving']:.2f} ms (factor {f.get('latency_factor')})")
        return "; ".join(parts)


_GATE_COLUMNS = (
    "id, collection, model_key, fingerprint, baseline_model, passed, figures, reasons, rows, evaluated_at, run_id"
)


def record_gate(
    conn: psycopg.Connection,
    collection: str,
    model_key: str,
    fingerprint: str,
    baseline_model: str | None,
    passed: bool,
    figures: dict[str, Any],
    reasons: list[str],
    rows: int,
    evaluated_at: dt.datetime,
    run_id: str | None = None,
) -> GateResult:
    row = conn.execute(
        f"""
        INSERT INTO vector_platform.quality_gates
            (collection, model_key, fingerprint, baseline_model, passed, figures, reasons, rows, evaluated_at, run_id)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING {_GATE_COLUMNS}
        """,
        (collection, model_key, fingerprint, baseline_model, passed, Jsonb(figures), reasons, rows, evaluated_at, run_id),
    ).fetchone()
    return GateResult(*row)


def latest_gate(conn: psycopg.Connection, collection: str, model_key: str) -> GateResult | None:
    row = conn.execute(
        f"SELECT {_GATE_COLUMNS} FROM vector_platform.quality_gates WHERE collection = %s AND model_key = %s "
        "ORDER BY id DESC LIMIT 1",
        (collection, model_key),
    ).fetchone()
    return GateResult(*row) if row else None


@dataclass(frozen=True)
class UpgradeState:
    serving_model: str | None
    previous_model: str | None
    previous_retain_until: dt.datetime | None
    upgrade_to: str | None
    upgrade_backfill_id: str | None


def upgrade_state(conn: psycopg.Connection, collection: str) -> UpgradeState:
    row = conn.execute(
        "SELECT serving_model, previous_model, previous_retain_until, upgrade_to, upgrade_backfill_id "
        "FROM vector_platform.collections WHERE name = %s",
        (collection,),
    ).fetchone()
    if row is None:
        raise KeyError(f"unknown collection {collection!r}")
    return UpgradeState(*row)


def start_upgrade(conn: psycopg.Connection, collection: str, to_model: str, backfill_id: str | None) -> None:
    conn.execute(
        "UPDATE vector_platform.collections SET upgrade_to = %s, upgrade_backfill_id = %s WHERE name = %s",
        (to_model, backfill_id, collection),
    )


def set_serving(
    conn: psycopg.Connection,
    collection: str,
    to_model: str,
    previous_model: str | None,
    retain_until: dt.datetime | None,
) -> None:
    """The serving model changes (in the caller's transaction, with the view); the upgrade ends."""
    conn.execute(
        """
        UPDATE vector_platform.collections
        SET serving_model = %s, previous_model = %s, previous_retain_until = %s,
            upgrade_to = CASE WHEN upgrade_to = %s THEN NULL ELSE upgrade_to END,
            upgrade_backfill_id = CASE WHEN upgrade_to = %s THEN NULL ELSE upgrade_backfill_id END
        WHERE name = %s
        """,
        (to_model, previous_model, retain_until, to_model, to_model, collection),
    )


def record_swap(
    conn: psycopg.Connection,
    collection: str,
    kind: str,
    from_model: str | None,
    to_model: str,
    gate_id: int | None,
    at: dt.datetime,
    actor: str,
    run_id: str | None = None,
) -> int:
    return conn.execute(
        """
        INSERT INTO vector_platform.model_swaps (collection, kind, from_model, to_model, gate_id, at, actor, run_id)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING id
        """,
        (collection, kind, from_model, to_model, gate_id, at, actor, run_id),
    ).fetchone()[0]


def swaps(conn: psycopg.Connection, collection: str, limit: int = 10) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT kind, from_model, to_model, gate_id, at, actor, run_id FROM vector_platform.model_swaps "
        "WHERE collection = %s ORDER BY at DESC, id DESC LIMIT %s",
        (collection, limit),
    ).fetchall()
    return [
        {"kind": k, "from": f, "to": t, "gate_id": g, "at": at.isoformat(), "actor": actor, "run_id": run}
        for k, f, t, g, at, actor, run in rows
    ]


def expired_previous(conn: psycopg.Connection, now: dt.datetime) -> list[tuple[str, str]]:
    """(collection, previous model) pairs whose retention has run out."""
    return conn.execute(
        "SELECT name, previous_model FROM vector_platform.collections "
        "WHERE previous_model IS NOT NULL AND previous_retain_until <= %s ORDER BY name",
        (now,),
    ).fetchall()


def mark_retired(conn: psycopg.Connection, collection: str, model_key: str, now: dt.datetime) -> None:
    conn.execute(
        "UPDATE vector_platform.collection_models SET retired_at = %s WHERE collection = %s AND model_key = %s",
        (now, collection, model_key),
    )
    conn.execute(
        "UPDATE vector_platform.collections SET previous_model = NULL, previous_retain_until = NULL "
        "WHERE name = %s AND previous_model = %s",
        (collection, model_key),
    )


def retired_models(conn: psycopg.Connection, collection: str) -> set[str]:
    return {
        r[0]
        for r in conn.execute(
            "SELECT model_key FROM vector_platform.collection_models WHERE collection = %s AND retired_at IS NOT NULL",
            (collection,),
        )
    }


# ---------------------------------------------------------------- labelled queries

def replace_qrels(
    conn: psycopg.Connection, collection: str, queries: dict[str, str], qrels: Iterable[tuple[str, str, int]]
) -> tuple[int, int]:
    """Replace a collection's labelled queries; returns (queries, judgements) stored."""
    qrels = [q for q in qrels if q[0] in queries]
    used = {q[0] for q in qrels}
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("DELETE FROM vector_platform.labelled_queries WHERE collection = %s", (collection,))
        cur.executemany(
            "INSERT INTO vector_platform.labelled_queries (collection, query_id, text) VALUES (%s, %s, %s)",
            [(collection, qid, text) for qid, text in queries.items() if qid in used],
        )
        cur.executemany(
            "INSERT INTO vector_platform.qrels (collection, query_id, doc_id, relevance) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (collection, query_id, doc_id) DO UPDATE SET relevance = excluded.relevance",
            [(collection, qid, doc, rel) for qid, doc, rel in qrels],
        )
    return len(used), len(qrels)


def labelled_queries(conn: psycopg.Connection, collection: str) -> list[tuple[str, str, dict[str, int]]]:
    """(query id, text, {doc id: relevance}) of every labelled query."""
    rows = conn.execute(
        """
        SELECT q.query_id, q.text, jsonb_object_agg(r.doc_id, r.relevance)
        FROM vector_platform.labelled_queries q JOIN vector_platform.qrels r USING (collection, query_id)
        WHERE q.collection = %s GROUP BY q.query_id, q.text ORDER BY q.query_id
        """,
        (collection,),
    ).fetchall()
    return [(qid, text, {doc: int(rel) for doc, rel in judged.items()}) for qid, text, judged in rows]


def logged_query_texts(conn: psycopg.Connection, collection: str, limit: int) -> list[str]:
    """The most recent distinct query texts users asked of a collection (any model)."""
    rows = conn.execute(
        """
        SELECT query_text FROM (
            SELECT query_text, max(queried_at) AS last FROM vector_platform.query_stats
            WHERE collection = %s AND query_text IS NOT NULL AND query_text <> '' GROUP BY query_text
        ) q ORDER BY last DESC LIMIT %s
        """,
        (collection, limit),
    ).fetchall()
    return [r[0] for r in rows]
