"""The gate at the door: only finite vectors of the right size, non-zero, reach a table.

Cosine and inner-product models are L2-normalised here, so every tier computes the same score.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from vector_platform.ingest.embedders import InputRejected

# Below this norm a vector carries no direction worth comparing.
MIN_NORM = 1e-6
UNIT_TOLERANCE = 1e-3


@dataclass
class GateResult:
    accepted: np.ndarray  # indices into the input that passed
    vectors: np.ndarray  # (len(accepted), dims) float32, normalised when asked
    rejected: list[tuple[int, str]]  # (index, reason)
    # Vectors the gate itself refused, by kind (wrong_dimensions, non_finite, zero_vector,
    # not_numeric): what a model that drifted or broke returns. Inputs the embedder refused
    # are not counted here.
    refused: Counter = field(default_factory=Counter)


def gate(vectors: Sequence[Any] | np.ndarray, dims: int, normalise: bool) -> GateResult:
    accepted: list[int] = []
    rows: list[np.ndarray] = []
    rejected: list[tuple[int, str]] = []
    refused: Counter = Counter()
    for i, raw in enumerate(vectors):
        if isinstance(raw, InputRejected):  # the embedder already refused this input
            rejected.append((i, raw.reason))
            continue
        try:
            vec = np.asarray(raw, dtype=np.float32)
        except (TypeError, ValueError) as err:
            rejected.append((i, f"not a numeric vector: {err}"))
            refused["not_numeric"] += 1
            continue
        if vec.ndim != 1 or vec.shape[0] != dims:
            rejected.append((i, f"wrong dimensions: got {vec.shape[0] if vec.ndim == 1 else vec.shape}, expected {dims}"))
            refused["wrong_dimensions"] += 1
            continue
        finite = np.isfinite(vec)
        if not finite.all():
            bad = int((~finite).sum())
            rejected.append((i, f"non-finite values: {bad} of {dims} components are NaN or inf"))
            refused["non_finite"] += 1
            continue
        norm = float(np.linalg.norm(vec.astype(np.float64)))
        if norm < MIN_NORM:
            rejected.append((i, f"zero vector (norm {norm:.2e})"))
            refused["zero_vector"] += 1
            continue
        accepted.append(i)
        rows.append(vec / norm if normalise else vec)
    matrix = np.vstack(rows).astype(np.float32) if rows else np.zeros((0, dims), np.float32)
    return GateResult(np.asarray(accepted, dtype=np.int64), matrix, rejected, refused)


def check_matrix(matrix: np.ndarray, dims: int, unit: bool) -> list[str]:
    """What is wrong with an already-gated matrix (empty list: nothing). Used by the asset check."""
    problems = []
    if matrix.ndim != 2 or (matrix.size and matrix.shape[1] != dims):
        problems.append(f"shape {matrix.shape}, expected (n, {dims})")
        return problems
    if not np.isfinite(matrix).all():
        problems.append(f"{int((~np.isfinite(matrix)).any(axis=1).sum())} vectors have NaN/inf")
    if unit and matrix.size:
        norms = np.linalg.norm(matrix.astype(np.float64), axis=1)
        off = int((np.abs(norms - 1.0) > UNIT_TOLERANCE).sum())
        if off:
            problems.append(f"{off} vectors are not unit length (cosine model)")
    return problems
