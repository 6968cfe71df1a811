"""maintenance_job (table_maintenance + storage_overview) and recall_monitoring_job (the
index_recall_meets_target check alone, partition: collection|model)."""

import dagster as dg

from vector_platform.defs.ingest.assets import hnsw_index
from vector_platform.defs.operations.assets import storage_overview, table_maintenance

maintenance_job = dg.define_asset_job(
    "maintenance_job",
    selection=dg.AssetSelection.assets(table_maintenance, storage_overview),
    description="VACUUM (ANALYZE) every vector table with its health check, then the storage overview.",
)

# A job of checks alone cannot be partitioned in Dagster 1.13 (the partitions are inferred from
# its assets, and `partitions_def=` is ignored), so the job selects hnsw_index and every run of it
# is launched as a subset holding only the recall check (RECALL_CHECK): the schedule's run
# requests and Platform.check_recall do so. The index is never rebuilt by these runs.
recall_monitoring_job = dg.define_asset_job(
    "recall_monitoring_job",
    selection=dg.AssetSelection.assets(hnsw_index),
    description="Measure a serving index's recall@10 on a new sample of real logged queries (partition: collection|model); "
    "launched with only the index_recall_meets_target check selected.",
)
RECALL_CHECK = dg.AssetCheckKey(hnsw_index.key, "index_recall_meets_target")
