"""Merging ranked lists from several collections.

Scores are comparable only between vectors of the same model fingerprint (same model, same
distance): then hits merge by score. Otherwise they merge by reciprocal rank fusion, which
needs nothing but each list's order (Cormack, Clarke & Büttcher, SIGIR 2009; k = 60).
"""

from __future__ import annotations

from typing import Sequence, TypeVar

T = TypeVar("T")
RRF_K = 60


def by_score(lists: Sequence[Sequence[T]], score, k: int) -> list[T]:
    merged = [hit for hits in lists for hit in hits]
    merged.sort(key=score, reverse=True)
    return merged[:k]


def reciprocal_rank_fusion(lists: Sequence[Sequence[T]], k: int, rrf_k: int = RRF_K) -> list[tuple[float, T]]:
    """(fused score, hit) best first; each list must be ordered best first and hold distinct hits."""
    fused = [(1.0 / (rrf_k + rank), i, rank, hit) for i, hits in enumerate(lists) for rank, hit in enumerate(hits, start=1)]
    # Ties (the same rank in two lists) break by rank, then by list order: stable and explainable.
    fused.sort(key=lambda item: (-item[0], item[2], item[1]))
    return [(score, hit) for score, _, _, hit in fused[:k]]
