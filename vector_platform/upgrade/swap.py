"""Serving swaps: point a collection at another model's table, in one transaction.

- `swap` to an upgrade's shadow model needs its latest quality gate to have passed for the
  model's fingerprint, a valid HNSW index, and a table that covers every live chunk; the
  refusal says which and carries the gate's numbers.
- `rollback` returns to the previous model while its table is retained (no gate: it served
  before), again only if its table is complete (ingest writes every attached model).
- A cold collection swaps between snapshots instead (`upgrade.cold` made the new one from the
  serving one's rows): the same gate, no view to replace; it stays cold.
- `retire_expired` drops previous tables whose retention ran out, keeping the attachment
  (history) and any snapshot.

Each holds the collection's writer lock (no ingest, move or other swap meanwhile); readers
keep reading: the serving view is replaced inside one transaction, so a search sees the old
table or the new one, and one that raced the swap retries on the new model (see search).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Callable

from psycopg_pool import ConnectionPool

from vector_platform import catalog, checks, clock, tables
from vector_platform.catalog import tiers as tier_sql
from vector_platform.catalog import upgrades as upgrade_sql
from vector_platform.locks import writer_lock


class SwapRefused(RuntimeError):
    """A swap or rollback that would serve an ungated, failing or incomplete table."""


@dataclass
class SwapReport:
    collection: str
    kind: str  # swap | rollback | unchanged
    from_model: str | None
    to_model: str
    gate_id: int | None
    rows: int
    retain_until: dt.datetime | None

    def as_metadata(self) -> dict:
        return {
            "kind": self.kind, "from_model": self.from_model or "none", "to_model": self.to_model,
            "gate_id": self.gate_id if self.gate_id is not None else "none", "rows": self.rows,
            "previous_retained_until": self.retain_until.isoformat() if self.retain_until else "none",
        }


def _ready_table(conn, pool, collection: str, model_key: str) -> tuple[str, int]:
    """The model's table, refused unless it exists, has a valid HNSW index and covers every live chunk."""
    table = catalog.vector_table_name(conn, collection, model_key)
    if model_key in upgrade_sql.retired_models(conn, collection) or not tables.table_exists(conn, table):
        raise SwapRefused(f"{collection}: model {model_key!r} has no vector table (retired, or never built)")
    if tables.current_index(conn, table) is None:
        raise SwapRefused(f"{collection}: the table of {model_key!r} has no valid HNSW index yet")
    figures = checks.count_lost_chunks(pool, collection, model_key)
    if figures["lost"] or figures["orphans"]:
        raise SwapRefused(
            f"{collection}: the table of {model_key!r} is behind ({figures['lost']} live chunks without a vector or "
            f"dead letter, {figures['orphans']} rows of deleted chunks); ingest the collection, then swap"
        )
    rows, _ = tables.table_stats(conn, table)
    return table, rows


def _ready_snapshot(conn, collection: str, model_key: str) -> tuple[int, int]:
    """(snapshot id, rows) of the model's snapshot that would serve the cold collection, refused
    unless it holds the model's fingerprint and exactly the rows of the snapshot serving now
    (equal digests: the same chunk ids, contents, metadata and times)."""
    spec = catalog.get_model(conn, model_key)
    coll = catalog.get_collection(conn, collection)
    served = tier_sql.cold_snapshots(conn, collection)
    receipt = tier_sql.get_snapshot(conn, served[model_key]) if model_key in served else None
    if model_key in upgrade_sql.retired_models(conn, collection) or receipt is None:
        raise SwapRefused(f"{collection} is cold and has no snapshot of {model_key!r} (retired, or never built: models upgrade builds it)")
    if receipt.manifest.get("fingerprint") != spec.fingerprint:
        raise SwapRefused(f"{collection}: snapshot {receipt.id} of {model_key!r} holds vectors of another fingerprint")
    current = tier_sql.get_snapshot(conn, served[coll.serving_model]) if coll.serving_model in served else None
    if current is not None and receipt.table_digest != current.table_digest:
        open_letters = catalog.count_open(conn, collection, model_key)
        raise SwapRefused(
            f"{collection}: snapshot {receipt.id} of {model_key!r} holds {receipt.rows} rows, not the {current.rows} rows of "
            f"snapshot {current.id} serving now ({open_letters} dead-lettered under {model_key!r}); run `models upgrade "
            f"{collection} --to {model_key}` again: it retries the rows left out"
        )
    return receipt.id, receipt.rows


