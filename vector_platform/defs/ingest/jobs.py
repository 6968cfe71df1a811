"""Jobs the CLI and schedules launch; one per partitions definition (a run has one partition key)."""

import dagster as dg

from vector_platform.defs.ingest.assets import chunks, embeddings, hnsw_index, serving_view, source_documents, vector_table

ingest_documents_job = dg.define_asset_job(
    "ingest_documents_job",
    selection=dg.AssetSelection.assets(source_documents, chunks),
    description="Read a collection's source and chunk what changed (partition: collection).",
)

embed_and_index_job = dg.define_asset_job(
    "embed_and_index_job",
    selection=dg.AssetSelection.assets(embeddings, vector_table, hnsw_index),
    description="Embed, load and index one collection under one model, with their checks (partition: collection|model).",
)

serving_view_job = dg.define_asset_job(
    "serving_view_job",
    selection=dg.AssetSelection.assets(serving_view),
    description="Point a collection's serving view at its serving model's table (partition: collection).",
)
