"""The embedding cache: vectors keyed by (model fingerprint, chunk content hash), as Parquet
files on the object store, with an index in the catalog saying which file and row holds each.

Layout: `embedding_cache/<fingerprint>/<write time ns>-<uuid>.parquet`, columns `content_hash`
(string) and `embedding` (fixed-size list of float32), row groups of ROW_GROUP rows. A batch
of vectors is written as one file, then indexed: a run killed mid-way keeps every finished
batch, and a re-run embeds only what is missing. A lookup asks the index where its hashes
are and reads only those files' row groups, so its cost follows what it asks for, not the
cache's size. Keyed by fingerprint, the cache is shared by every collection using the model.

Compaction merges small files into large ones, repoints the index, and retires the old
files; a retired file is deleted only while no lookup of that fingerprint is running
(lookups hold a shared advisory lock), so nothing a reader has located disappears under it.
"""

from __future__ import annotations

import io
import logging
import time
import uuid
from collections import defaultdict
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from psycopg_pool import ConnectionPool

from vector_platform import locks
from vector_platform.catalog import cache_index
from vector_platform.object_store import ObjectStore

log = logging.getLogger(__name__)

ROW_GROUP = 4096
COMPACT_ABOVE_FILES = 64
COMPACTED_FILE_ROWS = 65_536
SMALL_FILE_ROWS = 8_192


def prefix(fingerprint: str) -> str:
    return f"embedding_cache/{fingerprint}"


def _arrow_table(hashes: list[str], vectors: np.ndarray) -> pa.Table:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    return pa.table(
        {
            "content_hash": pa.array(hashes, pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1]),
        }
    )


def _encode(hashes: list[str], vectors: np.ndarray) -> bytes:
    buf = io.BytesIO()
    pq.write_table(_arrow_table(hashes, vectors), buf, compression="zstd", row_group_size=ROW_GROUP, use_dictionary=["content_hash"])
    return buf.getvalue()


def write(pool: ConnectionPool, store: ObjectStore, fingerprint: str, hashes: list[str], vectors: np.ndarray) -> str | None:
    """Write one file with these vectors, then index it; returns its key (None when empty)."""
    if not hashes:
        return None
    data = _encode(hashes, vectors)
    key = f"{prefix(fingerprint)}/{time.time_ns():020d}-{uuid.uuid4().hex}.parquet"
    store.put_bytes(key, data)  # written before it is indexed: the index never points at nothing
    with pool.connection() as conn, conn.transaction():
        cache_index.add_file(conn, store.url, fingerprint, key, hashes, len(data))
    return key


def cached(pool: ConnectionPool, store: ObjectStore, fingerprint: str, hashes: Iterable[str]) -> set[str]:
    """Which of `hashes` have a vector (the index alone: no file is read)."""
    wanted = list(set(hashes))
    if not wanted:
        return set()
    with pool.connection() as conn:
        return cache_index.cached(conn, store.url, fingerprint, wanted)


def lookup(pool: ConnectionPool, store: ObjectStore, fingerprint: str, hashes: Iterable[str]) -> dict[str, np.ndarray]:
    """Vectors of those of `hashes` that are cached, reading only the row groups that hold them."""
    wanted = list(set(hashes))
    found: dict[str, np.ndarray] = {}
    if not wanted:
        return found
    with pool.connection() as conn, locks.cache_readers(conn, fingerprint):
        by_file: dict[str, list[tuple[str, int]]] = defaultdict(list)
        for content_hash, file_key, row in cache_index.locate(conn, store.url, fingerprint, wanted):
            by_file[file_key].append((content_hash, row))
        for file_key, entries in by_file.items():
            try:
                found.update(_read_rows(store, file_key, entries))
            except FileNotFoundError:
                _forget_if_really_gone(conn, store, fingerprint, file_key, len(entries))
    return found


def _forget_if_really_gone(conn, store: ObjectStore, fingerprint: str, file_key: str, entries: int) -> None:
    """A missing file is forgotten (its vectors get embedded again) only when the rest of the
    cache is there: an unmounted volume or an unreachable bucket fails loudly instead."""
    if not store.list(prefix(fingerprint)):
        raise FileNotFoundError(
            f"the embedding cache {store.uri(prefix(fingerprint))} is empty or unreachable while the catalog "
            f"indexes files in it: is the object store mounted and reachable?"
        )
    log.warning("embedding cache file %s is missing from %s; forgetting its %d entries", file_key, store.url, entries)
    with conn.transaction():
        cache_index.forget_missing_file(conn, store.url, file_key)


def _read_rows(store: ObjectStore, file_key: str, entries: list[tuple[str, int]]) -> dict[str, np.ndarray]:
    """Vectors at these rows of one file, reading only the row groups that hold them."""
    parquet = pq.ParquetFile(store.open_input(file_key))
    starts = np.cumsum([0] + [parquet.metadata.row_group(i).num_rows for i in range(parquet.metadata.num_row_groups)])
    by_group: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for content_hash, row in entries:
        by_group[int(np.searchsorted(starts, row, side="right") - 1)].append((content_hash, row))
    out = {}
    for group, wanted in sorted(by_group.items()):
        table = parquet.read_row_group(group, columns=["content_hash", "embedding"])
        column = table.column("embedding").combine_chunks()
        matrix = column.values.to_numpy(zero_copy_only=False).reshape(-1, column.type.list_size)
        file_hashes = table.column("content_hash").to_pylist()
        for content_hash, row in wanted:
            local = row - int(starts[group])
            if file_hashes[local] != content_hash:  # an index that disagrees with its file is a bug, never a vector
                raise RuntimeError(f"embedding cache index points {content_hash} at {file_key} row {row}, which holds another hash")
            out[content_hash] = matrix[local].copy()
    return out


