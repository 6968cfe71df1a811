"""The cold tier: exact brute-force search over a collection's verified snapshot.

A snapshot is fetched once from the object store (each file checked against its sha256 on
the way down; a mismatch is an error, never served), converted into a local disk cache under
`$VP_HOME/cache/cold` — the vectors as a float32 `.npy` matrix, the rest as an Arrow IPC
file read memory-mapped — and loaded into an in-memory LRU. Both caches are bounded in bytes
(`VP_COLD_MEMORY_BYTES`, default 1 GiB; `VP_COLD_DISK_BYTES`, default 8 GiB).

Every row is ranked by one float32 matrix-vector product; the rows within rounding of the
k-th are then scored exactly as pgvector scores them (float32 products and sums, the cosine
ratio in double precision, L2 from the differences), so a chunk scores the same here as in
its active table and hits of both tiers merge by score. The product runs on one BLAS thread:
concurrent searches on a small machine do better than one search on every core.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import shutil
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from threadpoolctl import ThreadpoolController

from vector_platform.catalog.tiers import SnapshotReceipt
from vector_platform.models import ModelSpec
from vector_platform.object_store import ObjectStore
from vector_platform.search import filters as filter_language
from vector_platform.settings import vp_home
from vector_platform.tiers.snapshots import fetch_verified

ROW_COLUMNS = ["chunk_id", "doc_id", "text", "metadata", "source_ts"]
ROWS_SCHEMA = pa.schema(
    [("chunk_id", pa.string()), ("doc_id", pa.string()), ("text", pa.string()), ("metadata", pa.string()),
     ("source_ts", pa.timestamp("us", tz="UTC"))]
)
CACHE_FORMAT = 2  # 2: rows carry source_ts (time filters); older local copies are fetched again


@dataclass
class ColdData:
    """Rows ready to search: vectors and squared norms in memory, the rest memory-mapped."""

    snapshot_id: int
    vectors: np.ndarray  # (n, dims) float32
    norms2: np.ndarray  # (n,) float32, as pgvector sums them
    inv_norms: np.ndarray  # (n,) float32, 1 / |v| (for the float32 ranking)
    max_norm: float
    # chunk_id, doc_id, text, metadata, source_ts (memory-mapped), or how to open them: an IVF
    # list opens its rows only when a filter or a hit needs them.
    rows_or_opener: pa.Table | Callable[[], pa.Table]
    nbytes: int

    @property
    def count(self) -> int:
        return len(self.vectors)

    @property
    def rows(self) -> pa.Table:
        if callable(self.rows_or_opener):  # two threads may both open it: the same mapped file
            self.rows_or_opener = self.rows_or_opener()
        return self.rows_or_opener


class ColdCache:
    """Local disk cache + in-memory LRU of snapshots, both bounded in bytes. Thread-safe."""

    def __init__(self, root: Path | None = None, memory_bytes: int | None = None, disk_bytes: int | None = None):
        self.root = root or vp_home() / "cache" / "cold"
        self.memory_bytes = memory_bytes or int(os.environ.get("VP_COLD_MEMORY_BYTES", str(2**30)))
        self.disk_bytes = disk_bytes or int(os.environ.get("VP_COLD_DISK_BYTES", str(8 * 2**30)))
        self._memory: OrderedDict[tuple[str, int], ColdData] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[tuple[str, int], threading.Lock] = {}

    def folder(self, store: ObjectStore, receipt: SnapshotReceipt) -> Path:
        """Named by the store and the snapshot's unique prefix: a catalog restored from a
        backup (ids reused) never meets another snapshot's local copy."""
        unique = hashlib.sha1(receipt.prefix.encode()).hexdigest()[:16]
        return self.root / hashlib.sha1(store.url.encode()).hexdigest()[:12] / f"{receipt.id}-{unique}-v{CACHE_FORMAT}"

    def get(self, store: ObjectStore, receipt: SnapshotReceipt) -> tuple[ColdData, str]:
        """(data, where it came from: memory | local_disk | object_store)."""
        key = (store.url, receipt.prefix)
        with self._lock:
            data = self._memory.get(key)
            if data is not None:
                self._memory.move_to_end(key)
                return data, "memory"
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:  # one thread loads a snapshot; the others wait for it
            with self._lock:
                data = self._memory.get(key)
                if data is not None:
                    return data, "memory"
            folder = self.folder(store, receipt)
            source = "local_disk"
            if not (folder / "READY").exists():
                self._materialise(store, receipt, folder)
                source = "object_store"
            try:
                data = _load(folder, receipt)
            except (OSError, ValueError, pa.ArrowException):
                if source == "object_store":
                    raise
                # A damaged local copy (truncated, partly deleted): fetch it again, once.
                shutil.rmtree(folder, ignore_errors=True)
                self._materialise(store, receipt, folder)
                source = "object_store"
                data = _load(folder, receipt)
            with contextlib.suppress(OSError):
                os.utime(folder / "READY")  # recency for the disk LRU
            with self._lock:
                self._memory[key] = data
                self._trim_memory()
                self._loading.pop(key, None)
        return data, source

    def _trim_memory(self) -> None:
        total = sum(d.nbytes for d in self._memory.values())
        while total > self.memory_bytes and len(self._memory) > 1:
            _, dropped = self._memory.popitem(last=False)
            total -= dropped.nbytes

    def forget(self) -> None:
        """Drop every snapshot from memory; the disk cache stays."""
        with self._lock:
            self._memory.clear()

    def _materialise(self, store: ObjectStore, receipt: SnapshotReceipt, folder: Path) -> None:
        """Fetch and verify the snapshot, and convert it into the local format, atomically."""
        work = folder.with_name(f"{folder.name}.tmp-{uuid.uuid4().hex}")
        try:
            paths = fetch_verified(store, receipt, work / "parquet")
            dims = receipt.manifest["dims"]
            vectors = np.lib.format.open_memmap(work / "vectors.npy", mode="w+", dtype=np.float32, shape=(receipt.rows, dims))
            at = 0
            with pa.OSFile(str(work / "rows.arrow"), "wb") as sink, pa.ipc.new_file(sink, ROWS_SCHEMA) as writer:
                for path in paths:
                    for batch in pq.ParquetFile(path).iter_batches(batch_size=8192, columns=ROW_COLUMNS + ["embedding"]):
                        n = batch.num_rows
                        flat = batch.column(len(ROW_COLUMNS)).flatten().to_numpy(zero_copy_only=False)
                        vectors[at : at + n] = flat.reshape(n, dims)
                        writer.write_batch(pa.record_batch(batch.columns[: len(ROW_COLUMNS)], schema=ROWS_SCHEMA))
                        at += n
            if at != receipt.rows:
                raise ValueError(f"snapshot {receipt.id}: {at} rows read, the receipt says {receipt.rows}")
            vectors.flush()
            del vectors
            shutil.rmtree(work / "parquet")
            (work / "READY").write_text(json.dumps({"snapshot_id": receipt.id, "rows": receipt.rows}))
            if folder.exists():
                shutil.rmtree(folder)
            folder.parent.mkdir(parents=True, exist_ok=True)
            os.replace(work, folder)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        self._trim_disk(keep=folder)

    def _trim_disk(self, keep: Path) -> None:
        """Delete the least recently used snapshot folders beyond the disk budget."""
        folders, sizes, used = [], {}, {}
        for ready in self.root.glob("*/*/READY"):
            folder = ready.parent
            if ".tmp-" in folder.name:  # still being written
                continue
            try:
                sizes[folder] = sum(x.stat().st_size for x in folder.iterdir() if x.is_file())
                used[folder] = ready.stat().st_mtime
            except OSError:  # removed meanwhile by another process
                continue
            folders.append(folder)
        total = sum(sizes.values())
        for folder in sorted(folders, key=used.__getitem__):
            if total <= self.disk_bytes:
                break
            if folder == keep:
                continue
            shutil.rmtree(folder, ignore_errors=True)
            total -= sizes[folder]


