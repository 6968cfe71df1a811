"""Read a collection's source into documents, turning every bad input into a rejection.

A source is a folder of text / Markdown / HTML files (HTML reduced to text), or a JSONL file
with one object a line: `id`, `text`, optional `title`, `timestamp`, `metadata`.
Nothing raises for one bad document: it comes back as a `Rejection` with the reason, and
the caller dead-letters it while the rest of the source goes through. A record is accepted
only if PostgreSQL can store every part of it (no NUL characters, no unpaired surrogates, no
NaN or infinity in metadata, ids short enough for an index), so the database never sees
input it would refuse. Duplicate ids are found by the caller, in the database, so that
memory does not grow with the source.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

from vector_platform.names import unstorable

TEXT_SUFFIXES = {".txt", ".text", ".md", ".markdown", ".rst"}
# Longer ids would not fit a btree index entry (about 2,700 bytes) once prefixed.
MAX_ID_CHARS = 512
MAX_METADATA_DEPTH = 64


class SourceMissing(FileNotFoundError):
    """The collection's source is not there (deleted, unmounted, not synced yet)."""
HTML_SUFFIXES = {".html", ".htm", ".xhtml"}


@dataclass(frozen=True)
class Document:
    doc_id: str
    body: str
    title: str | None = None
    source_ts: dt.datetime | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    position: int = 0  # line number (JSONL) or file ordinal (folder): where the source had it

    @property
    def content_hash(self) -> str:
        """Hash of what gets chunked and embedded; metadata changes do not re-embed."""
        return hashlib.sha256(f"{self.title or ''}\x00{self.body}".encode()).hexdigest()

    def text_for_chunking(self) -> str:
        # A title given apart from the body belongs to the first chunk, as models are trained.
        return f"{self.title}\n\n{self.body}" if self.title else self.body


@dataclass(frozen=True)
class Rejection:
    ref: str
    error: str
    payload: str | None = None


def read_source(source: str, max_bytes: int) -> Iterator[Document | Rejection]:
    path = Path(source).expanduser()
    if path.is_dir():
        yield from _read_folder(path, max_bytes)
    elif path.is_file() and path.suffix.lower() in (".jsonl", ".ndjson"):
        yield from _read_jsonl(path, max_bytes)
    elif path.is_file():
        raise ValueError(f"source {source!r} is a file but not JSONL (.jsonl/.ndjson); give a folder or a JSONL file")
    else:
        raise SourceMissing(f"source {source!r} does not exist")


def _decode(raw: bytes) -> str:
    """Strict UTF-8 (BOM allowed); binary content is refused with a clear reason."""
    if b"\x00" in raw[:8192]:
        raise ValueError("binary file (NUL bytes), not text")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"not valid UTF-8: {err.reason} at byte {err.start}") from None


def html_to_text(html: str) -> tuple[str, str | None]:
    import html2text

    title = None
    lower = html.lower()
    start, end = lower.find("<title>"), lower.find("</title>")
    if 0 <= start < end:
        title = " ".join(html[start + 7 : end].split()) or None
    converter = html2text.HTML2Text()
    converter.ignore_links = True
    converter.ignore_images = True
    converter.ignore_emphasis = True
    converter.body_width = 0
    return converter.handle(html).strip(), title


def _read_folder(root: Path, max_bytes: int) -> Iterator[Document | Rejection]:
    position = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            file = Path(dirpath) / name
            doc_id = file.relative_to(root).as_posix()
            position += 1
            try:
                storable_name(doc_id)
                size = file.stat().st_size
                if size > max_bytes:
                    yield Rejection(doc_id, f"document too large: {size} bytes > limit {max_bytes}")
                    continue
                raw = file.read_bytes()
                text = _decode(raw)
            except (OSError, ValueError) as err:
                yield Rejection(storable_ref(doc_id), str(err))
                continue
            suffix = file.suffix.lower()
            title = None
            if suffix in HTML_SUFFIXES:
                text, title = html_to_text(text)
            elif suffix not in TEXT_SUFFIXES and not _looks_like_text(text):
                yield Rejection(doc_id, f"unsupported file type {suffix or '(none)'}: content is not text")
                continue
            if not text.strip():
                yield Rejection(doc_id, "empty text")
                continue
            try:
                check_storable(text, "text")
                check_storable(title, "title")
            except ValueError as err:
                yield Rejection(doc_id, str(err))
                continue
            mtime = dt.datetime.fromtimestamp(file.stat().st_mtime, dt.timezone.utc)
            yield Document(doc_id=doc_id, body=text, title=title, source_ts=mtime, metadata={"path": doc_id}, position=position)


def storable_name(doc_id: str) -> None:
    """Refuse a file name that cannot be a document id (the rejection's ref is made storable)."""
    check_storable(doc_id, "file name")
    if len(doc_id) > MAX_ID_CHARS:
        raise ValueError(f"file path is {len(doc_id)} characters long, over the limit of {MAX_ID_CHARS}")


