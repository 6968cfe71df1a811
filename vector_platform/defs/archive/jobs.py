"""row_archive_job (partition: collection): one archival pass over a collection's aged rows."""

import dagster as dg

from vector_platform.defs.partitions import collection_partitions

row_archive_job = dg.define_asset_job(
    "row_archive_job",
    selection=dg.AssetSelection.assets("row_archive"),
    partitions_def=collection_partitions,
    description="Move a collection's rows older than its archive_rows_older_than_days rule to the row archive.",
)
