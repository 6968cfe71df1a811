"""Moving a collection between tiers: evict (active -> cold), rehydrate (cold -> active),
archive (active|cold -> archived). The caller holds the collection's writer lock.

Each move is ordered so that search never stops and nothing is dropped early:

- evict: a verified snapshot of every vector table (reused when the table did not change,
  then read back in full once more) -> one transaction switches serving to cold (the view
  goes, the tier and the snapshots that serve it are set, the tier event is written) ->
  each table is dropped, only if it still matches its snapshot's digest.
- rehydrate: each snapshot is fetched and checked against its checksums -> restored into
  its table in chunk_id order, one transaction per batch (a re-run resumes after the last
  row loaded) -> the restored table must have the snapshot's digest -> the HNSW index is
  built and checked valid -> recall is measured -> one transaction switches serving to active.
  Nothing is embedded again; the embedding cache is not read.
- archive: one transaction switches to archived (search skips it from then on) -> tables,
  snapshot files, chunks and document bodies are deleted; document ids, the catalog rows
  and the tier history stay. Terminal.

A crash anywhere followed by a re-run completes the move: each step checks what is already
done. Asking for the tier a collection already has completes what a crashed move left
(tables not yet dropped, files not yet deleted) and otherwise does nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from psycopg import sql
from psycopg_pool import ConnectionPool

from vector_platform import catalog, checks, faults, tables
from vector_platform.catalog import tiers as tier_sql
from vector_platform.catalog.tiers import InvalidMove, SnapshotReceipt, check_move
from vector_platform.object_store import ObjectStore
from vector_platform.settings import vp_home
from vector_platform.tiers import snapshots
from vector_platform.tiers.snapshots import SnapshotError

RESTORE_BATCH_ROWS = 5000


class MoveRefused(RuntimeError):
    """A move that cannot start (nothing to evict, a snapshot missing): nothing was changed."""


@dataclass
class MoveReport:
    collection: str
    from_tier: str
    to_tier: str
    move: str | None  # None: the collection was already there
    reason: str
    rows: int = 0
    bytes: int = 0
    seconds: float = 0.0
    snapshots: dict[str, int] = field(default_factory=dict)
    snapshots_written: dict[str, bool] = field(default_factory=dict)
    completed: list[str] = field(default_factory=list)  # leftovers of an earlier run finished now
    warnings: list[str] = field(default_factory=list)
    recall: float | None = None

    def as_metadata(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if v not in (None, [], {})}
        out["move"] = self.move or "none (already there)"
        return out


def move(
    pool: ConnectionPool,
    store: ObjectStore,
    collection: str,
    target: str,
    reason: str = "manual",
    run_id: str | None = None,
    say: Callable[[str], None] = lambda _: None,
    work_dir: Path | None = None,
) -> MoveReport:
    """Move `collection` to tier `target` (see the module's docstring for the order of steps)."""
    if reason not in ("manual", "rule"):
        raise ValueError(f"reason must be manual or rule, got {reason!r}")
    with pool.connection() as conn:
        current = catalog.get_collection(conn, collection).tier
    name = check_move(collection, current, target)
    report = MoveReport(collection, current, target, name, reason)
    started = time.perf_counter()
    work_dir = work_dir or vp_home() / "cache" / "restore"
    if target == "cold":
        if name:
            _evict(pool, store, report, run_id, say, started)
        _drop_evicted_tables(pool, collection, report, say)
    elif target == "active":
        if name:
            _rehydrate(pool, store, report, run_id, say, started, work_dir)
    else:
        if name:
            _switch_to_archived(pool, report, run_id, started)
        _purge_archived(pool, store, collection, report, say)
    report.seconds = round(time.perf_counter() - started, 3)
    return report


# ---------------------------------------------------------------- evict


def _vector_tables(pool: ConnectionPool, collection: str) -> dict[str, str]:
    """model key -> table name, for the collection's models whose table exists."""
    with pool.connection() as conn:
        return tables.collection_tables(conn, collection)


def _evict(pool, store, report: MoveReport, run_id, say, started) -> None:
    collection = report.collection
    present = _vector_tables(pool, collection)
    with pool.connection() as conn:
        serving = catalog.get_collection(conn, collection).serving_model
    if serving not in present:
        raise MoveRefused(f"collection {collection!r} has no vector table for its serving model {serving!r}: nothing to evict (ingest it first)")
    receipts: dict[str, SnapshotReceipt] = {}
    for model_key in present:
        result = snapshots.ensure_snapshot(pool, store, collection, model_key, say)
        if not result.written:
            # Reused: read it back in full once more before anything is dropped on its word.
            snapshots.verify_receipt(store, result.receipt)
        receipts[model_key] = result.receipt
        report.snapshots[model_key] = result.receipt.id
        report.snapshots_written[model_key] = result.written
    faults.point("evict.after_snapshot")
    with pool.connection() as conn:
        report.rows = receipts[serving].rows
        report.bytes = sum(tables.table_stats(conn, table)[1] for table in present.values())
    with pool.connection() as conn, conn.transaction():
        tier, _ = tier_sql.lock_collection_row(conn, collection)
        if tier != "active":
            raise MoveRefused(f"collection {collection!r} became {tier} while its snapshot was written; nothing dropped")
        tables.drop_view(conn, collection)
        tier_sql.switch_tier(conn, collection, "cold", {m: r.id for m, r in receipts.items()})
        tier_sql.record_tier_event(
            conn, collection, "active", "cold", report.reason, report.rows, report.bytes,
            time.perf_counter() - started, run_id, receipts[serving].id,
        )
    say(f"{collection}: now served cold from snapshot {receipts[serving].id}")
    faults.point("evict.after_switch")


def _drop_evicted_tables(pool: ConnectionPool, collection: str, report: MoveReport, say) -> None:
    """Drop each table whose snapshot serves the cold collection, if it still matches it."""
    present = _vector_tables(pool, collection)
    with pool.connection() as conn:
        serving_snapshots = tier_sql.cold_snapshots(conn, collection)
        receipts = {m: tier_sql.get_snapshot(conn, sid) for m, sid in serving_snapshots.items()}
    for model_key, table in present.items():
        receipt = receipts.get(model_key)
        if receipt is None:
            report.warnings.append(f"table {table} has no snapshot serving it; kept")
            continue
        with pool.connection() as conn:
            _, digest = snapshots.table_digest(conn, table)
            if digest != receipt.table_digest:
                raise SnapshotError(
                    f"table {table} changed after snapshot {receipt.id} was taken; it is kept (re-run the evict "
                    "after rehydrating, or investigate who wrote it)"
                )
            tables.drop_table(conn, table)
        if report.move is None:
            report.completed.append(f"dropped {table}")
        say(f"{collection}: dropped {table} (its rows are in snapshot {receipt.id})")


# ---------------------------------------------------------------- rehydrate


def _rehydrate(pool, store, report: MoveReport, run_id, say, started, work_dir: Path) -> None:
    collection = report.collection
    with pool.connection() as conn:
        coll = catalog.get_collection(conn, collection)
        serving_snapshots = tier_sql.cold_snapshots(conn, collection)
        receipts = {m: tier_sql.get_snapshot(conn, sid) for m, sid in serving_snapshots.items()}
    if receipts.get(coll.serving_model) is None:
        raise MoveRefused(f"cold collection {collection!r} has no snapshot of its serving model {coll.serving_model!r}")
    for model_key, receipt in receipts.items():
        if receipt is None:
            raise MoveRefused(f"the snapshot of {collection}/{model_key} is no longer recorded; nothing restored")
        # Named by the snapshot: a re-run after a crash finds what was already fetched and checked.
        _restore(pool, store, collection, model_key, receipt, coll.settings, say, work_dir / f"snapshot-{receipt.id}")
        report.snapshots[model_key] = receipt.id
        if receipt.rows == 0:
            report.warnings.append(f"snapshot {receipt.id} of {collection}/{model_key} is empty: the collection comes back with no vectors")
    serving_table = None
    with pool.connection() as conn:
        serving_table = catalog.vector_table_name(conn, collection, coll.serving_model)
        report.rows, report.bytes = tables.table_stats(conn, serving_table)
    figures = checks.measure_recall(pool, collection, coll.serving_model, ef_search=coll.settings.hnsw_ef_search, sample=100)
    report.recall = figures["recall"]
    if figures["recall"] is not None and figures["recall"] < coll.settings.recall_target:
        report.warnings.append(f"recall@10 {figures['recall']:.3f} is below the target {coll.settings.recall_target}")
    with pool.connection() as conn, conn.transaction():
        tier, _ = tier_sql.lock_collection_row(conn, collection)
        if tier != "cold":
            raise MoveRefused(f"collection {collection!r} became {tier} while it was restored")
        tables.publish_view(conn, collection, serving_table)
        tier_sql.switch_tier(conn, collection, "active")
        tier_sql.record_tier_event(
            conn, collection, "cold", "active", report.reason, report.rows, report.bytes,
            time.perf_counter() - started, run_id, receipts[coll.serving_model].id,
        )
    say(f"{collection}: active again ({report.rows} rows, index valid)")


def _restore(pool, store, collection, model_key, receipt: SnapshotReceipt, settings, say, work: Path) -> None:
    with pool.connection() as conn:
        spec = catalog.get_model(conn, model_key)
        table = catalog.vector_table_name(conn, collection, model_key)
        tables.create_table(conn, table, spec, partitioned=tier_sql.wants_partitions(conn, collection))
        partitioned = tables.is_partitioned(conn, table)
        after, skip = None, 0
        if receipt.manifest.get("layout") == "ivf":
            # rows in list order, loaded in file order one committed batch at a time: the rows
            # already in the table are the snapshot's first ones
            skip = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(tables.table_id(table))).fetchone()[0]
        else:
            after = conn.execute(sql.SQL("SELECT chunk_id::text FROM {} ORDER BY chunk_id DESC LIMIT 1").format(tables.table_id(table))).fetchone()
            after = after[0] if after else None
    if after is not None or skip:
        say(f"{collection}/{model_key}: resuming the restore after " + (f"chunk {after}" if after else f"{skip} rows"))
    try:
        paths = snapshots.fetch_verified(store, receipt, work)
        for batch in snapshots.read_batches(paths, after=after, batch_rows=RESTORE_BATCH_ROWS, skip_rows=skip):
            rows, vectors, updated_at = snapshots.rows_of_batch(batch)
            with pool.connection() as conn, conn.transaction():
                tables.copy_restored_rows(conn, table, spec, rows, vectors, updated_at, partitioned)
            faults.point("rehydrate.after_first_batch")
    finally:
        snapshots.clear_local(work)
    with pool.connection() as conn:
        rows, digest = snapshots.table_digest(conn, table)
        if digest != receipt.table_digest:
            raise SnapshotError(
                f"{table} restored from snapshot {receipt.id} has {rows} rows and does not match the snapshot "
                f"({receipt.rows} rows); the collection stays cold"
            )
        index = tables.ensure_hnsw(conn, table, spec, settings.hnsw_m, settings.hnsw_ef_construction)
    say(f"{collection}/{model_key}: {rows} rows restored, index {index.name} {index.action} and valid")