def storable_ref(ref: str) -> str:
    """A ref PostgreSQL can store: undecodable bytes of a file name shown as \\xNN escapes."""
    return ref.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace").replace("\x00", "\\0")


def _looks_like_text(text: str) -> bool:
    sample = text[:4096]
    printable = sum(ch.isprintable() or ch in "\n\r\t" for ch in sample)
    return bool(sample) and printable / len(sample) > 0.95


def _read_jsonl(file: Path, max_bytes: int) -> Iterator[Document | Rejection]:
    with file.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            ref = f"line {lineno}"
            if len(raw) > max_bytes:
                yield Rejection(ref, f"line {lineno}: document too large: {len(raw)} bytes > limit {max_bytes}")
                continue
            try:
                record = json.loads(_decode(raw))
            except RecursionError:
                yield Rejection(ref, f"line {lineno}: JSON nested too deeply", raw[:200].decode("utf-8", "replace"))
                continue
            except ValueError as err:
                yield Rejection(ref, f"line {lineno}: {err}", raw[:200].decode("utf-8", "replace"))
                continue
            doc_id = _readable_id(record)
            try:
                doc = _document_from_record(record)
            except (ValueError, TypeError, OverflowError, OSError) as err:
                # Keyed by the document id when one can be read, so a later good line resolves it.
                yield Rejection(doc_id or ref, f"line {lineno}: {err}", raw[:200].decode("utf-8", "replace"))
                continue
            yield replace(doc, position=lineno)


def _readable_id(record: Any) -> str | None:
    if not isinstance(record, dict):
        return None
    value = record.get("id", record.get("_id"))
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    text = str(value)
    try:
        check_storable(text, "id")
    except ValueError:
        return None
    return text if 0 < len(text) <= MAX_ID_CHARS else None


def check_storable(value: Any, what: str, depth: int = 0) -> None:
    """Raise ValueError if PostgreSQL (text or jsonb) could not store `value`."""
    if value is None or isinstance(value, (bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{what} holds NaN or infinity ({value!r}), which JSON and PostgreSQL jsonb cannot store")
        return
    if isinstance(value, str):
        problem = unstorable(value)
        if problem:
            raise ValueError(f"{what} contains {problem}, which PostgreSQL text cannot store")
        return
    if depth >= MAX_METADATA_DEPTH:
        raise ValueError(f"{what} is nested deeper than {MAX_METADATA_DEPTH} levels")
    if isinstance(value, dict):
        for key, item in value.items():
            check_storable(key, f"{what} key", depth + 1)
            check_storable(item, f"{what}[{key!r}]" if depth < 3 else what, depth + 1)
        return
    if isinstance(value, list):
        for item in value:
            check_storable(item, what, depth + 1)
        return
    raise ValueError(f"{what} holds a {type(value).__name__}, which is not JSON")


def _document_from_record(record: Any) -> Document:
    if not isinstance(record, dict):
        raise ValueError("each line must be a JSON object")
    doc_id = record.get("id", record.get("_id"))
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)) or str(doc_id) == "":
        raise ValueError("missing or invalid 'id' (a non-empty string or integer)")
    check_storable(str(doc_id), "id")
    if len(str(doc_id)) > MAX_ID_CHARS:
        raise ValueError(f"id is {len(str(doc_id))} characters long, over the limit of {MAX_ID_CHARS}")
    text = record.get("text")
    if not isinstance(text, str):
        raise ValueError(f"document {doc_id}: 'text' must be a string")
    if not text.strip():
        raise ValueError(f"document {doc_id}: empty text")
    title = record.get("title")
    if title is not None and not isinstance(title, str):
        raise ValueError(f"document {doc_id}: 'title' must be a string")
    metadata = record.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ValueError(f"document {doc_id}: 'metadata' must be an object")
    check_storable(text, f"document {doc_id}: text")
    check_storable(title, f"document {doc_id}: title")
    check_storable(metadata, f"document {doc_id}: metadata")
    return Document(
        doc_id=str(doc_id),
        body=text,
        title=title.strip() or None if title else None,
        source_ts=_parse_timestamp(record.get("timestamp"), doc_id),
        metadata=metadata,
    )


def _parse_timestamp(value: Any, doc_id: Any) -> dt.datetime | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return dt.datetime.fromtimestamp(value, dt.timezone.utc)
        except (OverflowError, OSError, ValueError):
            raise ValueError(f"document {doc_id}: timestamp {value!r} is out of range for epoch seconds") from None
    if isinstance(value, str):
        try:
            ts = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"document {doc_id}: timestamp {value!r} is not ISO 8601") from None
        return ts if ts.tzinfo else ts.replace(tzinfo=dt.timezone.utc)
    raise ValueError(f"document {doc_id}: timestamp must be ISO 8601 text or epoch seconds")
