"""The cold tier's asset: `cold_snapshot` [collection x model], a verified Parquet snapshot of
the vector table on the object store. The moves between tiers are jobs (`jobs.py`)."""

import dagster as dg

from vector_platform import catalog
from vector_platform.catalog import tiers as tier_sql
from vector_platform.catalog import upgrades as upgrade_sql
from vector_platform.defs.ingest.assets import for_each_partition, vector_table
from vector_platform.defs.partitions import collection_model_partitions
from vector_platform.defs.resources import EmbedderResource, ObjectStoreResource, PostgresResource
from vector_platform.defs.writing import writing
from vector_platform.progress import reporter
from vector_platform.tiers import snapshots
from vector_platform.upgrade import cold as cold_upgrade


def snapshot_metadata(receipt: tier_sql.SnapshotReceipt, written: bool, seconds: float) -> dict:
    return {
        "snapshot_id": receipt.id,
        "uri": receipt.uri,
        "dagster/row_count": receipt.rows,
        "bytes": receipt.bytes,
        "files": len(receipt.manifest["files"]),
        "written": written,
        "seconds": round(seconds, 3),
        "model_fingerprint": receipt.manifest["fingerprint"],
        "id_hash": receipt.manifest["id_hash"],
    }


@dg.asset(
    partitions_def=collection_model_partitions,
    deps=[vector_table],
    group_name="tiers",
    kinds={"parquet", "s3"},
)  # no multi-run policy: one run per partition, so each cold upgrade's gate runs even if another fails
def cold_snapshot(
    context: dg.AssetExecutionContext,
    postgres: PostgresResource,
    object_store: ObjectStoreResource,
    embedder: EmbedderResource,
) -> dg.MaterializeResult:
    """The vector table's rows (chunk ids, doc ids, text, metadata, source timestamps, vectors)
    as zstd Parquet plus a manifest on the object store, read back and verified (sha256 of
    every file, rows, a hash over the sorted chunk ids) before its receipt is written. An
    unchanged table is not written again; older snapshots are deleted once a newer one is
    verified.

    For a cold collection: the snapshot that serves it. A model being upgraded to (`models
    upgrade` on a cold collection) gets its snapshot here, embedded from the text of the
    serving snapshot (never the source), and the collection stays cold; the quality gate
    (check `snapshot_passes_quality_gate`) then decides whether it may serve."""
    pool = postgres.pool()
    store = object_store.store()

    def work(collection: str, model_key: str) -> dict:
        with pool.connection() as conn:
            coll = catalog.get_collection(conn, collection)
            serving = tier_sql.cold_snapshots(conn, collection).get(model_key)
            receipt = tier_sql.get_snapshot(conn, serving) if serving else None
            upgrade_to = upgrade_sql.upgrade_state(conn, collection).upgrade_to
            spec = catalog.get_model(conn, model_key)
        if coll.tier == "cold" and model_key == upgrade_to and model_key in coll.models and model_key != coll.serving_model:
            model = embedder.for_model(spec)
            with writing(context, postgres, collection, model_key, require_active=False):
                try:
                    report = cold_upgrade.upgrade_snapshot(
                        pool, store, model, collection, batch_size=model.batch_size(embedder.batch_size), say=context.log.info,
                        progress=reporter(context.log), cache_store=object_store.cache_store(),
                    )
                except (cold_upgrade.ColdUpgradeError, snapshots.SnapshotError) as err:
                    raise dg.Failure(str(err), allow_retries=False) from None
            return report.as_metadata()
        if coll.tier != "active":
            if receipt is None:
                raise dg.Failure(f"collection {collection!r} is {coll.tier} and has no snapshot of {model_key!r}", allow_retries=False)
            return snapshot_metadata(receipt, False, 0.0)
        with writing(context, postgres, collection, model_key):
            try:
                result = snapshots.ensure_snapshot(pool, store, collection, model_key, context.log.info)
            except snapshots.SnapshotError as err:
                raise dg.Failure(str(err), allow_retries=False) from None
        return {**snapshot_metadata(result.receipt, result.written, result.seconds), "deleted_older": str(result.deleted_older)}

    return for_each_partition(context, work)
