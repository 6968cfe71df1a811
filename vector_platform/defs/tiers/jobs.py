"""The moves between tiers, as jobs (partition: collection): evict_job (active -> cold),
rehydrate_job (cold -> active), archive_job (active|cold -> archived). Each holds the
collection's writer lock; see `vector_platform.tiers.moves` for the order of their steps.
Launched from the UI, the CLI (`vector-platform tier`), the Python API and the tiering sensor."""

import dagster as dg
from pydantic import Field

from vector_platform.catalog.tiers import InvalidMove
from vector_platform.defs.partitions import collection_partitions
from vector_platform.defs.resources import ObjectStoreResource, PostgresResource
from vector_platform.defs.writing import writing
from vector_platform.progress import notify
from vector_platform.tiers import moves, snapshots

MOVE_JOBS = {"cold": "evict_job", "active": "rehydrate_job", "archived": "archive_job"}


class MoveConfig(dg.Config):
    reason: str = Field(default="manual", description="manual (a person asked) or rule (the tiering sensor).")


def _move_op(target: str, name: str, description: str):
    @dg.op(name=name, description=description, tags={"kind": "tiers"})
    def move_collection(
        context: dg.OpExecutionContext, config: MoveConfig, postgres: PostgresResource, object_store: ObjectStoreResource
    ):
        collection = context.partition_key

        def say(message: str) -> None:
            context.log.info(message)

        with writing(context, postgres, collection, require_active=False):
            try:
                report = moves.move(
                    postgres.pool(), object_store.store(), collection, target, config.reason, context.run_id, say
                )
            except (InvalidMove, moves.MoveRefused, snapshots.SnapshotError) as err:
                raise dg.Failure(str(err), allow_retries=False) from None
        for warning in report.warnings:
            context.log.warning(warning)
            notify(warning)
        for model_key, snapshot_id in report.snapshots.items():
            if target == "cold":
                context.log_event(
                    dg.AssetMaterialization(
                        asset_key="cold_snapshot",
                        partition=dg.MultiPartitionKey({"collection": collection, "model": model_key}),
                        metadata={"snapshot_id": snapshot_id, "written": report.snapshots_written.get(model_key, False)},
                    )
                )
        yield dg.Output(None, metadata={k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in report.as_metadata().items()})

    return move_collection


evict_collection = _move_op("cold", "evict_collection", "Snapshot (verified) -> serve cold -> drop the tables and indexes.")
rehydrate_collection = _move_op("active", "rehydrate_collection", "Snapshot -> new tables -> valid index -> serve active. Nothing re-embedded.")
archive_collection = _move_op("archived", "archive_collection", "Serve nothing -> delete vectors in Postgres and on the store; catalog rows stay.")


@dg.job(partitions_def=collection_partitions, description="Move a collection from active to cold (partition: collection).")
def evict_job():
    evict_collection()


@dg.job(partitions_def=collection_partitions, description="Move a collection from cold to active (partition: collection).")
def rehydrate_job():
    rehydrate_collection()


@dg.job(partitions_def=collection_partitions, description="Archive a collection, active or cold; terminal (partition: collection).")
def archive_job():
    archive_collection()


cold_snapshot_job = dg.define_asset_job(
    "cold_snapshot_job",
    selection=dg.AssetSelection.assets("cold_snapshot"),
    description="Write (if the table changed) and verify the cold snapshot of one collection under one model.",
)
