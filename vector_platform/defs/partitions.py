"""Collections (dynamic) x model keys (dynamic): every partition can be re-run on its own."""

import dagster as dg

collection_partitions = dg.DynamicPartitionsDefinition(name="collection")
model_partitions = dg.DynamicPartitionsDefinition(name="model")
collection_model_partitions = dg.MultiPartitionsDefinition(
    {"collection": collection_partitions, "model": model_partitions}
)


def collection_and_model(context) -> tuple[str, str]:
    key = context.partition_key
    keys = key.keys_by_dimension if isinstance(key, dg.MultiPartitionKey) else dict(
        zip(("collection", "model"), key.split("|"))
    )
    return keys["collection"], keys["model"]
