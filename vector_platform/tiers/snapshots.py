"""Cold snapshots: a vector table as verified Parquet files plus a manifest on the object store.

Layout: `collections/<collection>/snapshots/<model>/<stamp>-<id>/part-00000.parquet ... manifest.json`.
Rows are zstd-compressed, the float vector column BYTE_STREAM_SPLIT-encoded and never
dictionary-encoded. Two layouts:
- flat (the manifest has no `layout`): rows in chunk_id order (so a restore can resume after
  the last row it loaded), in row groups of about 8 MiB;
- `ivf`, for snapshots of at least `ivf.min_rows()` rows: rows grouped by k-means list, one
  row group per list, the centroids in `centroids.npy` (see ivf.py), so that cold search reads
  only the lists nearest a query; a restore resumes after the rows it already loaded.

A snapshot counts only once it was read back from the store and verified: every file's
sha256 and size, the row count, and a sha256 over the sorted chunk ids against the table's.
Then its receipt is written to the catalog (`catalog.tiers.record_snapshot`). A table whose
digest (rows, ids, content, metadata, times) equals the newest receipt's is not written again.

Nothing here takes locks: callers hold the collection's writer lock.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
from psycopg import sql
from psycopg_pool import ConnectionPool

from vector_platform import catalog, clock, tables
from vector_platform.catalog import tiers as tier_sql
from vector_platform.catalog.tiers import SnapshotReceipt
from vector_platform.models import ModelSpec
from vector_platform.object_store import ObjectStore
from vector_platform.settings import vp_home
from vector_platform.tiers import ivf

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ROW_GROUP_BYTES = 8 * 2**20
READ_CHUNK = 8 * 2**20


def rows_per_file() -> int:
    return int(os.environ.get("VP_SNAPSHOT_ROWS_PER_FILE", "100000"))


class SnapshotError(RuntimeError):
    """A snapshot could not be written, read or verified (the table is left as it was)."""


class SnapshotCorrupt(SnapshotError):
    """A snapshot's bytes on the store differ from its receipt: it is never served."""


def arrow_schema(dims: int) -> pa.Schema:
    return pa.schema(
        [
            ("chunk_id", pa.string()),
            ("doc_id", pa.string()),
            ("seq", pa.int32()),
            ("content_hash", pa.string()),
            ("text", pa.string()),
            ("metadata", pa.string()),  # jsonb's own text form
            ("source_ts", pa.timestamp("us", tz="UTC")),
            ("updated_at", pa.timestamp("us", tz="UTC")),
            ("embedding", pa.list_(pa.float32(), dims)),
        ]
    )


_SELECT = (
    "SELECT chunk_id::text, doc_id, seq, content_hash, text, metadata::text, source_ts, updated_at, embedding "
    "FROM {t} {where} ORDER BY chunk_id LIMIT %(n)s"
)


# One row's share of a table digest; the same expression over a table or over rows in hand.
_ROW_HASH = (
    "hashtextextended(concat_ws('|', chunk_id, doc_id, seq, content_hash, md5(metadata::text), "
    "extract(epoch FROM source_ts), extract(epoch FROM updated_at)), 0)::numeric"
)


def table_digest(conn: psycopg.Connection, table: str) -> tuple[int, str]:
    """(rows, digest) of a vector table: changes when any row is added, removed or rewritten
    (every write of a row sets its updated_at). Order-independent, constant memory."""
    rows, total = conn.execute(
        sql.SQL("SELECT count(*), coalesce(sum(" + _ROW_HASH + "), 0) FROM {}").format(tables.table_id(table))
    ).fetchone()
    return rows, f"{rows}:{total}"


class RowsDigest:
    """`table_digest` of rows that are not in a table (yet): add Arrow pages of snapshot rows,
    read `value` at the end. Postgres computes each page's sum, so the digest is the one the
    table these rows are restored into will have."""

    _QUERY = (
        "SELECT coalesce(sum(" + _ROW_HASH + "), 0) FROM unnest(%s::uuid[], %s::text[], %s::int[], %s::text[], "
        "%s::text[]::jsonb[], %s::timestamptz[], %s::timestamptz[]) "
        "AS r(chunk_id, doc_id, seq, content_hash, metadata, source_ts, updated_at)"
    )

    def __init__(self, pool: ConnectionPool):
        self.pool, self.rows, self.total = pool, 0, 0

    def add(self, page: pa.Table) -> None:
        columns = [page.column(name).to_pylist() for name in ("chunk_id", "doc_id", "seq", "content_hash", "metadata", "source_ts", "updated_at")]
        with self.pool.connection() as conn:
            self.total += int(conn.execute(self._QUERY, columns).fetchone()[0])
        self.rows += page.num_rows

    @property
    def value(self) -> str:
        return f"{self.rows}:{self.total}"