def compact(pool: ConnectionPool, store: ObjectStore, fingerprint: str, max_files: int = COMPACT_ABOVE_FILES) -> int:
    """Merge small files once a fingerprint has more than `max_files`; returns the files merged.

    Write before delete: merged files are written and the index repointed (one transaction)
    before the old files are retired; retired files are deleted only when no lookup holds the
    fingerprint's reader lock, else by a later compaction.
    """
    merged = 0
    compacting = locks.lock_key("embedding_cache_compact", fingerprint)
    with pool.connection() as conn:
        if not conn.execute("SELECT pg_try_advisory_lock(%s)", (compacting,)).fetchone()[0]:
            return 0  # another run is compacting this cache
        try:
            files = cache_index.live_files(conn, store.url, fingerprint)
            small = [(key, referenced) for key, referenced, rows in files if rows < SMALL_FILE_ROWS or referenced == 0]
            if len(files) > max_files and len(small) > 1:
                merged = _merge(pool, store, fingerprint, small)
            _delete_retired(conn, store, fingerprint)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (compacting,))
    return merged


def _merge(pool, store, fingerprint: str, small: list[tuple[str, int]]) -> int:
    group: list[str] = []
    rows = 0
    done = 0
    for key, referenced in small + [(None, 0)]:
        if key is not None and rows + referenced <= COMPACTED_FILE_ROWS:
            group.append(key)
            rows += referenced
            continue
        if len(group) > 1:
            _merge_group(pool, store, fingerprint, group)
            done += len(group)
        group, rows = ([key], referenced) if key is not None else ([], 0)
    return done


def _merge_group(pool, store, fingerprint: str, keys: list[str]) -> None:
    """Stream the live rows of `keys` into one new file, a source file at a time (memory: one
    file's row groups), then repoint the index and retire the sources in one transaction."""
    with pool.connection() as conn:
        entries = {key: cache_index.entries_of(conn, store.url, key) for key in keys}
    hashes: list[str] = []
    new_key = f"{prefix(fingerprint)}/{time.time_ns():020d}-{uuid.uuid4().hex}.parquet"
    if any(entries.values()):
        with store.open_output(new_key) as out:
            writer, pending = None, []
            for key, rows in list(entries.items()):
                if not rows:
                    continue
                try:
                    vectors = _read_rows(store, key, rows)
                except FileNotFoundError:
                    with pool.connection() as conn:
                        _forget_if_really_gone(conn, store, fingerprint, key, len(rows))
                    entries[key] = []
                    continue
                part_hashes = [h for h, _ in rows]
                matrix = np.vstack([vectors[h] for h in part_hashes])
                pending.append(_arrow_table(part_hashes, matrix))
                hashes += part_hashes
                if sum(t.num_rows for t in pending) >= ROW_GROUP:  # whole row groups, not one per small file
                    writer = writer or pq.ParquetWriter(out, pending[0].schema, compression="zstd", use_dictionary=["content_hash"])
                    writer.write_table(pa.concat_tables(pending), row_group_size=ROW_GROUP)
                    pending = []
            if pending:
                writer = writer or pq.ParquetWriter(out, pending[0].schema, compression="zstd", use_dictionary=["content_hash"])
                writer.write_table(pa.concat_tables(pending), row_group_size=ROW_GROUP)
            if writer is not None:
                writer.close()
        if not hashes:  # every source file had vanished: nothing was written worth keeping
            store.delete(new_key, missing_ok=True)
    with pool.connection() as conn, conn.transaction():
        if hashes:
            size = store.size_of(new_key)
            cache_index.add_file_row(conn, store.url, fingerprint, new_key, len(hashes), size)
            cache_index.repoint(conn, store.url, fingerprint, [(h, new_key, i) for i, h in enumerate(hashes)])
        cache_index.retire(conn, store.url, keys)


def _delete_retired(conn, store: ObjectStore, fingerprint: str) -> int:
    with conn.transaction():
        if not locks.try_exclusive_cache(conn, fingerprint):
            return 0  # a lookup is reading: a later compaction deletes them
        keys = cache_index.retired_files(conn, store.url, fingerprint)
        for key in keys:
            store.delete(key, missing_ok=True)
        cache_index.forget_files(conn, store.url, keys)
    return len(keys)


def adopt_legacy_files(pool: ConnectionPool, store: ObjectStore, model_key: str, fingerprint: str) -> int:
    """Index the files of the first release's layout (`embedding_cache/<model_key>/`), so an
    upgrade re-embeds nothing it had cached. Their vectors came from the model registered under
    that key, which the migration fingerprinted. Returns the files adopted (0 once done)."""
    legacy = f"embedding_cache/{model_key}"
    if legacy == prefix(fingerprint):
        return 0
    keys = [k for k in store.list(legacy) if k.endswith(".parquet")]
    if not keys:
        return 0
    with pool.connection() as conn:
        known = {
            r[0]
            for r in conn.execute(
                "SELECT file_key FROM vector_platform.embedding_cache_files WHERE store = %s AND file_key = ANY(%s)",
                (store.url, keys),
            )
        }
    adopted = 0
    for key in keys:
        if key in known:
            continue
        hashes = pq.read_table(store.open_input(key), columns=["content_hash"]).column("content_hash").to_pylist()
        with pool.connection() as conn, conn.transaction():
            cache_index.add_file(conn, store.url, fingerprint, key, hashes, store.size_of(key))
        adopted += 1
    return adopted


def cached_count(pool: ConnectionPool, store: ObjectStore, fingerprint: str) -> int:
    with pool.connection() as conn:
        return cache_index.count(conn, store.url, fingerprint)