def _no_more_dead_letters(conn, collection: str, to_model: str, serving: str | None) -> None:
    """A chunk dead-lettered under the new model would vanish from search with the swap:
    refuse while the shadow has more open dead letters than the serving model."""
    new, old = catalog.count_open(conn, collection, to_model), catalog.count_open(conn, collection, serving) if serving else 0
    if new > old:
        raise SwapRefused(
            f"{collection}: {new} chunks are dead-lettered under {to_model!r} ({old} under {serving!r}); they would leave "
            "search with the swap. Replay them (vector-platform dead-letters replay NAME), then swap"
        )


def swap(
    pool: ConnectionPool,
    dsn: str,
    collection: str,
    to_model: str,
    actor: str = "manual",
    run_id: str | None = None,
    say: Callable[[str], None] = lambda message: None,
) -> SwapReport:
    """Serve `to_model`, gated. Idempotent: swapping to the serving model changes nothing."""
    with writer_lock(dsn, collection, say=say), pool.connection() as conn:
        coll = catalog.get_collection(conn, collection)
        if coll.serving_model == to_model:
            return SwapReport(collection, "unchanged", to_model, to_model, None, 0, None)
        if coll.tier == "archived":
            raise SwapRefused(f"{collection} is archived: nothing serves it")
        if to_model not in coll.models:
            raise SwapRefused(f"{collection}: model {to_model!r} is not attached (models upgrade attaches it)")
        if to_model == upgrade_sql.upgrade_state(conn, collection).previous_model:
            raise SwapRefused(f"{collection}: {to_model!r} is the previous model: use `models rollback {collection}`")
        spec = catalog.get_model(conn, to_model)
        gate = upgrade_sql.latest_gate(conn, collection, to_model)
        if gate is None:
            raise SwapRefused(
                f"{collection}: no quality gate result for {to_model!r}; the upgrade backfill runs it with hnsw_index "
                "(check shadow_passes_quality_gate)"
            )
        if gate.fingerprint != spec.fingerprint:
            raise SwapRefused(f"{collection}: the gate result of {to_model!r} was measured on other vectors (fingerprint {gate.fingerprint})")
        if gate.passed and gate.baseline_model not in (None, coll.serving_model):
            raise SwapRefused(
                f"{collection}: the gate of {to_model!r} compared it with {gate.baseline_model!r}, but {coll.serving_model!r} "
                "serves now; run hnsw_index for the shadow again (e.g. ingest the collection) to measure it again"
            )
        if not gate.passed:
            raise SwapRefused(
                f"{collection}: the quality gate of {to_model!r} failed ({'; '.join(gate.reasons)}). Figures: {gate.summary()}. "
                f"{coll.serving_model!r} keeps serving"
            )
        if coll.tier == "cold":
            table, (snapshot_id, rows) = None, _ready_snapshot(conn, collection, to_model)
            if gate.figures.get("snapshot_id") != snapshot_id:
                raise SwapRefused(
                    f"{collection}: the gate of {to_model!r} did not measure snapshot {snapshot_id}, which would serve; "
                    f"run `models upgrade {collection} --to {to_model}` again to gate it"
                )
        else:
            table, rows = _ready_table(conn, pool, collection, to_model)
        _no_more_dead_letters(conn, collection, to_model, coll.serving_model)
        retain_until = clock.now() + dt.timedelta(days=coll.settings.retain_previous_days)
        with conn.transaction():
            tier, _ = tier_sql.lock_collection_row(conn, collection)
            if tier != coll.tier:
                raise SwapRefused(f"{collection} became {tier} meanwhile; swap again")
            if upgrade_sql.latest_gate(conn, collection, to_model).id != gate.id:
                raise SwapRefused(f"{collection}: the gate of {to_model!r} was measured again meanwhile; swap again")
            if table is not None:  # a cold collection has no view: search reads its serving model's snapshot
                tables.publish_view(conn, collection, table)
            # One model is kept for rollback: the one serving until now. An older previous model
            # (a second upgrade within the retention) is retired now, or it would be written forever.
            older = upgrade_sql.upgrade_state(conn, collection).previous_model
            if older not in (None, to_model, coll.serving_model):
                _retire(conn, collection, older)
                say(f"{collection}: {older!r} retired (superseded twice; {coll.serving_model!r} is kept for rollback)")
            upgrade_sql.set_serving(conn, collection, to_model, coll.serving_model, retain_until)
            upgrade_sql.record_swap(conn, collection, "swap", coll.serving_model, to_model, gate.id, clock.now(), actor, run_id)
    return SwapReport(collection, "swap", coll.serving_model, to_model, gate.id, rows, retain_until)


