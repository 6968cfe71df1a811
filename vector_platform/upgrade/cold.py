"""Model upgrades of cold collections: a new snapshot from the serving snapshot's own text.

A cold collection has no vector table, and its source may be long gone: the upgrade reads
the rows of the snapshot that serves it (verified on the way down), embeds their text with
the new model through the embedding cache (content already embedded under that fingerprint
is not sent again; a rejected vector becomes an `embed` dead letter with the reason, as in
ingest), and writes a second snapshot of the same rows with the new vectors and the new
fingerprint. It is verified and receipted like any snapshot, and its digest is the one a
table restored from it will have. The collection stays cold: the new snapshot serves it once
the swap (gated, like an active upgrade's) makes the new model the serving one; the old
snapshot stays for rollback until the previous model is retired.

Callers hold the (collection, model) writer lock: no tier move or swap runs meanwhile.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
from psycopg_pool import ConnectionPool

from vector_platform import catalog
from vector_platform.catalog import tiers as tier_sql
from vector_platform.catalog.tiers import SnapshotReceipt
from vector_platform.ingest import embedding_cache, steps
from vector_platform.ingest.embedders import Embedder
from vector_platform.object_store import ObjectStore
from vector_platform.settings import vp_home
from vector_platform.tiers import ivf, snapshots

PAGE_ROWS = 4_096


class ColdUpgradeError(RuntimeError):
    """The cold collection cannot be upgraded as asked (not cold, no snapshot, not attached)."""


@dataclass
class ColdUpgradeReport:
    collection: str
    model_key: str
    source_snapshot: int
    snapshot: SnapshotReceipt
    written: bool  # False: an earlier run's snapshot of the same source stands
    rows: int
    stats: steps.EmbedStats
    seconds: float
    left_out: int = 0

    def as_metadata(self) -> dict:
        return {
            "snapshot_id": self.snapshot.id, "source_snapshot": self.source_snapshot, "written": self.written,
            "dagster/row_count": self.rows, "model_fingerprint": self.snapshot.manifest["fingerprint"],
            "uri": self.snapshot.uri, "bytes": self.snapshot.bytes, "seconds": round(self.seconds, 3),
            "left_out_dead_lettered": self.left_out,
            **{f"embed_{k}": v for k, v in self.stats.as_metadata().items()},
        }


def serving_snapshot(conn, collection: str) -> SnapshotReceipt:
    coll = catalog.get_collection(conn, collection)
    snapshot_id = tier_sql.cold_snapshots(conn, collection).get(coll.serving_model)
    receipt = tier_sql.get_snapshot(conn, snapshot_id) if snapshot_id is not None else None
    if receipt is None:
        raise ColdUpgradeError(f"cold collection {collection!r} has no snapshot of its serving model {coll.serving_model!r}")
    return receipt


def upgrade_snapshot(
    pool: ConnectionPool,
    store: ObjectStore,
    embedder: Embedder,
    collection: str,
    batch_size: int = 64,
    say: Callable[[str], None] = lambda _: None,
    progress: steps.Progress = lambda stage, done, total: None,
    work_dir: Path | None = None,
    cache_store: ObjectStore | None = None,
) -> ColdUpgradeReport:
    """Give cold `collection` a verified snapshot of model `embedder.spec.key`, embedded from the
    text of the snapshot that serves it (`cache_store`: where the embedding cache lives, by
    default `store`). Idempotent: a snapshot of that model with its
    fingerprint that holds every row of the serving snapshot (equal digests) is kept and not
    written again; one that left rows out is made again."""
    started = time.perf_counter()
    spec = embedder.spec
    with pool.connection() as conn:
        coll = catalog.get_collection(conn, collection)
        if coll.tier != "cold":
            raise ColdUpgradeError(
                f"collection {collection!r} is {coll.tier}, not cold (moved since the upgrade began?): run `models upgrade` again"
            )
        if spec.key not in coll.models:
            raise ColdUpgradeError(f"model {spec.key!r} is not attached to {collection!r} (models upgrade attaches it)")
        if spec.key == coll.serving_model:
            raise ColdUpgradeError(f"{collection!r} already serves {spec.key!r} from its snapshot")
        source = serving_snapshot(conn, collection)
        current_id = tier_sql.cold_snapshots(conn, collection).get(spec.key)
        current = tier_sql.get_snapshot(conn, current_id) if current_id is not None else None
        table = catalog.vector_table_name(conn, collection, spec.key)
    stats = steps.EmbedStats()
    if current is not None and current.manifest.get("fingerprint") == spec.fingerprint and current.table_digest == source.table_digest:
        snapshots.verify_present(store, current)
        say(f"{collection}/{spec.key}: snapshot {current.id} already holds every row of snapshot {source.id}; not written again")
        return ColdUpgradeReport(collection, spec.key, source.id, current, False, current.rows, stats, time.perf_counter() - started)
    # (A snapshot that left rows out is made again: the embedding cache answers for the rows it
    # has, and the rows that failed, e.g. on a timeout, get another try.)

    # Named by the snapshot: after a kill, the files already fetched and checked are reused.
    work = (work_dir or vp_home() / "cache" / "cold-upgrade") / f"{collection}-{spec.key}-from-{source.id}"
    left_out: list[str] = []
    digest = snapshots.RowsDigest(pool)

    def finish(manifest: dict) -> None:
        """Every page written: the digest, and the rows accounted for, before any receipt."""
        manifest["table_digest"] = digest.value
        if manifest["rows"] + len(left_out) != source.rows:
            raise snapshots.SnapshotError(
                f"{collection}/{spec.key}: {manifest['rows']} rows written and {len(left_out)} left out, but the "
                f"source snapshot {source.id} has {source.rows}"
            )
        if not left_out and digest.value != source.table_digest:
            raise snapshots.SnapshotError(f"{collection}/{spec.key}: the rows written differ from snapshot {source.id}'s")

    try:
        paths = snapshots.fetch_verified(store, source, work)
        manifest = snapshots.new_manifest(coll, spec, table, spec.fingerprint)
        manifest["source_snapshot"] = source.id
        pages = _reembedded_pages(pool, cache_store or store, embedder, collection, paths, batch_size, stats, digest, left_out,
                                  progress, source.rows)
        # the new model's vectors get lists of their own when the source is large (or was IVF)
        ivf_layout = source.rows >= ivf.min_rows() or source.manifest.get("layout") == "ivf"
        receipt = snapshots.publish(pool, store, manifest, pages, spec, finish=finish, ivf_rows=source.rows,
                                    ivf_work_dir=snapshots.spill_dir(manifest) if ivf_layout else None)
    finally:
        snapshots.clear_local(work)
    with pool.connection() as conn, conn.transaction():
        tier, _ = tier_sql.lock_collection_row(conn, collection)
        if tier != "cold" or serving_snapshot(conn, collection).id != source.id:
            raise ColdUpgradeError(
                f"{collection!r} changed while its snapshot of {spec.key!r} was written (now {tier}); run `models upgrade` again"
            )
        tier_sql.set_cold_snapshot(conn, collection, spec.key, receipt.id)
    say(f"{collection}/{spec.key}: snapshot {receipt.id} written from snapshot {source.id} ({receipt.rows} rows, "
        f"{stats.embedded} embedded, {stats.from_cache} from the cache, {len(left_out)} left out: dead letters say why)")
    snapshots.delete_replaced(pool, store, collection, spec.key, keep=receipt.id)
    return ColdUpgradeReport(
        collection, spec.key, source.id, receipt, True, receipt.rows, stats, time.perf_counter() - started, len(left_out)
    )


def _reembedded_pages(
    pool, store, embedder: Embedder, collection: str, paths, batch_size: int, stats: steps.EmbedStats,
    digest: snapshots.RowsDigest, left_out: list[str], progress: steps.Progress, total: int,
) -> Iterator[pa.Table]:
    """The source snapshot's rows (chunk_id order kept) with the new model's vectors; rows
    whose text the model rejected are left out (their dead letters say why). `store`: the
    embedding cache's."""
    spec = embedder.spec
    schema = snapshots.arrow_schema(spec.dims)
    done = 0
    for batch in snapshots.read_batches(paths, batch_rows=PAGE_ROWS):
        page = pa.Table.from_batches([batch]).drop_columns(["embedding"])
        hashes = page.column("content_hash").to_pylist()
        needed: dict[str, tuple[str, list[str]]] = {}
        for chunk_id, content_hash, text in zip(page.column("chunk_id").to_pylist(), hashes, page.column("text").to_pylist()):
            needed.setdefault(content_hash, (text, []))[1].append(chunk_id)
        hit = embedding_cache.cached(pool, store, spec.cache_fingerprint, needed)
        stats.chunks += page.num_rows
        stats.from_cache += sum(len(needed[h][1]) for h in hit)
        if hit:
            with pool.connection() as conn, conn.transaction():
                refs = [cid for h in hit for cid in needed[h][1]]
                catalog.resolve_dead_letters(conn, collection, "embed", refs, "found in cache", spec.key)
        todo = [(h, text, ids) for h, (text, ids) in needed.items() if h not in hit]
        for start in range(0, len(todo), batch_size):
            steps.embed_batch(pool, store, embedder, collection, spec.key, todo[start : start + batch_size], stats)
        vectors = embedding_cache.lookup(pool, store, spec.cache_fingerprint, needed)
        keep = [i for i, h in enumerate(hashes) if h in vectors]
        left_out += [chunk_id for i, chunk_id in enumerate(page.column("chunk_id").to_pylist()) if hashes[i] not in vectors]
        if keep:
            kept = page.take(pa.array(keep, pa.int64()))
            matrix = np.vstack([vectors[hashes[i]] for i in keep]).astype(np.float32, copy=False)
            if spec.storage_type == "halfvec":  # what a halfvec table holds: cold and active score alike
                matrix = matrix.astype(np.float16).astype(np.float32)
            embedding = pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), spec.dims)
            out = kept.append_column("embedding", embedding).cast(schema)
            digest.add(out)
            yield out
        done += page.num_rows
        progress("cold_upgrade", done, total)
