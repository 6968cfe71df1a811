"""Token-aware chunking with the model's own tokenizer.

`semantic-text-splitter` splits on paragraph, then sentence, then word boundaries, filling
each chunk up to the model's input limit (minus its special tokens) with some overlap.
Chunk ids are deterministic: collection, document id and chunk text (DESIGN invariant 1).
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from typing import Callable, Sequence

from semantic_text_splitter import TextSplitter
from tokenizers import Tokenizer


@dataclass(frozen=True)
class Chunk:
    chunk_id: uuid.UUID
    seq: int
    text: str
    content_hash: str
    token_count: int


# Unicode White_Space, what the splitter (Rust's `str::trim`) trims from a chunk's ends.
# Python's str.strip() would also take U+001C..U+001F, which the splitter keeps.
WHITE_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def chunk_id(collection: str, doc_id: str, text: str) -> uuid.UUID:
    digest = hashlib.sha256(f"{collection}\x00{doc_id}\x00{text}".encode()).digest()
    return uuid.UUID(bytes=digest[:16])


class Chunker:
    """Splits text into chunks that fit a model's input, counting tokens the model's way.

    Build it from a Hugging Face tokenizer (local models; special tokens are reserved) or from
    a token-counting function (`from_token_counter`: API models counted with their BPE).
    """

    def __init__(self, tokenizer: Tokenizer, max_tokens: int, overlap: int = 32):
        tokenizer = Tokenizer.from_str(tokenizer.to_str())  # private copy: we change its settings
        # Some tokenizer.json files ship with truncation/padding on, which would hide long text.
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self.tokenizer = tokenizer
        specials = len(tokenizer.encode("").ids)
        self._setup(max_tokens - specials, overlap)
        self._splitter = TextSplitter.from_huggingface_tokenizer(tokenizer, capacity=self.capacity, overlap=self.overlap)
        self._count_many = lambda pieces: [len(e.ids) for e in tokenizer.encode_batch(pieces, add_special_tokens=True)]
        self._specials = specials

    @classmethod
    def from_token_counter(cls, count_tokens: Callable[[str], int], max_tokens: int, overlap: int = 32) -> "Chunker":
        chunker = cls.__new__(cls)
        chunker.tokenizer = None
        chunker._setup(max_tokens, overlap)
        chunker._splitter = TextSplitter.from_callback(count_tokens, chunker.capacity, chunker.overlap)
        chunker._count_many = lambda pieces: [count_tokens(p) for p in pieces]
        chunker._specials = 0
        return chunker

    def _setup(self, capacity: int, overlap: int) -> None:
        if capacity < 8:
            raise ValueError(f"a chunk capacity of {capacity} tokens leaves no room for text")
        self.capacity = capacity
        self.overlap = min(overlap, capacity // 2)

    def _fits(self, text: str) -> bool:
        """False when the text cannot be one chunk without counting (at least a token a word)."""
        return len(text.split()) <= self.capacity

    def split(self, collection: str, doc_id: str, text: str) -> list[Chunk]:
        chunks = self.split_many(collection, [(doc_id, text)])[0]
        if isinstance(chunks, Exception):
            raise chunks
        return chunks

    def split_many(self, collection: str, documents: Sequence[tuple[str, str]]) -> list[list[Chunk] | Exception]:
        """`split` of each (doc_id, text), in order; a document that cannot be split gets its
        exception in its place, and the others go on. A text that fits one chunk whole is what
        the splitter would return for it (trimmed); those are counted in one `encode_batch`
        call (in parallel) instead of the splitter's search for boundaries. The others are split
        together (`chunk_all`, in parallel) and their pieces counted in one call."""
        trimmed = [text.strip(WHITE_SPACE) for _, text in documents]
        candidates = [i for i, t in enumerate(trimmed) if self._fits(t)]
        counts = self._counted([trimmed[i] for i in candidates]) or []
        whole = {i: n for i, n in zip(candidates, counts) if n - self._specials <= self.capacity}
        rest = [i for i in range(len(documents)) if i not in whole]
        try:
            split = dict(zip(rest, self._splitter.chunk_all([documents[i][1] for i in rest]))) if rest else {}
        except Exception:  # noqa: BLE001 - a text the splitter refuses: each document on its own below
            split = {}
        pieces = {i: [p for p in split[i] if p.strip()] for i in split}
        flat = [p for i in rest if i in pieces for p in pieces[i]]
        flat_counts = self._counted(flat)
        piece_counts: dict[int, list[int]] = {}
        if flat_counts is not None:
            at = 0
            for i in rest:
                if i in pieces:
                    piece_counts[i] = flat_counts[at:at + len(pieces[i])]
                    at += len(pieces[i])
        out: list[list[Chunk] | Exception] = []
        for i, (doc_id, text) in enumerate(documents):
            try:
                if i in whole:
                    texts, tokens = ([trimmed[i]], [whole[i]]) if trimmed[i].strip() else ([], [])
                else:
                    texts = pieces[i] if i in pieces else [p for p in self._splitter.chunks(text) if p.strip()]
                    tokens = piece_counts[i] if i in piece_counts else (self._count_many(texts) if texts else [])
                out.append(self._chunks(collection, doc_id, texts, tokens))
            except Exception as err:  # noqa: BLE001 - one document's failure is its own
                out.append(err)
        return out

    def _counted(self, texts: list[str]) -> list[int] | None:
        """Token counts of `texts` in one call; None when the counter refuses one of them."""
        if not texts:
            return []
        try:
            return self._count_many(texts)
        except Exception:  # noqa: BLE001 - counted one by one where needed
            return None

    @staticmethod
    def _chunks(collection: str, doc_id: str, pieces: list[str], counts: list[int]) -> list[Chunk]:
        chunks: list[Chunk] = []
        seen: set[uuid.UUID] = set()
        for piece, tokens in zip(pieces, counts):
            cid = chunk_id(collection, doc_id, piece)
            if cid in seen:  # the same passage twice in one document is one vector
                continue
            seen.add(cid)
            chunks.append(Chunk(cid, len(chunks), piece, content_hash(piece), tokens))
        return chunks
