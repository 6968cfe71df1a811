"""The platform's embedder resource answering the shared precomputed vectors by text, as the
tests plug in their fake one (vector_platform_tests/conftest.py, FakeEmbedderResource): the
storage path runs for real, only the model is replaced by a lookup."""

from __future__ import annotations

from typing import Sequence

from pydantic import Field

import jobkit
from vector_platform.defs.resources import EmbedderResource
from vector_platform.ingest.embedders import LocalEmbedder
from vector_platform.models import ModelSpec

_lookups: dict[tuple[str, str], jobkit.Lookup] = {}


class LookupEmbedder:
    """The `Embedder` protocol over a `jobkit.Lookup`; chunks with the local model's tokenizer."""

    def __init__(self, spec: ModelSpec, lookup: jobkit.Lookup):
        self.spec = spec
        self.lookup = lookup

    def embed(self, texts: Sequence[str]):
        return list(self.lookup(texts))

    def make_chunker(self, max_tokens: int, overlap: int):
        return LocalEmbedder(self.spec).make_chunker(max_tokens, overlap)

    def batch_size(self, default: int) -> int:
        return default

    def counters(self) -> dict:
        return {}


class LookupEmbedderResource(EmbedderResource):
    lookup_texts: str = Field(description="JSON list of the texts the vectors belong to.")
    lookup_vectors: str = Field(description=".npy of the vectors, one row per text.")

    def for_model(self, spec: ModelSpec):
        key = (self.lookup_texts, self.lookup_vectors)
        if key not in _lookups:
            _lookups[key] = jobkit.Lookup(*key)
        return LookupEmbedder(spec, _lookups[key])
