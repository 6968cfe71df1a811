"""Reading the row archive: `get` of one archived document, and search over archived vectors.

Both start from the receipts (`archive_files`) and the id index (`archived_documents`, which
file and row group holds each archived document), never from a listing of the store:

- `get_document` looks in Postgres first (live, cold or deleted documents keep their catalog
  row); an archived one is read from its documents file by a ranged read of the one row
  group that holds it (the Parquet footer, then that row group), not the whole file, and
  must hash to the content_hash it was archived with. One the source no longer has says
  `deleted_at`.
- `ArchiveSearch` searches the archived vectors of the serving model by exact brute force,
  as cold search does (`search.cold.nearest`: the same exact scores, so archived hits merge
  with active and cold ones by score). Files are fetched once into a local disk cache,
  named by their sha256 and checked against it on the way down, and loaded into one matrix
  per query kept in an in-memory LRU; a time filter reads only the months it overlaps
  (or masks the whole archive's rows when that is already in memory).

An archived row is answered only while the index says its document is archived in that
file's batch: a document that came back live (changed at the source), or was archived again
later, is never answered from an older file.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from psycopg_pool import ConnectionPool

from vector_platform.models import ModelSpec
from vector_platform.names import validate_name
from vector_platform.object_store import ObjectStore
from vector_platform.search import cold
from vector_platform.settings import vp_home

DOCUMENT_COLUMNS = ("doc_id", "title", "body", "content_hash", "metadata", "source_ts", "first_seen_at", "updated_at")


class ArchiveReadError(RuntimeError):
    """An archive file could not be read, or is not what its receipt says."""


@dataclass(frozen=True)
class ArchiveFile:
    id: int
    job_id: int
    batch: int
    year: int
    month: int
    key: str
    sha256: str
    bytes: int
    rows: int


# ---------------------------------------------------------------- get


def get_document(pool: ConnectionPool, store: ObjectStore | None, collection: str, doc_id: str) -> dict[str, Any] | None:
    """One document by id: from Postgres when it has a catalog row there, else from the row
    archive (one ranged read). None when neither knows it."""
    validate_name(collection)
    if not _storable(doc_id):  # no document can have it (sources refuse such ids): not found
        return None
    with pool.connection() as conn:
        tier = conn.execute("SELECT tier FROM vector_platform.collections WHERE name = %s", (collection,)).fetchone()
        if tier is None:
            raise KeyError(f"unknown collection {collection!r}")
        row = conn.execute(
            "SELECT doc_id, title, body, content_hash, metadata, source_ts, first_seen_at, updated_at, deleted_at, "
            "(SELECT count(*) FROM vector_platform.chunks c WHERE c.collection = d.collection AND c.doc_id = d.doc_id) "
            "FROM vector_platform.documents d WHERE collection = %s AND doc_id = %s",
            (collection, doc_id),
        ).fetchone()
        if row is not None:
            doc = dict(zip(DOCUMENT_COLUMNS, row[:8]))
            doc.update(collection=collection, chunks=row[9], source_tier=tier[0] if row[8] is None else "deleted",
                       deleted_at=row[8])
            return _jsonable(doc)
        found = conn.execute(
            "SELECT a.row_group, a.archived_at, a.content_hash, a.deleted_at, "
            "f.id, f.job_id, f.batch, f.year, f.month, f.key, f.sha256, f.bytes, f.rows "
            "FROM vector_platform.archived_documents a JOIN vector_platform.archive_files f ON f.id = a.file_id "
            "WHERE a.collection = %s AND a.doc_id = %s",
            (collection, doc_id),
        ).fetchone()
    if found is None:
        return None
    if store is None:
        raise ArchiveReadError(f"{collection}/{doc_id} is archived: an object store is needed to read it")
    row_group, archived_at, content_hash, deleted_at, file = found[0], found[1], found[2], found[3], ArchiveFile(*found[4:])
    try:
        with store.open_input(file.key) as src:
            parquet = pq.ParquetFile(src)
            if parquet.metadata.num_rows != file.rows:
                raise ArchiveReadError(f"{file.key} holds {parquet.metadata.num_rows} rows, its receipt says {file.rows}")
            group = parquet.read_row_group(row_group)
    except (OSError, pa.ArrowException) as err:
        raise ArchiveReadError(f"{collection}/{doc_id}: archive file {file.key} could not be read ({err})") from err
    ids = group.column("doc_id").to_pylist()
    if doc_id not in ids:
        raise ArchiveReadError(f"{file.key} row group {row_group} does not hold {doc_id!r}, as the index says it does")
    doc = {name: group.column(name)[ids.index(doc_id)].as_py() for name in DOCUMENT_COLUMNS}
    if hashlib.sha256(f"{doc['title'] or ''}\x00{doc['body']}".encode()).hexdigest() != content_hash:
        raise ArchiveReadError(f"{file.key}: {doc_id!r} does not hash to the content_hash it was archived with; not served")
    doc["metadata"] = json.loads(doc["metadata"]) if doc["metadata"] else {}
    doc.update(collection=collection, source_tier="archive", archived_at=archived_at, deleted_at=deleted_at,
               archive={"uri": store.uri(file.key), "row_group": row_group, "file_sha256": file.sha256})
    return _jsonable(doc)


def _storable(doc_id: Any) -> bool:
    """Whether `doc_id` is text PostgreSQL could hold (no NUL, no unpaired surrogate)."""
    if not isinstance(doc_id, str) or "\x00" in doc_id:
        return False
    try:
        doc_id.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _jsonable(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.isoformat() if isinstance(v, dt.datetime) else v) for k, v in doc.items()}


# ---------------------------------------------------------------- search


@dataclass
class Slice:
    """Archived vectors of one model over some source months, ready to search."""

    data: cold.ColdData
    batches: np.ndarray  # (n,) int64: job_id << 32 | batch, the file each row came from
    doc_ids: list[str]
    nbytes: int


@dataclass
class ArchiveAnswer:
    hits: list[tuple[dict[str, Any], float]]  # (row, distance), best first
    rows_scanned: int = 0
    files: int = 0
    months: int = 0
    months_pruned: int = 0
    data_from: dict[str, int] | None = None
    other_models: dict[str, int] | None = None  # archived rows under models that are not serving


def _batch_tag(job_id: int, batch: int) -> int:
    return (int(job_id) << 32) | int(batch)


class ArchiveSearch:
    """Local disk cache (files by sha256) + in-memory LRU of loaded slices, bounded in bytes.
    Thread-safe."""

    def __init__(self, root: Path | None = None, memory_bytes: int | None = None):
        self.root = root or vp_home() / "cache" / "archive"
        self.memory_bytes = memory_bytes or int(os.environ.get("VP_ARCHIVE_MEMORY_BYTES", str(512 * 2**20)))
        self.disk_bytes = int(os.environ.get("VP_ARCHIVE_DISK_BYTES", str(8 * 2**30)))
        self._memory: OrderedDict[tuple, Slice] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[tuple, threading.Lock] = {}
        self._verified: set[Path] = set()  # local copies whose sha256 this process has checked

    # -- files
    def _local(self, store: ObjectStore, file: ArchiveFile, tally: dict[str, int]) -> Path:
        path = self.root / hashlib.sha1(store.url.encode()).hexdigest()[:12] / f"{file.sha256}.parquet"
        if path.exists() and path.stat().st_size == file.bytes:
            if path in self._verified or hashlib.sha256(path.read_bytes()).hexdigest() == file.sha256:
                self._verified.add(path)
                os.utime(path)  # recency for the disk budget
                tally["local_disk"] = tally.get("local_disk", 0) + 1
                return path
        data = store.get_bytes(file.key)
        if len(data) != file.bytes or hashlib.sha256(data).hexdigest() != file.sha256:
            raise ArchiveReadError(f"{file.key}: {len(data)} bytes that do not match its receipt; not served")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        self._verified.add(path)
        tally["object_store"] = tally.get("object_store", 0) + 1
        self._trim_disk(keep=path)
        return path

    def _trim_disk(self, keep: Path) -> None:
        """Delete the least recently used local copies beyond VP_ARCHIVE_DISK_BYTES."""
        files = []
        for path in self.root.glob("*/*.parquet"):
            try:
                info = path.stat()
            except OSError:  # removed meanwhile by another process
                continue
            files.append((info.st_mtime, info.st_size, path))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self.disk_bytes:
                break
            if path != keep:
                path.unlink(missing_ok=True)
                self._verified.discard(path)
                total -= size

    def _read(self, store: ObjectStore, file: ArchiveFile, tally: dict[str, int]) -> pa.Table:
        """The file's rows; a damaged local copy (right size, unreadable) is fetched again, once."""
        for attempt in (1, 2):
            path = self._local(store, file, tally)
            try:
                table = pq.read_table(path, columns=cold.ROW_COLUMNS + ["embedding"])
            except (OSError, pa.ArrowException):
                if attempt == 2:
                    raise
                path.unlink(missing_ok=True)
                continue
            if table.num_rows != file.rows:
                raise ArchiveReadError(f"{file.key}: {table.num_rows} rows, its receipt says {file.rows}")
            return table
        raise AssertionError("unreachable")

    def cached(self, store: ObjectStore, files: list[ArchiveFile]) -> Slice | None:
        key = (store.url, tuple(f.sha256 for f in files))
        with self._lock:
            found = self._memory.get(key)
            if found is not None:
                self._memory.move_to_end(key)
            return found

    def load(self, store: ObjectStore, dims: int, files: list[ArchiveFile], tally: dict[str, int]) -> Slice:
        """These files' rows as one searchable slice (from memory when already loaded)."""
        found = self.cached(store, files)
        if found is not None:
            tally["memory"] = tally.get("memory", 0) + len(files)
            return found
        key = (store.url, tuple(f.sha256 for f in files))
        with self._lock:
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:  # one thread loads a slice; the others wait for it
            found = self.cached(store, files)
            if found is not None:
                tally["memory"] = tally.get("memory", 0) + len(files)
                return found
            loaded = self._build(store, dims, files, tally)
            with self._lock:
                self._memory[key] = loaded
                total = sum(m.nbytes for m in self._memory.values())
                while total > self.memory_bytes and len(self._memory) > 1:
                    _, dropped = self._memory.popitem(last=False)
                    total -= dropped.nbytes
                self._loading.pop(key, None)
        return loaded

    def _build(self, store: ObjectStore, dims: int, files: list[ArchiveFile], tally: dict[str, int]) -> Slice:
        vectors, rows, batches = [], [], []
        for file in files:
            table = self._read(store, file, tally)
            flat = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
            vectors.append(flat.reshape(table.num_rows, dims).astype(np.float32, copy=False))
            rows.append(table.select(cold.ROW_COLUMNS).cast(cold.ROWS_SCHEMA))
            batches.append(np.full(table.num_rows, _batch_tag(file.job_id, file.batch), dtype=np.int64))
        matrix = np.vstack(vectors) if vectors else np.zeros((0, dims), np.float32)
        table = (pa.concat_tables(rows) if rows else cold.ROWS_SCHEMA.empty_table()).combine_chunks()
        data = cold.cold_data(-1, matrix, table)  # rows in memory, not mapped: counted with the vectors
        nbytes = data.nbytes + table.nbytes
        doc_ids = table.column("doc_id").to_pylist()
        nbytes += sum(len(d) + 50 for d in doc_ids)  # the id list, roughly
        return Slice(data, np.concatenate(batches) if batches else np.zeros(0, np.int64), doc_ids, nbytes)

    def forget(self) -> None:
        with self._lock:
            self._memory.clear()

    # -- search
    def search(
        self, pool: ConnectionPool, store: ObjectStore, collection: str, spec: ModelSpec, fingerprint: str,
        query: np.ndarray, k: int, filters: dict[str, Any] | None = None,
        since: dt.datetime | None = None, until: dt.datetime | None = None,
    ) -> ArchiveAnswer:
        """The k nearest archived rows of `collection` under `spec` (exact), with filters and a
        source-time range [since, until)."""
        with pool.connection() as conn:
            found = conn.execute(
                "SELECT id, job_id, batch, year, month, key, sha256, bytes, rows, model_key, fingerprint "
                "FROM vector_platform.archive_files "
                "WHERE collection = %s AND kind = 'vectors' ORDER BY year, month, id",
                (collection,),
            ).fetchall()
        by_month: dict[tuple[int, int], list[ArchiveFile]] = {}
        other: dict[str, int] = {}
        for row in found:
            file, model_key, file_fingerprint = ArchiveFile(*row[:9]), row[9], row[10]
            if model_key != spec.key or file_fingerprint != fingerprint:
                other[model_key] = other.get(model_key, 0) + file.rows
                continue
            by_month.setdefault((file.year, file.month), []).append(file)
        answer = ArchiveAnswer([], data_from={}, other_models=other or None)
        wanted = {m: files for m, files in by_month.items() if _overlaps(m, since, until)}
        answer.months, answer.months_pruned = len(wanted), len(by_month) - len(wanted)
        answer.files = sum(len(files) for files in wanted.values())
        answer.rows_scanned = sum(f.rows for files in wanted.values() for f in files)
        every = [f for m in sorted(by_month) for f in by_month[m]]
        # One slice per query when it fits the memory budget: every month (a time window masks
        # rows within it), or only a window's months when the whole archive is not in memory.
        # A larger archive is searched in parts of whole months that fit, one after another.
        loaded = self.cached(store, every) if len(wanted) < len(by_month) else None
        if loaded is not None:
            answer.data_from["memory"] = len(every)
            parts = [loaded]
        else:
            parts = self._parts(store, spec.dims, [wanted[m] for m in sorted(wanted)], answer.data_from)
        best: list[tuple[float, int, int, dict[str, Any]]] = []  # (distance, part, row index, row), best first
        for p, part in enumerate(parts):
            if not isinstance(part, Slice):
                part = part()  # loaded now, searched, and left to the LRU
            excluded: set[int] = set()
            window = cold.time_mask(part.data.rows, since, until)
            for _ in range(8):  # stale rows (a document revived, deleted or archived again) are rare
                mask = window
                if excluded:
                    mask = np.ones(part.data.count, bool) if window is None else window.copy()
                    mask[sorted(excluded)] = False
                hits = cold.nearest(part.data, spec, query, k, filters, mask=mask)
                stale = self._stale(pool, collection, part, [i for i, _ in hits])
                if not stale:
                    break
                excluded |= stale
            rows = cold.rows_of(part.data, [i for i, _ in hits if i not in excluded])
            best += [(d, p, i, row) for (i, d), row in zip([h for h in hits if h[0] not in excluded], rows)]
            best = sorted(best, key=lambda f: (f[0], f[1], f[2]))[:k]
        answer.hits = [(row, d) for d, _, _, row in best]
        return answer

    def _parts(self, store: ObjectStore, dims: int, months: list[list[ArchiveFile]], tally: dict[str, int]) -> list:
        """The months to search, as one slice when they fit the memory budget, else as loaders
        of consecutive months that each fit (a month larger than the budget is a part alone)."""
        size = lambda files: sum(f.rows for f in files) * (4 * dims + 200)  # noqa: E731 - vectors, norms, rows, roughly
        every = [f for files in months for f in files]
        if size(every) <= self.memory_bytes:
            return [self.load(store, dims, every, tally)]
        parts, current = [], []
        for files in months:
            if current and size(current + files) > self.memory_bytes:
                parts.append(current)
                current = []
            current = current + files
        if current:
            parts.append(current)
        return [lambda files=files: self.load(store, dims, files, tally) for files in parts]

    @staticmethod
    def _stale(pool: ConnectionPool, collection: str, loaded: Slice, indices: list[int]) -> set[int]:
        """Rows whose document the index no longer places in their file's batch (revived,
        archived again later, or gone from the source)."""
        if not indices:
            return set()
        doc_ids = sorted({loaded.doc_ids[i] for i in indices})
        with pool.connection() as conn:
            current = {
                doc_id: _batch_tag(job_id, batch)
                for doc_id, job_id, batch in conn.execute(
                    "SELECT a.doc_id, f.job_id, f.batch FROM vector_platform.archived_documents a "
                    "JOIN vector_platform.archive_files f ON f.id = a.file_id "
                    "WHERE a.collection = %s AND a.doc_id = ANY(%s) AND a.deleted_at IS NULL",
                    (collection, doc_ids),
                )
            }
        return {i for i in indices if current.get(loaded.doc_ids[i]) != int(loaded.batches[i])}


def _overlaps(month: tuple[int, int], since: dt.datetime | None, until: dt.datetime | None) -> bool:
    """Does source month (year, month), in UTC, overlap [since, until)?"""
    year, mon = month
    start = dt.datetime(year, mon, 1, tzinfo=dt.timezone.utc)
    end = dt.datetime(year + (mon == 12), mon % 12 + 1, 1, tzinfo=dt.timezone.utc)
    if since is not None and _utc(since) >= end:
        return False
    return until is None or _utc(until) > start


def _utc(when: dt.datetime) -> dt.datetime:
    return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)


archive_search = ArchiveSearch()
