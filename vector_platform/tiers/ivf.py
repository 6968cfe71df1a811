"""Cold snapshots larger than memory: rows grouped by a coarse k-means partition (an IVF layout).

A snapshot of at least `min_rows()` rows is written with its rows ordered by list: k-means
centroids (about √rows of them) are trained on a sample of the vectors, every row goes to the
list of its nearest centroid, and each list is one Parquet row group. The centroids are a
file of the snapshot (`centroids.npy`, checked like every file); the manifest's `ivf` entry
says, for each list, its file, its row group, its rows and a sha256 of its chunk ids and
vector bytes. A cold query then reads the centroids, picks the `nprobe` lists nearest to
the query, and reads only those row groups (ranged reads; local disk cache first), scoring
their rows exactly. The hits are exact for the rows read, but rows in lists not probed are
not seen: they are labelled `exact: false`. `--exact` scans every row as before.

Writing needs no more memory than a page of rows and the sample: pages are assigned to
lists and spilled to local Arrow files (sorted by list), then the lists are gathered from
those files (memory-mapped) one at a time.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

log = logging.getLogger(__name__)

# Training: at most this many sample vectors per list, and in all.
SAMPLE_PER_LIST = 40
MAX_SAMPLE = 100_000
ITERATIONS = 12
ASSIGN_BLOCK = 8192


def min_rows() -> int:
    """Snapshots with fewer rows keep the flat layout: scanning them all is already fast."""
    return int(os.environ.get("VP_COLD_IVF_MIN_ROWS", "50000"))


def lists_for(rows: int) -> int:
    """About √rows lists (1,000 for a million rows), between 16 and 4,096."""
    return int(min(4096, max(16, round(math.sqrt(max(rows, 1))))))


def default_nprobe(lists: int) -> int:
    """Lists a query reads by default: 3 % of them, at least 30. Measured on the SciFact
    vectors tiled and perturbed (bench/scale_out.py), recall@10 against a full scan: 1M rows,
    1,000 lists: 0.937 at 16, 0.964 at 30, 0.974 at 50; 200k rows, 447 lists: 0.946 at 16,
    0.957 at 30; the 5,183 SciFact rows in 72 lists: 0.85 at 8, 0.94 at 16, 0.97 at 24."""
    return int(min(lists, max(30, math.ceil(lists * 0.03))))


def _spherical(distance: str) -> bool:
    """Cosine and inner-product vectors are unit length: centroids are kept unit length too,
    and nearness is the dot product."""
    return distance in ("cosine", "inner_product")


def assign(vectors: np.ndarray, centroids: np.ndarray, distance: str) -> np.ndarray:
    """The nearest centroid of every vector (in blocks: memory stays at a block x lists)."""
    out = np.empty(len(vectors), dtype=np.int32)
    c_norms = None if _spherical(distance) else np.einsum("ij,ij->i", centroids, centroids)
    for start in range(0, len(vectors), ASSIGN_BLOCK):
        block = vectors[start:start + ASSIGN_BLOCK]
        products = block @ centroids.T
        if c_norms is None:
            out[start:start + len(block)] = np.argmax(products, axis=1)
        else:  # |v - c|² = |v|² - 2 v·c + |c|²; |v|² is the same for every c
            out[start:start + len(block)] = np.argmin(c_norms[None, :] - 2 * products, axis=1)
    return out


def train(sample: np.ndarray, lists: int, distance: str, seed: int = 0, iterations: int = ITERATIONS) -> np.ndarray:
    """k-means (Lloyd) on `sample`, `lists` centroids, seeded by distinct sample vectors (a
    fixed seed: the same sample gives the same centroids). An emptied list is re-seeded with a
    vector of the largest list."""
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    lists = min(lists, len(sample))
    rng = np.random.default_rng(seed)
    centroids = sample[rng.choice(len(sample), lists, replace=False)].copy()
    for _ in range(iterations):
        labels = assign(sample, centroids, distance)
        counts = np.bincount(labels, minlength=lists)
        order = np.argsort(labels, kind="stable")
        sums = np.zeros_like(centroids)
        filled = counts > 0
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        sums[filled] = np.add.reduceat(sample[order], starts[filled], axis=0)
        centroids[filled] = sums[filled] / counts[filled, None]
        for empty in np.flatnonzero(~filled):
            members = np.flatnonzero(labels == np.argmax(counts))
            centroids[empty] = sample[rng.choice(members)]
        if _spherical(distance):
            norms = np.linalg.norm(centroids, axis=1, keepdims=True)
            centroids /= np.where(norms > 0, norms, 1)
    return centroids


def nearest_lists(centroids: np.ndarray, query: np.ndarray, distance: str, nprobe: int) -> np.ndarray:
    """The `nprobe` lists whose centroids are nearest the query, nearest first."""
    if _spherical(distance):
        score = -(centroids @ query)
    else:
        score = np.einsum("ij,ij->i", centroids, centroids) - 2 * (centroids @ query)
    nprobe = min(nprobe, len(centroids))
    top = np.argpartition(score, nprobe - 1)[:nprobe]
    return top[np.argsort(score[top], kind="stable")]


def list_digest(table: pa.Table) -> str:
    """sha256 of a list's chunk ids and vector bytes: what a ranged read is checked against."""
    digest = hashlib.sha256()
    for chunk_id in table.column("chunk_id").to_pylist():
        digest.update(chunk_id.encode() + b"\n")
    vectors = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    digest.update(np.ascontiguousarray(vectors, dtype="<f4").tobytes())
    return digest.hexdigest()


