"""Row archival: aged rows to Parquet on the object store (`rows.py`: keyset batches)."""