def _load(folder: Path, receipt: SnapshotReceipt) -> ColdData:
    vectors = np.load(folder / "vectors.npy")  # into memory: searched in full on every query
    if vectors.shape != (receipt.rows, receipt.manifest["dims"]):
        raise ValueError(f"local copy of snapshot {receipt.id} has shape {vectors.shape}")
    rows = pa.ipc.open_file(pa.memory_map(str(folder / "rows.arrow"))).read_all()
    return cold_data(receipt.id, vectors, rows)


def cold_data(
    snapshot_id: int, vectors: np.ndarray, rows: pa.Table | Callable[[], pa.Table], norms2: np.ndarray | None = None,
) -> ColdData:
    """Vectors and their rows, with what the ranking needs of each vector precomputed (the
    squared norms as pgvector sums them, unless given)."""
    if norms2 is None:
        norms2 = squared_norms(vectors)
    with np.errstate(divide="ignore"):
        inv_norms = (1.0 / np.sqrt(norms2.astype(np.float64))).astype(np.float32)
    max_norm = float(np.sqrt(norms2.max())) if len(norms2) else 0.0
    return ColdData(snapshot_id, vectors, norms2, inv_norms, max_norm, rows, vectors.nbytes + norms2.nbytes + inv_norms.nbytes)


def squared_norms(vectors: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", vectors, vectors)


_blas_limited = False
_blas_lock = threading.Lock()


def one_blas_thread() -> None:
    """Put numpy's BLAS on one thread for the rest of the process, once. Changing the count
    per call is not thread-safe (a concurrent search could restore it under another), and
    on a small machine concurrent searches do better with one thread each."""
    global _blas_limited
    with _blas_lock:
        if not _blas_limited:
            ThreadpoolController().limit(limits=1, user_api="blas")
            _blas_limited = True


def _slack(data: ColdData, spec: ModelSpec, q: np.ndarray) -> float:
    """A bound on the float32 ranking's error (products and sums of dims terms), with margin:
    rows within it of the k-th are re-scored exactly."""
    eps = 4 * data.vectors.shape[1] * np.finfo(np.float32).eps
    if spec.distance == "cosine":
        return max(1e-5, 2 * eps)
    scale = float(np.sqrt(q @ q)) * data.max_norm
    if spec.distance == "inner_product":
        return max(1e-5, 2 * eps * scale)
    return max(1e-5, 2 * eps * (data.max_norm**2 + float(q @ q)))  # on squared distances


def _approximate(data: ColdData, spec: ModelSpec, q: np.ndarray) -> np.ndarray:
    """A float32 distance for every row, within float32 rounding of pgvector's (lower is nearer)."""
    one_blas_thread()
    dots = data.vectors @ q
    if spec.distance == "cosine":
        qn = np.float32(1.0 / np.sqrt(np.float64(q @ q)))
        return 1.0 - dots * data.inv_norms * qn
    if spec.distance == "inner_product":
        return -dots
    return data.norms2 - 2 * dots + np.float32(q @ q)  # squared: ranks as the distance does


def exact_distances(data: ColdData, spec: ModelSpec, q: np.ndarray, index: np.ndarray) -> np.ndarray:
    """pgvector's distances for the given rows: float32 products and sums, then as pgvector
    finishes them (cosine: the ratio in double precision, clamped; L2: from the differences)."""
    rows = data.vectors[index]
    if spec.distance == "l2":
        diff = rows - q
        return np.sqrt(np.einsum("ij,ij->i", diff, diff).astype(np.float64))
    dots = rows @ q
    if spec.distance == "inner_product":
        return -dots.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        similarity = dots.astype(np.float64) / np.sqrt(data.norms2[index].astype(np.float64) * float(np.float32(q @ q)))
    return 1.0 - np.clip(similarity, -1.0, 1.0)


def time_mask(rows: pa.Table, since: dt.datetime | None, until: dt.datetime | None) -> np.ndarray | None:
    """Rows whose source timestamp is in [since, until) (None: no time filter). A row without
    a source timestamp matches no time filter, as in SQL."""
    if since is None and until is None:
        return None
    ts = rows.column("source_ts")
    known = ~np.asarray(ts.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    micros = ts.cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False)
    mask = known.copy()
    if since is not None:
        mask &= micros >= _micros(since)
    if until is not None:
        mask &= micros < _micros(until)
    return mask


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def _micros(when: dt.datetime) -> int:
    """Microseconds since the epoch, exactly (a float timestamp can be one off)."""
    return ((when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)) - _EPOCH) // dt.timedelta(microseconds=1)