@dataclass
class SnapshotResult:
    receipt: SnapshotReceipt
    written: bool  # False: the table was unchanged and the newest snapshot stands
    seconds: float
    deleted_older: list[int]


def ensure_snapshot(
    pool: ConnectionPool,
    store: ObjectStore,
    collection: str,
    model_key: str,
    say: Callable[[str], None] = lambda _: None,
) -> SnapshotResult:
    """A verified snapshot of the (collection, model) table: the newest one when the table did
    not change since, else a new one (written, read back, verified, receipted). Older
    snapshots of the pair that nothing serves from are deleted after the new receipt."""
    started = time.perf_counter()
    with pool.connection() as conn:
        coll = catalog.get_collection(conn, collection)
        spec = catalog.get_model(conn, model_key)
        table = catalog.vector_table_name(conn, collection, model_key)
        if not tables.table_exists(conn, table):
            raise SnapshotError(f"{collection}/{model_key} has no vector table to snapshot")
        rows, digest = table_digest(conn, table)
        latest = tier_sql.latest_snapshot(conn, collection, model_key)
        fingerprint = catalog.table_fingerprint(conn, collection, model_key)
    if latest and latest.table_digest == digest and latest.manifest.get("fingerprint") == fingerprint:
        verify_present(store, latest)
        say(f"{collection}/{model_key}: the table is unchanged since snapshot {latest.id}; not written again")
        return SnapshotResult(latest, False, time.perf_counter() - started, [])
    manifest = new_manifest(coll, spec, table, fingerprint)
    manifest["table_digest"] = digest
    receipt = publish(pool, store, manifest, _table_pages(pool, table, _group_rows(spec)), spec, expected_rows=rows,
                      ivf_work_dir=spill_dir(manifest) if rows >= ivf.min_rows() else None)
    say(f"{collection}/{model_key}: snapshot {receipt.id} written and verified ({rows} rows, {receipt.bytes} bytes)")
    deleted = delete_replaced(pool, store, collection, model_key, keep=receipt.id)
    return SnapshotResult(receipt, True, time.perf_counter() - started, deleted)


def spill_dir(manifest: dict[str, Any]) -> Path:
    """Where an IVF snapshot's pages are spilled while it is written (removed after). The
    folders of writes that were killed are removed first."""
    root = vp_home() / "cache" / "snapshot-spill"
    ivf.sweep_abandoned(root)
    return root / manifest["prefix"].replace("/", "_")


def new_manifest(coll: catalog.Collection, spec: ModelSpec, table: str, fingerprint: str) -> dict[str, Any]:
    """The manifest of a snapshot about to be written (rows, files and digest are added later)."""
    created = clock.now()
    prefix = f"collections/{coll.name}/snapshots/{spec.key}/{created:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:12]}"
    return {
        "format_version": FORMAT_VERSION,
        "collection": coll.name,
        "model_key": spec.key,
        "fingerprint": fingerprint,
        "dims": spec.dims,
        "distance": spec.distance,
        "storage_type": spec.storage_type,
        "hnsw": {"m": coll.settings.hnsw_m, "ef_construction": coll.settings.hnsw_ef_construction},
        "table": table,
        "created_at": created.isoformat(),
        "prefix": prefix,
    }