# ---------------------------------------------------------------- archive


def _switch_to_archived(pool, report: MoveReport, run_id, started) -> None:
    collection = report.collection
    present = _vector_tables(pool, collection)
    with pool.connection() as conn, conn.transaction():
        tier, _ = tier_sql.lock_collection_row(conn, collection)
        if tier == "archived":
            return
        serving = catalog.get_collection(conn, collection).serving_model
        if tier == "active" and serving in present:
            report.rows, report.bytes = tables.table_stats(conn, present[serving])
        elif tier == "cold":
            receipts = [tier_sql.get_snapshot(conn, sid) for sid in tier_sql.cold_snapshots(conn, collection).values()]
            report.rows = max((r.rows for r in receipts if r), default=0)
            report.bytes = sum(r.bytes for r in receipts if r)
        tables.drop_view(conn, collection)
        tier_sql.switch_tier(conn, collection, "archived")
        tier_sql.record_tier_event(
            conn, collection, tier, "archived", report.reason, report.rows, report.bytes, time.perf_counter() - started, run_id
        )
    faults.point("archive.after_switch")


def _purge_archived(pool, store, collection: str, report: MoveReport, say) -> None:
    """Delete an archived collection's vectors everywhere; keep its catalog rows and document ids."""
    for model_key, table in _vector_tables(pool, collection).items():
        with pool.connection() as conn:
            tables.drop_table(conn, table)
        if report.move is None:
            report.completed.append(f"dropped {table}")
        say(f"{collection}: dropped {table}")
    with pool.connection() as conn:
        receipts = tier_sql.live_snapshots(conn, collection)
    for receipt in receipts:
        snapshots.delete_snapshot(pool, store, receipt)
        if report.move is None:
            report.completed.append(f"deleted snapshot {receipt.id}")
        say(f"{collection}: deleted snapshot {receipt.id} from the object store")
    for key in store.list(f"collections/{collection}/snapshots"):  # files of writes that never got a receipt
        store.delete(key, missing_ok=True)
    with pool.connection() as conn, conn.transaction():
        tier_sql.purge_archived_rows(conn, collection)


__all__ = ["InvalidMove", "MoveRefused", "MoveReport", "move"]