def nearest(
    data: ColdData, spec: ModelSpec, query: np.ndarray, k: int, filters: dict[str, Any] | None = None,
    mask: np.ndarray | None = None,
) -> list[tuple[int, float]]:
    """The k nearest rows (index, distance), best first; with filters, the k nearest that match;
    with a mask, only rows where it is True.

    Every row is ranked in float32; the rows within the ranking's error bound of the k-th are
    re-scored exactly as pgvector scores them, and the answer is ordered by those distances.
    """
    return [(index, distance) for _, index, distance in nearest_in_many([data], spec, query, k, filters, [mask])]


def nearest_in_many(
    datas: list[ColdData], spec: ModelSpec, query: np.ndarray, k: int, filters: dict[str, Any] | None = None,
    masks: list[np.ndarray | None] | None = None,
) -> list[tuple[int, int, float]]:
    """The k nearest rows of several row sets taken together (an IVF snapshot's lists):
    (position in `datas`, index, distance), best first. Each set is ranked in float32; only
    the rows within the error bound of the k-th of them all are re-scored exactly."""
    q = np.ascontiguousarray(query, dtype=np.float32)
    if spec.storage_type == "halfvec":  # pgvector casts the query to halfvec too
        q = q.astype(np.float16).astype(np.float32)
    found = []  # (position, candidate indices, their float32 distances)
    slack = 0.0
    for position, data in enumerate(datas):
        if data.count:
            candidates, approx, its_slack = _candidates(data, spec, q, k, filters, masks[position] if masks else None)
            found.append((position, candidates, approx))
            slack = max(slack, its_slack)
    if not found:
        return []
    every = np.concatenate([approx for _, _, approx in found])
    if len(every) > k:
        bound = np.partition(every, k - 1)[k - 1] + slack
        found = [(position, candidates[approx <= bound], None) for position, candidates, approx in found]
    scored = []
    for position, candidates, _ in found:
        if len(candidates):
            exact = exact_distances(datas[position], spec, q, candidates)
            scored.extend((float(d), position, int(i)) for d, i in zip(exact, candidates) if np.isfinite(d))
    scored.sort()
    return [(position, index, distance) for distance, position, index in scored[:k]]