def publish(
    pool: ConnectionPool,
    store: ObjectStore,
    manifest: dict[str, Any],
    pages: Iterator[pa.Table],
    spec: ModelSpec,
    expected_rows: int | None = None,
    finish: Callable[[dict[str, Any]], None] | None = None,
    ivf_work_dir: Path | None = None,
    ivf_rows: int | None = None,
) -> SnapshotReceipt:
    """Write `pages` (snapshot rows in chunk_id order) under the manifest's prefix, then the
    manifest, read everything back and verify it, and only then write the receipt. `finish`
    sees the manifest once every page is written (rows, id_hash and files set): it may add to
    it (e.g. the digest of rows that were never in a table) or raise to refuse the snapshot.
    `ivf_work_dir`: write the IVF layout (ivf.py; pages in any order), spilling there, with
    lists for `ivf_rows` rows (default `expected_rows`).
    On any failure the files are removed (no receipt: they never counted) and the error is raised."""
    prefix = manifest["prefix"]
    try:
        if ivf_work_dir is not None:
            files, id_hash, written_rows, layout = _write_ivf_files(store, pages, spec, prefix, ivf_work_dir,
                                                                    ivf_rows or expected_rows or 0)
            manifest.update(layout="ivf", ivf=layout)
        else:
            files, id_hash, written_rows = _write_files(store, pages, spec, prefix)
        if expected_rows is not None and written_rows != expected_rows:
            raise SnapshotError(f"the table changed while it was written ({expected_rows} rows counted, {written_rows} written)")
        manifest.update(rows=written_rows, id_hash=id_hash, files=files)
        if finish is not None:
            finish(manifest)
        text = tier_sql.manifest_text(manifest)
        store.put_bytes(f"{prefix}/manifest.json", text)
        verify(store, manifest, expected_rows=written_rows, expected_id_hash=id_hash)
    except Exception:
        try:
            _remove_prefix(store, prefix)  # no receipt was written: these files never counted
        except OSError as cleanup:
            # The store itself is down (the usual reason the write failed): the files stay
            # without a receipt, which nothing reads, and the error raised is the write's,
            # not the clean-up's.
            log.warning("could not remove the unreceipted files under %s: %s", prefix, cleanup)
        raise
    with pool.connection() as conn, conn.transaction():
        return tier_sql.record_snapshot(conn, manifest, store.uri(prefix), hashlib.sha256(text).hexdigest())