def _retire(conn, collection: str, model_key: str, now: dt.datetime | None = None) -> None:
    """In the caller's transaction: drop the model's table, stop serving its cold snapshot (the
    snapshot's files and receipt stay), and mark the attachment retired (ingest stops writing it)."""
    tables.drop_table(conn, catalog.vector_table_name(conn, collection, model_key))
    tier_sql.set_cold_snapshot(conn, collection, model_key, None)
    upgrade_sql.mark_retired(conn, collection, model_key, now or clock.now())


def rollback(
    pool: ConnectionPool,
    dsn: str,
    collection: str,
    actor: str = "manual",
    run_id: str | None = None,
    say: Callable[[str], None] = lambda message: None,
) -> SwapReport:
    """Serve the previous model again (while its table is retained); the rolled-back model
    becomes the previous one, so the rollback itself can be undone."""
    with writer_lock(dsn, collection, say=say), pool.connection() as conn:
        coll = catalog.get_collection(conn, collection)
        state = upgrade_sql.upgrade_state(conn, collection)
        if state.previous_model is None:
            raise SwapRefused(f"{collection}: nothing to roll back to (no previous model retained)")
        if coll.tier == "archived":
            raise SwapRefused(f"{collection} is archived: nothing serves it")
        if coll.tier == "cold":
            table, (_, rows) = None, _ready_snapshot(conn, collection, state.previous_model)
        else:
            table, rows = _ready_table(conn, pool, collection, state.previous_model)
        retain_until = clock.now() + dt.timedelta(days=coll.settings.retain_previous_days)
        with conn.transaction():
            tier, _ = tier_sql.lock_collection_row(conn, collection)
            if tier != coll.tier:
                raise SwapRefused(f"{collection} became {tier} meanwhile; roll back again")
            if table is not None:
                tables.publish_view(conn, collection, table)
            upgrade_sql.set_serving(conn, collection, state.previous_model, coll.serving_model, retain_until)
            upgrade_sql.record_swap(
                conn, collection, "rollback", coll.serving_model, state.previous_model, None, clock.now(), actor, run_id
            )
    return SwapReport(collection, "rollback", coll.serving_model, state.previous_model, None, rows, retain_until)


def retire_expired(
    pool: ConnectionPool, dsn: str, now: dt.datetime | None = None, say: Callable[[str], None] = lambda m: None
) -> list[tuple[str, str]]:
    """Drop previous models' tables whose retention ran out; returns (collection, model) retired.

    The catalog attachment stays (history), so ingest stops writing the model; snapshots of it
    are kept (they have their own receipts). A cold collection stops counting the previous
    model's snapshot among those that serve it (a rehydrate no longer restores it)."""
    now = now or clock.now()
    with pool.connection() as conn:
        due = upgrade_sql.expired_previous(conn, now)
    retired = []
    for collection, model_key in due:
        with writer_lock(dsn, collection, say=say), pool.connection() as conn:
            state = upgrade_sql.upgrade_state(conn, collection)
            if state.previous_model != model_key or state.previous_retain_until is None or state.previous_retain_until > now:
                continue  # rolled back or swapped again meanwhile
            if state.serving_model == model_key:
                continue
            with conn.transaction():
                _retire(conn, collection, model_key, now)
            retired.append((collection, model_key))
    return retired


def abandon(
    pool: ConnectionPool, dsn: str, collection: str, model_key: str, say: Callable[[str], None] = lambda m: None
) -> None:
    """Give up an upgrade target (a failed gate, a change of mind): its table is dropped, its
    cold snapshot no longer counts, ingest stops writing it, and the attachment stays as
    history (retired). Refused for the serving model and for a previous one kept for rollback."""
    with writer_lock(dsn, collection, say=say), pool.connection() as conn:
        coll = catalog.get_collection(conn, collection)
        state = upgrade_sql.upgrade_state(conn, collection)
        if model_key not in coll.models:
            raise SwapRefused(f"{collection}: model {model_key!r} is not attached (or already retired)")
        if model_key == coll.serving_model:
            raise SwapRefused(f"{collection}: {model_key!r} serves the collection; swap to another model first")
        if model_key == state.previous_model:
            raise SwapRefused(f"{collection}: {model_key!r} is kept for rollback until {state.previous_retain_until}; "
                              "`models retire` drops it once that has passed")
        with conn.transaction():
            tier_sql.lock_collection_row(conn, collection)
            _retire(conn, collection, model_key)
            catalog.resolve_model_letters(conn, collection, model_key, f"model {model_key} abandoned")
            if state.upgrade_to == model_key:
                upgrade_sql.start_upgrade(conn, collection, None, None)