def vectors_of(table: pa.Table) -> np.ndarray:
    column = table.column("embedding").combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(table), column.type.list_size)


@dataclass
class _Run:
    path: Path
    order: np.ndarray  # row positions of the run, grouped by list
    starts: np.ndarray  # where each list's positions begin in `order` (lists + 1 entries)


class Partitioner:
    """Rows in any order in, the same rows grouped by list out, with bounded memory.

    `add(page)` spills each page to a local Arrow file and keeps a reservoir sample of its
    vectors; `lists()` trains the centroids on the sample, assigns every spilled row, and
    yields (list, rows) one list at a time, gathered from the memory-mapped spill files."""

    def __init__(self, work_dir: Path, distance: str, expected_rows: int, seed: int = 0):
        self.work_dir, self.distance = work_dir, distance
        self.lists_count = lists_for(expected_rows)
        self.sample_size = min(MAX_SAMPLE, SAMPLE_PER_LIST * self.lists_count)
        self.rng = np.random.default_rng(seed)
        self.sample: np.ndarray | None = None
        self.sample_rows = 0
        self.seen = 0
        self.ids: list[np.ndarray] = []  # every chunk id, 36 bytes each: the sorted id hash
        self.runs: list[Path] = []
        shutil.rmtree(work_dir, ignore_errors=True)
        work_dir.mkdir(parents=True)
        self._claim = _claim(work_dir)

    def add(self, page: pa.Table) -> None:
        path = self.work_dir / f"run-{len(self.runs):06d}.arrow"
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, page.schema) as writer:
            writer.write_table(page)
        self.runs.append(path)
        self.ids.append(np.array(page.column("chunk_id").to_pylist(), dtype="S36"))
        vectors = vectors_of(page)
        if self.sample is None:
            self.sample = np.empty((self.sample_size, vectors.shape[1]), np.float32)
        # reservoir sampling (Algorithm R, a page at a time): every row equally likely to stay
        take = min(len(vectors), self.sample_size - self.sample_rows)
        self.sample[self.sample_rows:self.sample_rows + take] = vectors[:take]
        self.sample_rows += take
        if take < len(vectors):
            positions = self.seen + np.arange(take, len(vectors))
            slots = self.rng.integers(0, positions + 1)
            kept = slots < self.sample_size
            self.sample[slots[kept]] = vectors[take:][kept]
        self.seen += len(vectors)

    def id_hash(self) -> str:
        """sha256 over the sorted chunk ids, as snapshots.verify computes it from the files."""
        ids = np.sort(np.concatenate(self.ids)) if self.ids else np.array([], dtype="S36")
        return hashlib.sha256(b"".join(i + b"\n" for i in ids.tolist())).hexdigest()

    def centroids(self) -> np.ndarray:
        if not hasattr(self, "_centroids"):
            sample = self.sample[:self.sample_rows] if self.sample is not None else np.zeros((0, 1), np.float32)
            self._centroids = train(sample, self.lists_count, self.distance) if len(sample) else sample
        return self._centroids

    def lists(self) -> Iterator[tuple[int, pa.Table]]:
        centroids = self.centroids()
        runs: list[tuple[pa.Table, _Run]] = []
        for path in self.runs:
            table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
            labels = assign(vectors_of(table), centroids, self.distance)
            order = np.argsort(labels, kind="stable")
            starts = np.searchsorted(labels[order], np.arange(len(centroids) + 1))
            runs.append((table, _Run(path, order, starts)))
        for list_id in range(len(centroids)):
            pieces = [table.take(pa.array(run.order[run.starts[list_id]:run.starts[list_id + 1]]))
                      for table, run in runs if run.starts[list_id + 1] > run.starts[list_id]]
            yield list_id, (pa.concat_tables(pieces) if pieces else None)

    def close(self) -> None:
        shutil.rmtree(self.work_dir, ignore_errors=True)
        os.close(self._claim)  # the lock goes with the descriptor


# A spill folder is claimed by its writer with an exclusive flock on this file, which the
# kernel releases when the writer's process ends, however it ends. The file is locked before
# it takes its name, so a folder whose lock file is there and free has no writer.
CLAIM = ".writer.lock"
UNCLAIMED_GRACE_S = 3600.0  # a folder without a claim (a writer between mkdir and its claim)


def _claim(work_dir: Path) -> int:
    temporary = work_dir / f"{CLAIM}.{os.getpid()}"
    fd = os.open(temporary, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.replace(temporary, work_dir / CLAIM)
    return fd


def sweep_abandoned(parent: Path) -> list[Path]:
    """Remove the spill folders under `parent` (a folder that holds nothing else) whose writer is gone (a killed snapshot write
    leaves its pages behind); a live writer's folder is left alone. Returns what was removed."""
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    for folder in parent.iterdir():
        if not folder.is_dir():
            continue
        try:
            fd = os.open(folder / CLAIM, os.O_RDWR)
        except FileNotFoundError:
            try:
                old = time.time() - folder.stat().st_mtime > UNCLAIMED_GRACE_S
            except OSError:
                continue
            if old:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a writer holds it
            os.close(fd)
            continue
        try:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
            log.info("removed the spill folder of an interrupted snapshot write: %s", folder)
        finally:
            os.close(fd)
    return removed
