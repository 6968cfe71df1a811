"""Where things live by default, and each collection's tunable settings.

Environment variables (all optional):
- VP_HOME: folder for the embedded defaults (default ./.vp)
- VP_PG_DSN: a PostgreSQL DSN; when unset the embedded server under $VP_HOME/pg is used
- VP_PG_READ_DSN: the DSNs search reads through (CLI `search`, `Platform.search`, `serve`),
  separated by `;`: streaming replicas and/or a read-only role on the primary (`vector-platform
  db reader-role`), chosen per search by health and lag (`replicas.py`); writes, checks and
  moves keep VP_PG_DSN. Unset: search reads through VP_PG_DSN too
- VP_OBJECT_STORE: file:///path or s3://bucket/prefix (default file://$VP_HOME/objects)
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


def vp_home() -> Path:
    return Path(os.environ.get("VP_HOME", ".vp")).expanduser().resolve()


def read_dsns(value: str | None = None) -> list[str]:
    """The DSNs search reads through: VP_PG_READ_DSN (or `value`), split on `;` (a character
    neither URL nor key=value DSNs use unquoted), [] when unset."""
    value = os.environ.get("VP_PG_READ_DSN") if value is None else value
    return [part.strip() for part in (value or "").split(";") if part.strip()]


def default_object_store_url() -> str:
    return os.environ.get("VP_OBJECT_STORE") or (vp_home() / "objects").as_uri()


@dataclass
class CollectionSettings:
    """Per-collection knobs, stored as JSON in the catalog."""

    chunk_overlap_tokens: int = 32
    # 0 means "the model's max input tokens" (minus its special tokens).
    chunk_max_tokens: int = 0
    hnsw_m: int = 16
    hnsw_ef_construction: int = 64
    hnsw_ef_search: int = 100
    # Binary storage: candidates per result taken from the index of signs, re-ranked at full
    # precision (ef_search is raised to rerank_factor x k for those searches; see
    # search.active.DEFAULT_RERANK_FACTOR for what it buys).
    rerank_factor: int = 30
    # Cold search over an IVF snapshot (one of at least VP_COLD_IVF_MIN_ROWS rows): the lists
    # read per query; 0: 3 % of them, at least 30 (tiers/ivf.py). `--exact` reads them all.
    cold_nprobe: int = 0
    recall_target: float = 0.95
    max_document_bytes: int = 20 * 1024 * 1024
    # An ingest that would soft-delete more than this share of the live documents is refused.
    max_delete_fraction: float = 0.5
    # Model upgrades: a shadow model's nDCG@10 on labelled queries may trail the serving
    # model's by at most this much, and its search p95 may be at most this factor slower
    # (a p95 under upgrade_latency_floor_ms always passes: below it the machine's noise dominates).
    upgrade_ndcg_margin: float = 0.02
    upgrade_latency_factor: float = 2.0
    upgrade_latency_floor_ms: float = 5.0
    # After a swap the previous model's table is kept this long for `models rollback`.
    retain_previous_days: float = 7.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 2 <= self.hnsw_m <= 100:
            raise ValueError(f"hnsw_m must be between 2 and 100, got {self.hnsw_m}")
        if not 4 <= self.hnsw_ef_construction <= 1000 or self.hnsw_ef_construction < 2 * self.hnsw_m:
            raise ValueError(
                f"hnsw_ef_construction must be between 4 and 1000 and at least 2 x hnsw_m, "
                f"got {self.hnsw_ef_construction}"
            )
        if not 1 <= self.hnsw_ef_search <= 1000:
            raise ValueError(f"hnsw_ef_search must be between 1 and 1000, got {self.hnsw_ef_search}")
        if not 0 <= self.cold_nprobe <= 4096:
            raise ValueError(f"cold_nprobe must be between 0 (the default share) and 4096, got {self.cold_nprobe}")
        if not 1 <= self.rerank_factor <= 100:
            raise ValueError(f"rerank_factor must be between 1 and 100, got {self.rerank_factor}")
        if self.chunk_overlap_tokens < 0 or self.chunk_max_tokens < 0:
            raise ValueError("chunk sizes cannot be negative")

    def _check_new_values(self) -> None:
        """Rules added after the first release: checked on every change, not on stored rows
        (a collection saved before them must stay readable; the chunker clamps the overlap)."""
        if self.chunk_max_tokens and self.chunk_overlap_tokens * 2 > self.chunk_max_tokens:
            raise ValueError("chunk_overlap_tokens must be at most half of chunk_max_tokens")
        if not 0.0 <= self.max_delete_fraction <= 1.0:
            raise ValueError(f"max_delete_fraction must be between 0 and 1, got {self.max_delete_fraction}")
        if not 0.0 <= self.recall_target <= 1.0:
            raise ValueError(f"recall_target must be between 0 and 1, got {self.recall_target}")
        if not 0.0 <= self.upgrade_ndcg_margin <= 1.0:
            raise ValueError(f"upgrade_ndcg_margin must be between 0 and 1, got {self.upgrade_ndcg_margin}")
        if self.upgrade_latency_factor < 1.0:
            raise ValueError(f"upgrade_latency_factor must be at least 1, got {self.upgrade_latency_factor}")
        if not 0.0 <= self.upgrade_latency_floor_ms <= 60_000.0:
            raise ValueError(f"upgrade_latency_floor_ms must be between 0 and 60000, got {self.upgrade_latency_floor_ms}")
        if self.retain_previous_days < 0:
            raise ValueError(f"retain_previous_days cannot be negative, got {self.retain_previous_days}")
        if self.max_document_bytes < 1:
            raise ValueError("max_document_bytes must be positive")

    # Settings whose change means every document is chunked again.
    CHUNKING = ("chunk_max_tokens", "chunk_overlap_tokens")

    def changed(self, **changes: Any) -> "CollectionSettings":
        """A copy with only `changes` applied (validated); unknown names are refused."""
        known = {f.name: f for f in fields(self)}
        unknown = sorted(set(changes) - set(known))
        if unknown:
            raise ValueError(f"unknown collection setting(s): {', '.join(unknown)}; known: {', '.join(sorted(set(known) - {'extra'}))}")
        for name, value in changes.items():
            _check_type(name, known[name].type, value)
        result = type(self)(**{**asdict(self), **changes})
        result._check_new_values()
        return result

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> "CollectionSettings":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in known})


def _check_type(name: str, kind: str, value: Any) -> None:
    """A new setting's value has its field's type (a string where a number belongs would reach
    the comparisons of the checks, or the catalog's JSON, as something else)."""
    if kind == "int" and (isinstance(value, bool) or not isinstance(value, int) or abs(value) >= 2**31):
        raise ValueError(f"{name} must be a whole number below 2**31, got {value!r}"[:300])
    if kind == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))
                            or not (isinstance(value, int) or math.isfinite(value)) or abs(value) >= 1e12):
        raise ValueError(f"{name} must be a finite number (below 1e12), got {value!r}"[:300])
    if kind.startswith("dict"):
        from vector_platform.ingest.sources import check_storable

        if not isinstance(value, dict):
            raise ValueError(f"{name} must be an object, got {value!r}"[:300])
        check_storable(value, name)