def _group_rows(spec: ModelSpec) -> int:
    return max(1024, ROW_GROUP_BYTES // (spec.dims * 4))


def write_table_files(
    pool: ConnectionPool, store: ObjectStore, table: str, spec: ModelSpec, prefix: str
) -> tuple[list[dict[str, Any]], str, int]:
    """A vector table's rows as snapshot files under `prefix`, with no manifest and no receipt:
    for a caller that keeps its own manifest (a backup). Returns (files, id_hash, rows)."""
    return _write_files(store, _table_pages(pool, table, _group_rows(spec)), spec, prefix)


def _parquet_writer(sink, schema: pa.Schema) -> pq.ParquetWriter:
    return pq.ParquetWriter(
        sink,
        schema,
        compression="zstd",
        use_dictionary=["chunk_id", "doc_id", "content_hash", "metadata"],
        use_byte_stream_split=["embedding.list.element"],
        write_statistics=["chunk_id", "doc_id", "seq", "source_ts"],
    )


def _write_ivf_files(
    store: ObjectStore, pages: Iterator[pa.Table], spec: ModelSpec, prefix: str, work_dir: Path, expected_rows: int,
) -> tuple[list[dict[str, Any]], str, int, dict[str, Any]]:
    """The IVF layout (see ivf.py): pages spilled and sampled, centroids trained, then one row
    group per list, lists in order, files of about rows_per_file() rows. Returns (files,
    id_hash, rows, the manifest's `ivf` entry)."""
    partitioner = ivf.Partitioner(work_dir, spec.distance, expected_rows)
    try:
        for page in pages:
            partitioner.add(page)
        centroids = partitioner.centroids()
        buffer = io.BytesIO()
        np.save(buffer, centroids.astype("<f4"), allow_pickle=False)
        payload = buffer.getvalue()
        centroids_key = f"{prefix}/centroids.npy"
        store.put_bytes(centroids_key, payload)
        schema = arrow_schema(spec.dims)
        per_file = rows_per_file()
        files: list[dict[str, Any]] = []
        directory: list[list[Any]] = []
        total = 0
        lists = partitioner.lists()
        pending = next(lists, None)
        while pending is not None:
            key = f"{prefix}/part-{len(files):05d}.parquet"
            digest = hashlib.sha256()
            in_file, groups = 0, 0
            with store.open_output(key) as raw:
                sink = HashingSink(raw, digest)
                with _parquet_writer(sink, schema) as writer:
                    while pending is not None and (in_file < per_file or groups == 0):
                        list_id, table = pending
                        if table is None or table.num_rows == 0:
                            directory.append([-1, -1, 0, ""])
                        else:
                            writer.write_table(table, row_group_size=table.num_rows)  # the list is one row group
                            directory.append([len(files), groups, table.num_rows, ivf.list_digest(table)])
                            groups += 1
                            in_file += table.num_rows
                        pending = next(lists, None)
            files.append({"key": key, "rows": in_file, "bytes": sink.size, "sha256": digest.hexdigest()})
            total += in_file
        layout = {
            "lists": len(centroids),
            "distance": spec.distance,
            "trained_on": partitioner.sample_rows,
            "centroids": {"key": centroids_key, "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()},
            "directory": directory,  # per list: [file index, row group, rows, sha256 of its ids and vectors]
        }
        return files, partitioner.id_hash(), total, layout
    finally:
        partitioner.close()


def _write_files(
    store: ObjectStore, pages: Iterator[pa.Table], spec: ModelSpec, prefix: str
) -> tuple[list[dict[str, Any]], str, int]:
    schema = arrow_schema(spec.dims)
    group_rows = _group_rows(spec)
    per_file = max(group_rows, rows_per_file())
    ids = hashlib.sha256()
    files: list[dict[str, Any]] = []
    total = 0
    page = next(pages, None)
    while page is not None or not files:
        key = f"{prefix}/part-{len(files):05d}.parquet"
        digest = hashlib.sha256()
        in_file = 0
        with store.open_output(key) as raw:
            sink = HashingSink(raw, digest)
            with _parquet_writer(sink, schema) as writer:
                while page is not None and in_file < per_file:
                    for chunk_id in page.column("chunk_id").to_pylist():
                        ids.update(chunk_id.encode() + b"\n")
                    writer.write_table(page, row_group_size=group_rows)
                    in_file += page.num_rows
                    page = next(pages, None)
        files.append({"key": key, "rows": in_file, "bytes": sink.size, "sha256": digest.hexdigest()})
        total += in_file
    return files, ids.hexdigest(), total


class HashingSink:
    """A write-only file object that hashes and counts what passes through to `raw`."""

    def __init__(self, raw, digest):
        self.raw, self.digest, self.size, self.closed = raw, digest, 0, False

    def write(self, data) -> int:
        data = bytes(data)
        self.digest.update(data)
        self.size += len(data)
        self.raw.write(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False


def _table_pages(pool: ConnectionPool, table: str, page_rows: int) -> Iterator[pa.Table]:
    """The table in chunk_id order, one Arrow table per page (keyset pagination)."""
    first = sql.SQL(_SELECT).format(t=tables.table_id(table), where=sql.SQL(""))
    rest = sql.SQL(_SELECT).format(t=tables.table_id(table), where=sql.SQL("WHERE chunk_id > %(after)s::uuid"))
    after = None
    while True:
        with pool.connection() as conn, conn.cursor(binary=True) as cur:
            cur.execute(first if after is None else rest, {"after": after, "n": page_rows})
            rows = cur.fetchall()
        if not rows:
            return
        yield _to_arrow(rows)
        after = rows[-1][0]
        if len(rows) < page_rows:
            return


def rows_by_chunk_ids(conn: psycopg.Connection, table: str, dims: int, chunk_ids: list) -> pa.Table:
    """The table's rows of these chunks, in chunk_id order, with the snapshot's columns."""
    query = sql.SQL(_SELECT).format(t=tables.table_id(table), where=sql.SQL("WHERE chunk_id = ANY(%(ids)s::uuid[])"))
    with conn.cursor(binary=True) as cur:
        cur.execute(query, {"ids": [str(c) for c in chunk_ids], "n": max(1, len(chunk_ids))})
        rows = cur.fetchall()
    return _to_arrow(rows) if rows else arrow_schema(dims).empty_table()


def _to_arrow(rows: list[tuple]) -> pa.Table:
    vectors = [row[8].to_numpy() if hasattr(row[8], "to_numpy") else np.asarray(row[8]) for row in rows]
    matrix = np.vstack(vectors).astype(np.float32, copy=False)
    dims = matrix.shape[1]
    columns = list(zip(*(row[:8] for row in rows)))
    schema = arrow_schema(dims)
    arrays = [pa.array(values, type=schema.field(i).type) for i, values in enumerate(columns)]
    arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), dims))
    return pa.Table.from_arrays(arrays, schema=schema)


# ---------------------------------------------------------------- verification


