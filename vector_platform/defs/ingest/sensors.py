"""Sensors that watch outside state: the catalog's collections and models."""


import dagster as dg

from vector_platform import catalog
from vector_platform.defs.partitions import collection_partitions, model_partitions
from vector_platform.defs.resources import PostgresResource


def missing_partitions(instance: dg.DagsterInstance, collections: list, models: list) -> list:
    """Partition requests for catalog entries the Dagster instance does not know yet."""
    requests = []
    for definition, wanted in ((collection_partitions, collections), (model_partitions, models)):
        known = set(instance.get_dynamic_partitions(definition.name))
        new = [key for key in wanted if key not in known]
        if new:
            requests.append(definition.build_add_request(new))
    return requests


@dg.sensor(minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING)
def collection_discovery_sensor(context: dg.SensorEvaluationContext, postgres: PostgresResource) -> dg.SensorResult:
    """Adds a partition for every collection and model declared in the catalog, so the UI and
    backfills see collections added from the CLI or the Python API."""
    with postgres.pool().connection() as conn:
        collections = [c.name for c in catalog.list_collections(conn)]
        models = catalog.list_model_keys(conn)
    requests = missing_partitions(context.instance, collections, models)
    if not requests:
        return dg.SensorResult(skip_reason="every collection and model already has a partition")
    return dg.SensorResult(dynamic_partitions_requests=requests)
