"""SciFact from ../shared/data/scifact, for tests and benchmarks (read there, never copied)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# ../shared sits beside the project root, in every checkout and in CI.
SCIFACT = Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"


def texts_and_vectors(limit: int) -> tuple[list[str], dict[str, np.ndarray]]:
    """The first `limit` abstracts as "title\\n\\ntext" (what the platform embeds), each with its
    precomputed all-MiniLM-L6-v2 vector."""
    ids = json.loads((SCIFACT / "minilm_ids.json").read_text())["corpus_ids"]
    by_id = dict(zip(ids, np.load(SCIFACT / "corpus_minilm.npy")))
    texts, known = [], {}
    with (SCIFACT / "corpus.jsonl").open() as f:
        for line in f:
            doc = json.loads(line)
            text = f"{doc['title']}\n\n{doc['text']}"
            texts.append(text)
            known[text] = by_id[doc["_id"]]
            if len(texts) == limit:
                break
    return texts, known
