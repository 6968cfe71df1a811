"""Collections (dynamic) x model keys (dynamic): every partition can be re-run on its own.

The per-(collection, model) assets carry a multi-run backfill policy: a backfill (a model
upgrade over several collections) packs up to VP_BACKFILL_PARTITIONS_PER_RUN partitions into
one run. Dagster gives such a run a partition key range (a rectangle: for one model, a run
of consecutive collections), so those assets and their checks work on `partition_pairs`.
"""

import os

import dagster as dg

collection_partitions = dg.DynamicPartitionsDefinition(name="collection")
model_partitions = dg.DynamicPartitionsDefinition(name="model")
collection_model_partitions = dg.MultiPartitionsDefinition(
    {"collection": collection_partitions, "model": model_partitions}
)

BACKFILL_PARTITIONS_PER_RUN = int(os.environ.get("VP_BACKFILL_PARTITIONS_PER_RUN", "8"))
vector_backfill_policy = dg.BackfillPolicy.multi_run(max_partitions_per_run=BACKFILL_PARTITIONS_PER_RUN)


def _pair(key) -> tuple[str, str]:
    keys = key.keys_by_dimension if isinstance(key, dg.MultiPartitionKey) else dict(zip(("collection", "model"), str(key).split("|")))
    return keys["collection"], keys["model"]


def collection_and_model(context) -> tuple[str, str]:
    """The (collection, model) of a run of one partition."""
    return _pair(context.partition_key)


def partition_pairs(context) -> list[tuple[str, str]]:
    """Every (collection, model) of the run: one, or a backfill's range."""
    if getattr(context, "has_partition_key_range", False) and context.has_partition_key_range:
        return [_pair(key) for key in context.partition_keys]
    return [collection_and_model(context)]
