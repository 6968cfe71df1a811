"""Token-aware chunking with the model's own tokenizer.

`semantic-text-splitter` splits on paragraph, then sentence, then word boundaries, filling
each chunk up to the model's input limit (minus its special tokens) with some overlap.
Chunk ids are deterministic: collection, document id and chunk text (DESIGN invariant 1).
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass

from semantic_text_splitter import TextSplitter
from tokenizers import Tokenizer


@dataclass(frozen=True)
class Chunk:
    chunk_id: uuid.UUID
    seq: int
    text: str
    content_hash: str
    token_count: int


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def chunk_id(collection: str, doc_id: str, text: str) -> uuid.UUID:
    digest = hashlib.sha256(f"{collection}\x00{doc_id}\x00{text}".encode()).digest()
    return uuid.UUID(bytes=digest[:16])


class Chunker:
    def __init__(self, tokenizer: Tokenizer, max_tokens: int, overlap: int = 32):
        tokenizer = Tokenizer.from_str(tokenizer.to_str())  # private copy: we change its settings
        # Some tokenizer.json files ship with truncation/padding on, which would hide long text.
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self.tokenizer = tokenizer
        specials = len(tokenizer.encode("").ids)
        self.capacity = max_tokens - specials
        if self.capacity < 8:
            raise ValueError(f"max_tokens {max_tokens} leaves no room for text")
        self.overlap = min(overlap, self.capacity // 2)
        self._splitter = TextSplitter.from_huggingface_tokenizer(tokenizer, capacity=self.capacity, overlap=self.overlap)

    def split(self, collection: str, doc_id: str, text: str) -> list[Chunk]:
        chunks: list[Chunk] = []
        seen: set[uuid.UUID] = set()
        pieces = [p for p in self._splitter.chunks(text) if p.strip()]
        encodings = self.tokenizer.encode_batch(pieces, add_special_tokens=True) if pieces else []
        for piece, encoding in zip(pieces, encodings):
            cid = chunk_id(collection, doc_id, piece)
            if cid in seen:  # the same passage twice in one document is one vector
                continue
            seen.add(cid)
            chunks.append(Chunk(cid, len(chunks), piece, content_hash(piece), len(encoding.ids)))
        return chunks