def _candidates(
    data: ColdData, spec: ModelSpec, q: np.ndarray, k: int, filters: dict[str, Any] | None, mask: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """The rows of `data` that may be among the k nearest (that match `filters`, where `mask`
    is True): those within the float32 ranking's error bound of the k-th. Returns them, their
    float32 distances and that bound."""
    approx = _approximate(data, spec, q)
    slack = _slack(data, spec, q)
    approx = np.where(np.isnan(approx), np.inf, approx)
    if mask is not None:
        approx = np.where(mask, approx, np.inf)
    if not filters:
        if k < data.count:
            kth = np.partition(approx, k - 1)[k - 1]
            candidates = np.flatnonzero(approx <= kth + slack)
        else:
            candidates = np.arange(data.count)
        if mask is not None:
            candidates = candidates[mask[candidates]]
    else:
        metadata = data.rows.column("metadata")
        matched: list[int] = []
        bound = np.inf
        for i in np.argsort(approx, kind="stable"):
            if approx[i] > bound or not np.isfinite(approx[i]):
                break
            if filter_language.contains(json.loads(metadata[int(i)].as_py()), filters):
                matched.append(int(i))
                if len(matched) == k:
                    bound = approx[i] + slack
        candidates = np.asarray(matched, dtype=np.int64)
    return candidates, approx[candidates], slack


def rows_of(data: ColdData, indices: list[int]) -> list[dict[str, Any]]:
    """chunk_id, doc_id, text and metadata of the given rows, read from the mapped file row by
    row (a `take` over the whole chunked table would copy far more than k rows)."""
    columns = {name: data.rows.column(name) for name in ROW_COLUMNS}
    out = []
    for i in indices:
        row = {name: column[i].as_py() for name, column in columns.items()}
        row["metadata"] = json.loads(row["metadata"])
        out.append(row)
    return out
