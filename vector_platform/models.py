"""The model registry: one `ModelSpec` per embedding model version.

A model key is the second partition dimension. Built-in specs are registered in the
catalog on first use; users add more with `vector-platform models add` or the Python API.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from vector_platform.names import validate_name

DISTANCES = {"cosine", "l2", "inner_product"}
STORAGE_TYPES = {"vector", "halfvec"}
PROVIDERS = {"local", "openai"}


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
        limit = 4000 if self.storage_type == "halfvec" else 2000  # pgvector's HNSW limits
        if not 1 <= self.dims <= limit:
            raise ValueError(f"{self.storage_type} HNSW indexes take 1..{limit} dimensions, got {self.dims}")
        if self.max_tokens < 8:
            raise ValueError(f"max_tokens must be at least 8, got {self.max_tokens}")

    @property
    def normalise(self) -> bool:
        """Cosine and inner-product models are stored unit-length (so <=> and <#> agree)."""
        return self.distance in ("cosine", "inner_product")

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
