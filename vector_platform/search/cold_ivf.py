"""Cold search over IVF snapshots (tiers/ivf.py) without reading them whole.

A query reads the snapshot's centroids (once; kept in memory), picks the `nprobe` nearest
lists, and scores only their rows, exactly as `cold.nearest` scores any rows. A list is read
from the object store by one ranged read of its row group (Parquet's footer says where it
is), checked against the digest the manifest holds for it, then kept on local disk and in an
in-memory LRU, both bounded in bytes (`VP_COLD_MEMORY_BYTES`, `VP_COLD_DISK_BYTES`, as the
whole-snapshot cache). Memory is bounded by those budgets whatever the snapshot's size.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vector_platform.catalog.tiers import SnapshotReceipt
from vector_platform.models import ModelSpec
from vector_platform.object_store import ObjectStore
from vector_platform.search import cold
from vector_platform.settings import vp_home
from vector_platform.tiers import ivf
from vector_platform.tiers.snapshots import SnapshotCorrupt

LIST_FORMAT = 2  # 2: vectors.f32 (vectors, then squared norms); older local copies are read again


@dataclass
class Answer:
    found: list[tuple[float, dict[str, Any]]]  # (distance, row), nearest first
    rows_scanned: int
    lists_read: int
    data_from: str  # memory | local_disk | object_store (the slowest source any list came from)
    every_list: bool = False  # every list was read: the answer is exact


class IvfCache:
    """Centroids and lists of IVF snapshots: lists on local disk and in memory, both bounded."""

    def __init__(self, root: Path | None = None, memory_bytes: int | None = None, disk_bytes: int | None = None):
        self.root = root or vp_home() / "cache" / "cold-lists"
        self.memory_bytes = memory_bytes or int(os.environ.get("VP_COLD_MEMORY_BYTES", str(2**30)))
        self.disk_bytes = disk_bytes or int(os.environ.get("VP_COLD_DISK_BYTES", str(8 * 2**30)))
        self._centroids: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._lists: OrderedDict[tuple[str, str, int], cold.ColdData] = OrderedDict()
        self._memory_used = 0  # bytes of the lists in self._lists
        self._footers: OrderedDict[tuple[str, str], tuple[pq.ParquetFile, threading.Lock]] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[tuple[str, str, int], threading.Lock] = {}
        self._disk_used: int | None = None

    def folder(self, store: ObjectStore, receipt: SnapshotReceipt) -> Path:
        name = hashlib.sha256(f"{store.url}\x00{receipt.prefix}".encode()).hexdigest()[:24]
        return self.root / name

    # ------------------------------------------------------------ centroids

    def centroids(self, store: ObjectStore, receipt: SnapshotReceipt) -> np.ndarray:
        key = (store.url, receipt.prefix)
        with self._lock:
            if key in self._centroids:
                self._centroids.move_to_end(key)
                return self._centroids[key]
        entry = receipt.manifest["ivf"]["centroids"]
        payload = store.get_bytes(entry["key"])
        if hashlib.sha256(payload).hexdigest() != entry["sha256"]:
            raise SnapshotCorrupt(f"snapshot {receipt.id}: {entry['key']} differs from its receipt; never served")
        centroids = np.load(io.BytesIO(payload), allow_pickle=False).astype(np.float32)
        with self._lock:
            self._centroids[key] = centroids
            while len(self._centroids) > 64:
                self._centroids.popitem(last=False)
        return centroids

    # ------------------------------------------------------------ lists

    def list_data(self, store: ObjectStore, receipt: SnapshotReceipt, list_id: int) -> tuple[cold.ColdData | None, str]:
        """One list's rows, ready to score, and where they came from (None: an empty list)."""
        file_index, group, rows, digest = receipt.manifest["ivf"]["directory"][list_id]
        if rows == 0:
            return None, "memory"
        key = (store.url, receipt.prefix, list_id)
        with self._lock:
            data = self._lists.get(key)
            if data is not None:
                self._lists.move_to_end(key)
                return data, "memory"
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:  # one thread reads a list; the others wait for it, then take it from memory
            with self._lock:
                data = self._lists.get(key)
                if data is not None:
                    return data, "memory"
            try:
                return self._fetch(store, receipt, list_id, key, file_index, group, rows, digest)
            finally:
                with self._lock:
                    self._loading.pop(key, None)

    def _fetch(self, store, receipt, list_id, key, file_index, group, rows, digest) -> tuple[cold.ColdData, str]:
        folder = self.folder(store, receipt) / f"list-{list_id:05d}"
        source = "local_disk"
        data = None
        if (folder / "READY").exists():
            try:
                data = self._load_list(folder, store, receipt, list_id, rows)
            except (OSError, ValueError, pa.ArrowException):  # damaged, or an older format: read it again
                shutil.rmtree(folder, ignore_errors=True)
        if data is None:
            table = self._read_group(store, receipt, file_index, group)
            if table.num_rows != rows or ivf.list_digest(table) != digest:
                raise SnapshotCorrupt(f"snapshot {receipt.id}: list {list_id} read back differs from its receipt; never served")
            self._save_list(folder, table)
            data = self._load_list(folder, store, receipt, list_id, rows)
            source = "object_store"
        with contextlib.suppress(OSError):
            os.utime(folder / "READY")
        with self._lock:
            if key not in self._lists:
                self._lists[key] = data
                self._memory_used += data.nbytes
            while self._memory_used > self.memory_bytes and len(self._lists) > 1:
                _, dropped = self._lists.popitem(last=False)
                self._memory_used -= dropped.nbytes
        return data, source

    def _read_group(self, store: ObjectStore, receipt: SnapshotReceipt, file_index: int, group: int) -> pa.Table:
        """One row group by ranged reads: the file's footer once, then the group's columns."""
        file_key = receipt.manifest["files"][file_index]["key"]
        key = (store.url, file_key)
        with self._lock:
            opened = self._footers.get(key)
        if opened is None:
            opened = (pq.ParquetFile(store.fs.open_input_file(store.path(file_key))), threading.Lock())
            with self._lock:
                opened = self._footers.setdefault(key, opened)
                while len(self._footers) > 256:
                    self._footers.popitem(last=False)
        parquet, reading = opened
        with reading:  # one reader per open file at a time
            return parquet.read_row_group(group, columns=cold.ROW_COLUMNS + ["embedding"])

    def _save_list(self, folder: Path, table: pa.Table) -> None:
        """vectors.f32 (the vectors, then their squared norms: one read, no header to parse) and
        rows.arrow, written beside and renamed into place."""
        work = folder.with_name(f"{folder.name}.tmp-{uuid.uuid4().hex}")
        work.mkdir(parents=True)
        try:
            vectors = np.ascontiguousarray(ivf.vectors_of(table), dtype=np.float32)
            with open(work / "vectors.f32", "wb") as out:
                vectors.tofile(out)
                cold.squared_norms(vectors).astype(np.float32).tofile(out)
            rows = pa.Table.from_arrays([table.column(name).combine_chunks() for name in cold.ROW_COLUMNS], schema=cold.ROWS_SCHEMA)
            with pa.OSFile(str(work / "rows.arrow"), "wb") as sink, pa.ipc.new_file(sink, cold.ROWS_SCHEMA) as writer:
                writer.write_table(rows)
            (work / "READY").write_text(json.dumps({"rows": table.num_rows, "format": LIST_FORMAT}))
            written = sum(x.stat().st_size for x in work.iterdir())
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(work, folder)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        # The folder is scanned once, then usage is counted as lists are written: a scan per
        # list written (thousands of folders) cost more than the search itself.
        with self._lock:
            self._disk_used = (self._disk_used + written) if self._disk_used is not None else None
            over = self._disk_used is None or self._disk_used > self.disk_bytes
        if over:
            self._trim_disk(keep=folder)

    def _trim_disk(self, keep: Path) -> None:
        """Delete the least recently used lists beyond the disk budget; count what is left."""
        entries = []
        for ready in self.root.glob("*/list-*/READY"):
            folder = ready.parent
            if ".tmp-" in folder.name:
                continue
            try:
                size = sum(x.stat().st_size for x in folder.iterdir() if x.is_file())
                entries.append((ready.stat().st_mtime, size, folder))
            except OSError:
                continue
        total = sum(size for _, size, _ in entries)
        for _, size, folder in sorted(entries, key=lambda e: e[0]):
            if total <= self.disk_bytes:
                break
            if folder != keep:
                shutil.rmtree(folder, ignore_errors=True)
                total -= size
        with self._lock:
            self._disk_used = total

    def forget(self) -> None:
        with self._lock:
            self._lists.clear()
            self._memory_used = 0
            self._centroids.clear()
            self._footers.clear()


    def _load_list(self, folder: Path, store: ObjectStore, receipt: SnapshotReceipt, list_id: int, rows: int) -> cold.ColdData:
        """A list's vectors and norms into memory by one read. Its rows are mapped when first
        needed (a filter, or a hit to return): most lists a query scores give it no hit."""
        dims = receipt.manifest["dims"]
        flat = np.fromfile(folder / "vectors.f32", dtype=np.float32)
        if flat.size != rows * (dims + 1):
            raise ValueError(f"local copy of a list of snapshot {receipt.id} holds {flat.size} floats, not {rows} rows of {dims}")
        rows_file = folder / "rows.arrow"
        if not rows_file.exists():
            raise ValueError(f"local copy of a list of snapshot {receipt.id} has no rows")

        def open_rows() -> pa.Table:
            try:
                return _map_rows(rows_file)
            except (OSError, pa.ArrowException):  # the local copy was trimmed since: read the list again
                key = (store.url, receipt.prefix, list_id)
                with self._lock:
                    dropped = self._lists.pop(key, None)
                    if dropped is not None:
                        self._memory_used -= dropped.nbytes
                self.list_data(store, receipt, list_id)
                return _map_rows(rows_file)

        return cold.cold_data(receipt.id, flat[: rows * dims].reshape(rows, dims), open_rows, norms2=flat[rows * dims :])


