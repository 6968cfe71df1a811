"""Ranking metrics shared by checks, tests and benchmarks."""

from __future__ import annotations

import math
from typing import Mapping, Sequence


def recall_at_k(found: Sequence, truth: Sequence, k: int = 10) -> float:
    truth_k = list(truth)[:k]
    if not truth_k:
        return 1.0
    return len(set(list(found)[:k]) & set(truth_k)) / len(truth_k)


def ndcg_at_k(ranked: Sequence[str], relevance: Mapping[str, float], k: int = 10) -> float:
    dcg = sum(relevance.get(doc, 0.0) / math.log2(i + 2) for i, doc in enumerate(list(ranked)[:k]))
    ideal = sorted(relevance.values(), reverse=True)[:k]
    idcg = sum(rel / math.log2(i + 2) for i, rel in enumerate(ideal))
    return dcg / idcg if idcg else 0.0


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[index]
