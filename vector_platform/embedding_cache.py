"""The embedding cache: vectors keyed by (model, chunk content hash), as Parquet files.

Layout: `embedding_cache/<model_key>/<write time ns>-<uuid>.parquet` (names sort in write
order, so for a content hash cached twice the later file wins), columns `content_hash` (string) and
`embedding` (fixed-size list of float32). Files are only ever added, one per embedded batch,
so a run killed mid-way keeps every finished batch and a re-run embeds only what is missing.
Re-ingesting a collection, or building another collection's table with the same model,
reads vectors from here instead of calling the model again.
"""

from __future__ import annotations

import io
import time
import uuid
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vector_platform.object_store import ObjectStore


def _prefix(model_key: str) -> str:
    return f"embedding_cache/{model_key}"


def write(store: ObjectStore, model_key: str, hashes: list[str], vectors: np.ndarray) -> str | None:
    """Add one Parquet file with these vectors; returns its key (None when there is nothing)."""
    if not hashes:
        return None
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    dims = vectors.shape[1]
    table = pa.table(
        {
            "content_hash": pa.array(hashes, pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dims),
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    key = _new_key(model_key, time.time_ns())
    store.put_bytes(key, buf.getvalue())
    return key


def _new_key(model_key: str, stamp: int) -> str:
    return f"{_prefix(model_key)}/{stamp:020d}-{uuid.uuid4().hex}.parquet"


def lookup(store: ObjectStore, model_key: str, hashes: Iterable[str]) -> dict[str, np.ndarray]:
    """Vectors for those of `hashes` that are cached (a later file wins over an earlier one)."""
    wanted = set(hashes)
    found: dict[str, np.ndarray] = {}
    if not wanted:
        return found
    for key in store.list(_prefix(model_key)):
        if not key.endswith(".parquet"):
            continue
        table = pq.read_table(io.BytesIO(store.get_bytes(key)))
        file_hashes = table.column("content_hash").to_pylist()
        column = table.column("embedding").combine_chunks()
        if not len(file_hashes):
            continue
        dims = column.type.list_size
        matrix = column.values.to_numpy(zero_copy_only=False).reshape(-1, dims)
        for i, h in enumerate(file_hashes):
            if h in wanted:
                found[h] = matrix[i]
    return found


def compact(store: ObjectStore, model_key: str, max_files: int = 64) -> int:
    """Merge the model's cache into one file once it has more than `max_files` (0 if left alone).

    Write before delete: the merged file is written first; only the files it was built from are
    deleted afterwards, so a concurrent writer's new file and a crash at any point lose nothing.
    """
    keys = [k for k in store.list(_prefix(model_key)) if k.endswith(".parquet")]
    if len(keys) <= max_files:
        return 0
    tables = [pq.read_table(io.BytesIO(store.get_bytes(k))) for k in keys]
    merged = pa.concat_tables(tables)
    hashes = merged.column("content_hash").to_pylist()
    last = {h: i for i, h in enumerate(hashes)}  # a later file wins, as in lookup
    keep = sorted(last.values())
    merged = merged.take(pa.array(keep))
    buf = io.BytesIO()
    pq.write_table(merged, buf, compression="zstd")
    # Named after its newest input: a file another run writes meanwhile still sorts after it.
    newest = int(keys[-1].rsplit("/", 1)[1].split("-", 1)[0])
    store.put_bytes(_new_key(model_key, newest), buf.getvalue())
    for key in keys:
        store.delete(key)
    return len(keys)


def cached_count(store: ObjectStore, model_key: str) -> int:
    return sum(pq.read_metadata(io.BytesIO(store.get_bytes(k))).num_rows for k in store.list(_prefix(model_key)))