def _map_rows(path: Path) -> pa.Table:
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()


_ORDER = {"memory": 0, "local_disk": 1, "object_store": 2}


def search(
    cache: IvfCache, store: ObjectStore, receipt: SnapshotReceipt, spec: ModelSpec, query: np.ndarray, k: int,
    filters: dict[str, Any] | None, window, nprobe: int,
) -> Answer:
    """The k nearest rows among the `nprobe` lists nearest the query (0: the default share).

    When fewer than k of those lists' rows match (a filter, a time window, small lists), the
    search reads on, `nprobe` next-nearest lists at a time, until k rows match or every list has been
    read (as pgvector's iterative index scans do), so a short answer means the snapshot holds
    no more matches. A step holds at most `nprobe` lists beyond the caches, whatever the
    snapshot's size."""
    layout = receipt.manifest["ivf"]
    centroids = cache.centroids(store, receipt)
    step = min(layout["lists"], nprobe or ivf.default_nprobe(layout["lists"]))
    order = ivf.nearest_lists(centroids, np.asarray(query, np.float32), layout["distance"], layout["lists"])
    timed = any(bound is not None for bound in window)
    best: list[tuple[float, dict[str, Any]]] = []
    scanned, worst, read = 0, "memory", 0
    while read < len(order):
        datas: list[cold.ColdData] = []
        masks: list[np.ndarray | None] = []
        for list_id in order[read : read + step]:
            data, source = cache.list_data(store, receipt, int(list_id))
            if _ORDER[source] > _ORDER[worst]:
                worst = source
            if data is not None:
                datas.append(data)
                masks.append(cold.time_mask(data.rows, *window) if timed else None)
                scanned += data.count
        read += step
        found = cold.nearest_in_many(datas, spec, query, k, filters, masks)
        # Exact distances: the best of each step merge as they are.
        best = sorted(best + [(distance, cold.rows_of(datas[position], [index])[0]) for position, index, distance in found],
                      key=lambda pair: pair[0])[:k]
        if len(best) >= k:
            break
    return Answer(best, scanned, min(read, len(order)), worst, every_list=read >= len(order))