def sha256_of(store: ObjectStore, key: str) -> tuple[str, int]:
    """(sha256, bytes) of an object, streamed."""
    digest = hashlib.sha256()
    size = 0
    with store.fs.open_input_stream(store.path(key)) as src:
        while True:
            block = src.read(READ_CHUNK)
            if not block:
                break
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def verify(store: ObjectStore, manifest: dict[str, Any], expected_rows: int, expected_id_hash: str) -> None:
    """Read the snapshot back from the store: every file's bytes, rows and chunk ids, and the
    manifest itself, must be what was written. Raises SnapshotCorrupt otherwise."""
    stored = store.get_bytes(f"{manifest['prefix']}/manifest.json")
    if stored != tier_sql.manifest_text(manifest):
        raise SnapshotCorrupt(f"the manifest of {manifest['prefix']} read back differs from the one written")
    ids = []
    rows = 0
    for entry in manifest["files"]:
        sha, size = sha256_of(store, entry["key"])
        if (sha, size) != (entry["sha256"], entry["bytes"]):
            raise SnapshotCorrupt(f"{entry['key']}: read back {size} bytes with sha256 {sha[:12]}…, wrote {entry['bytes']} ({entry['sha256'][:12]}…)")
        with store.open_input(entry["key"]) as f:
            parquet = pq.ParquetFile(f)
            if parquet.metadata.num_rows != entry["rows"]:
                raise SnapshotCorrupt(f"{entry['key']}: {parquet.metadata.num_rows} rows, the manifest says {entry['rows']}")
            ids += parquet.read(columns=["chunk_id"]).column("chunk_id").to_pylist()
        rows += entry["rows"]
    if rows != expected_rows:
        raise SnapshotCorrupt(f"{manifest['prefix']}: {rows} rows read back, the table has {expected_rows}")
    if manifest.get("layout") == "ivf":
        centroids = manifest["ivf"]["centroids"]
        sha, size = sha256_of(store, centroids["key"])
        if (sha, size) != (centroids["sha256"], centroids["bytes"]):
            raise SnapshotCorrupt(f"{centroids['key']}: read back {size} bytes with sha256 {sha[:12]}…, wrote {centroids['bytes']}")
        listed = sum(entry[2] for entry in manifest["ivf"]["directory"])
        if listed != rows:
            raise SnapshotCorrupt(f"{manifest['prefix']}: its lists hold {listed} rows, its files {rows}")
    ids.sort()
    if hashlib.sha256(b"".join(i.encode() + b"\n" for i in ids)).hexdigest() != expected_id_hash:
        raise SnapshotCorrupt(f"{manifest['prefix']}: the chunk ids read back differ from the table's")


def verify_present(store: ObjectStore, receipt: SnapshotReceipt) -> None:
    """A cheap check that a receipt's files still exist with their sizes (no download)."""
    extra = [receipt.manifest["ivf"]["centroids"]] if receipt.manifest.get("layout") == "ivf" else []
    for entry in receipt.manifest["files"] + extra:
        try:
            size = store.size_of(entry["key"])
        except (FileNotFoundError, OSError) as err:
            raise SnapshotCorrupt(f"snapshot {receipt.id}: {entry['key']} is missing from the store ({err})") from None
        if size != entry["bytes"]:
            raise SnapshotCorrupt(f"snapshot {receipt.id}: {entry['key']} has {size} bytes, the receipt says {entry['bytes']}")


def verify_receipt(store: ObjectStore, receipt: SnapshotReceipt) -> None:
    """Full read-back of a receipted snapshot (before anything is dropped on its word)."""
    verify(store, receipt.manifest, receipt.rows, receipt.manifest["id_hash"])


# ---------------------------------------------------------------- reading back


def fetch_verified(store: ObjectStore, receipt: SnapshotReceipt, local_dir: Path) -> list[Path]:
    """The snapshot's files in a local folder, each checked against its sha256 on the way down.
    Files already fetched and checked (a `.ok` marker beside them) are not fetched again."""
    local_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for entry in receipt.manifest["files"]:
        target = local_dir / Path(entry["key"]).name
        marker = target.with_suffix(".ok")
        if not (marker.exists() and target.exists() and target.stat().st_size == entry["bytes"]):
            tmp = target.with_suffix(f".tmp-{uuid.uuid4().hex}")
            digest = hashlib.sha256()
            try:
                with open(tmp, "wb") as out:
                    for block in _blocks(store, receipt, entry["key"]):
                        digest.update(block)
                        out.write(block)
                if digest.hexdigest() != entry["sha256"]:
                    raise SnapshotCorrupt(
                        f"snapshot {receipt.id}: {entry['key']} does not match its checksum (sha256 {digest.hexdigest()[:12]}…, "
                        f"receipt {entry['sha256'][:12]}…)"
                    )
                os.replace(tmp, target)
                marker.write_text(entry["sha256"])
            finally:
                if tmp.exists():
                    tmp.unlink()
        paths.append(target)
    return paths


