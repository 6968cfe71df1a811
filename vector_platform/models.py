"""The model registry: one `ModelSpec` per embedding model version, identified by a fingerprint.

A model key is the second partition dimension and names one model for ever: the fields that
change what vectors come out (provider, model name, revision, dimensions, distance, storage
type, normalisation, max input tokens, the chunker, and every option not known to be merely
operational) form a fingerprint, stored with the model, on each vector table and as the
embedding cache's key. Registering a key again with another fingerprint is refused.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from vector_platform.names import validate_name

DISTANCES = {"cosine", "l2", "inner_product"}
# How a model's vectors are kept and indexed:
# - vector: 32-bit floats, an HNSW index over them;
# - halfvec: 16-bit floats (half the bytes; scores rounded), an HNSW index over them;
# - binary: 32-bit floats in the table, an HNSW index over their signs (`binary_quantize`,
#   one bit per dimension, hamming distance); a search takes rerank_factor x k candidates from
#   that index and ranks them by the full-precision distance.
STORAGE_TYPES = {"vector", "halfvec", "binary"}
PROVIDERS = {"local", "openai"}

# Bump when chunk boundaries for the same text and settings would change.
CHUNKER_VERSION = "semantic-text-splitter/1"

# Options that change how vectors are fetched, never which vectors come back. Any other
# option (`dimensions`, `revision`, `encoding`, a prompt prefix…) is part of the identity.
OPERATIONAL_OPTIONS = frozenset(
    {
        "base_url", "api_key_env", "encoding_format", "pipeline_batch",
        "max_inputs_per_request", "max_tokens_per_request", "max_tokens_per_input", "max_in_flight",
        "requests_per_minute", "tokens_per_minute", "timeout_s", "backoff_base_s", "backoff_max_s",
        "give_up_after_s", "breaker_window", "breaker_min_requests", "breaker_failure_rate",
        "breaker_cooldown_s", "breaker_max_cooldown_s",
    }
)


# pgvector's HNSW limits: 2,000 dimensions for `vector`, 4,000 for `halfvec`.
MAX_VECTOR_INDEX_DIMS = 2000
MAX_INDEXED_DIMS = 4000


class ModelConflict(ValueError):
    """A model key registered again with a different identity."""


@dataclass(frozen=True)
class ModelSpec:
    key: str
    provider: str
    model_name: str
    dims: int
    distance: str = "cosine"
    storage_type: str = "vector"
    max_tokens: int = 256
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate_name(self.key, "model key")
        if self.provider not in PROVIDERS:
            raise ValueError(f"unknown provider {self.provider!r}; expected one of {sorted(PROVIDERS)}")
        if self.distance not in DISTANCES:
            raise ValueError(f"unknown distance {self.distance!r}; expected one of {sorted(DISTANCES)}")
        if self.storage_type not in STORAGE_TYPES:
            raise ValueError(f"unknown storage type {self.storage_type!r}; expected one of {sorted(STORAGE_TYPES)}")
        if not 1 <= self.dims <= MAX_INDEXED_DIMS:
            raise ValueError(
                f"HNSW indexes take 1..{MAX_INDEXED_DIMS} dimensions (as halfvec; {MAX_VECTOR_INDEX_DIMS} as vector), "
                f"got {self.dims}"
            )
        if self.max_tokens < 8:
            raise ValueError(f"max_tokens must be at least 8, got {self.max_tokens}")

    @property
    def heap_type(self) -> str:
        """The SQL type of the table's `embedding` column: `binary` keeps full-precision vectors
        (the re-rank reads them), the others are their own type."""
        return "vector" if self.storage_type == "binary" else self.storage_type

    @property
    def index_type(self) -> str:
        """The type the HNSW index holds: the storage type (`bit` for binary), except `vector`
        models over pgvector's 2,000-dimension `vector` index limit, indexed as a halfvec
        expression (and searched through the identical cast, or the planner ignores the index)."""
        if self.storage_type == "binary":
            return "bit"
        if self.storage_type == "vector" and self.dims > MAX_VECTOR_INDEX_DIMS:
            return "halfvec"
        return self.storage_type

    @property
    def reranked(self) -> bool:
        """ANN candidates come from a coarser index and are ranked again at full precision."""
        return self.storage_type == "binary"

    @property
    def normalise(self) -> bool:
        """Cosine and inner-product models are stored unit-length (so <=> and <#> agree)."""
        return self.distance in ("cosine", "inner_product")

    @property
    def identity(self) -> dict[str, Any]:
        """Everything that decides which vector a text gets (and how it is compared)."""
        return {
            "provider": self.provider,
            "model_name": self.model_name,
            "revision": self.options.get("revision"),
            "dims": self.dims,
            "distance": self.distance,
            "storage_type": self.storage_type,
            "normalised": self.normalise,
            "max_tokens": self.max_tokens,
            "chunker": CHUNKER_VERSION,
            "options": {k: v for k, v in sorted(self.options.items()) if k not in OPERATIONAL_OPTIONS and k != "revision"},
        }

    @functools.cached_property  # computed once per spec (specs are frozen); search reads it per query
    def fingerprint(self) -> str:
        canonical = json.dumps(self.identity, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @functools.cached_property
    def cache_fingerprint(self) -> str:
        """The embedding cache's key: the fingerprint of the same model stored as `vector`. The
        storage type decides how vectors are kept, not which vectors the model returns, so a
        storage change (`collections set NAME --storage …`) re-uses every cached vector."""
        if self.storage_type == "vector":
            return self.fingerprint
        return replace(self, storage_type="vector").fingerprint

    def with_storage(self, storage_type: str) -> "ModelSpec":
        """The same model stored another way, under its own key (`<key>_<storage>`; back to the
        plain key's `vector` twin by `<key>` without the suffix)."""
        base = self.key
        for suffix in STORAGE_TYPES:
            if base.endswith("_" + suffix):
                base = base[: -len(suffix) - 1]
                break
        key = base if storage_type == "vector" else f"{base}_{storage_type}"
        return replace(self, key=key, storage_type=storage_type)

    def differences(self, other: "ModelSpec") -> list[str]:
        """Identity fields where `other` differs, as 'field: mine -> theirs'."""
        mine, theirs = self.identity, other.identity
        return [f"{k}: {mine[k]!r} -> {theirs[k]!r}" for k in mine if mine[k] != theirs[k]]

    def to_row(self) -> dict[str, Any]:
        return asdict(self)


MINILM = ModelSpec(
    key="minilm_l6_v2",
    provider="local",
    model_name="sentence-transformers/all-MiniLM-L6-v2",
    dims=384,
    distance="cosine",
    storage_type="vector",
    max_tokens=256,
)

BUILTIN_MODELS: dict[str, ModelSpec] = {MINILM.key: MINILM}
DEFAULT_MODEL_KEY = MINILM.key