def _blocks(store: ObjectStore, receipt: SnapshotReceipt, key: str) -> Iterator[bytes]:
    """An object's bytes, streamed; a store that fails says which snapshot and file it was
    reading (its own text names neither)."""
    try:
        with store.fs.open_input_stream(store.path(key)) as src:
            while True:
                block = src.read(READ_CHUNK)
                if not block:
                    return
                yield block
    except OSError as err:
        raise SnapshotError(
            f"snapshot {receipt.id}: reading {key} from the object store failed ({err}); the collection keeps its tier"
        ) from err


def rows_of_batch(batch: pa.RecordBatch) -> tuple[list[tuple], np.ndarray, list]:
    """(rows in `tables.ROW_COLUMNS` order, vectors, updated_at) of a batch of snapshot rows:
    what `tables.copy_restored_rows` loads."""
    data = batch.to_pydict()
    rows = [
        (uuid.UUID(c), d, s, h, t, m, ts)
        for c, d, s, h, t, m, ts in zip(
            data["chunk_id"], data["doc_id"], data["seq"], data["content_hash"], data["text"], data["metadata"], data["source_ts"]
        )
    ]
    column = batch.column("embedding")
    vectors = column.flatten().to_numpy(zero_copy_only=False).reshape(len(rows), column.type.list_size)
    return rows, vectors, data["updated_at"]


def read_batches(paths: list[Path], after: str | None = None, batch_rows: int = 5000, skip_rows: int = 0) -> Iterator[pa.RecordBatch]:
    """Rows of fetched snapshot files in file order (chunk_id order in the flat layout),
    skipping ids <= `after` (a resume of a flat snapshot) or the first `skip_rows` rows (a
    resume of an IVF snapshot, whose rows are in list order)."""
    for path in paths:
        if skip_rows:
            rows_in_file = pq.ParquetFile(path).metadata.num_rows
            if skip_rows >= rows_in_file:
                skip_rows -= rows_in_file
                continue
        parquet = pq.ParquetFile(path)
        if after is not None:
            stats = parquet.metadata.row_group(parquet.num_row_groups - 1).column(0).statistics if parquet.num_row_groups else None
            if stats is not None and stats.has_min_max and stats.max <= after:
                continue
        for batch in parquet.iter_batches(batch_size=batch_rows):
            if skip_rows:
                if skip_rows >= batch.num_rows:
                    skip_rows -= batch.num_rows
                    continue
                batch, skip_rows = batch.slice(skip_rows), 0
            if after is not None:
                ids = batch.column(0).to_pylist()
                start = next((i for i, value in enumerate(ids) if value > after), len(ids))
                if start == len(ids):
                    continue
                batch = batch.slice(start)
            yield batch


# ---------------------------------------------------------------- deletion


def _remove_prefix(store: ObjectStore, prefix: str) -> None:
    for key in store.list(prefix):
        store.delete(key, missing_ok=True)


def delete_snapshot(pool: ConnectionPool, store: ObjectStore, receipt: SnapshotReceipt) -> None:
    """Delete a snapshot's files, then mark its receipt deleted. Refused while a cold
    collection is served from it."""
    with pool.connection() as conn:
        if tier_sql.snapshot_in_use(conn, receipt.id):
            raise SnapshotError(f"snapshot {receipt.id} serves cold collection {receipt.collection!r}; not deleted")
    _remove_prefix(store, receipt.prefix)
    with pool.connection() as conn:
        tier_sql.mark_snapshot_deleted(conn, receipt.id)


def delete_replaced(pool: ConnectionPool, store: ObjectStore, collection: str, model_key: str, keep: int) -> list[int]:
    """Delete the pair's older snapshots that nothing serves from; returns their ids."""
    with pool.connection() as conn:
        older = [r for r in tier_sql.live_snapshots(conn, collection, model_key) if r.id != keep]
        older = [r for r in older if not tier_sql.snapshot_in_use(conn, r.id)]
    for receipt in older:
        delete_snapshot(pool, store, receipt)
    return [r.id for r in older]


def clear_local(local_dir: Path) -> None:
    shutil.rmtree(local_dir, ignore_errors=True)


__all__ = [
    "HashingSink", "RowsDigest", "SnapshotCorrupt", "SnapshotError", "SnapshotResult", "arrow_schema", "rows_of_batch", "delete_snapshot",
    "ensure_snapshot", "fetch_verified", "new_manifest", "publish", "read_batches", "sha256_of", "table_digest", "verify",
    "verify_receipt", "write_table_files",
]
