"""PostgreSQL binary COPY encoding for vector rows, built in bulk.

psycopg's `write_row` encodes field by field in Python; here the vector column is converted
for the whole batch at once by numpy (big-endian float32 behind pgvector's 4-byte header) and
each row is one `b"".join`. The stream is the documented COPY BINARY format:
https://www.postgresql.org/docs/current/sql-copy.html#id-1.9.3.55.9.4
"""

from __future__ import annotations

import datetime as dt
import json
import struct
from typing import Any, Sequence

import numpy as np

HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
TRAILER = struct.pack(">h", -1)
NULL = struct.pack(">i", -1)
PG_EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)

_int32 = struct.Struct(">i")
_fields_uuid = struct.pack(">hi", 8, 16)  # 8 columns; the first is a 16-byte uuid
_fields9_uuid = struct.pack(">hi", 9, 16)  # the same and updated_at
_int4_field = struct.Struct(">ii")
_jsonb_head = struct.Struct(">ib")


def _text(value: str) -> bytes:
    data = value.encode()
    return _int32.pack(len(data)) + data


def _timestamptz(value: dt.datetime | None) -> bytes:
    if value is None:
        return NULL
    if value.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    delta = value - PG_EPOCH
    micros = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    return struct.pack(">iq", 8, micros)


def encode_vector_rows(
    rows: Sequence[Sequence[Any]], vectors: np.ndarray, updated_at: Sequence[dt.datetime] | None = None
) -> bytes:
    """COPY BINARY stream for (chunk_id, doc_id, seq, content_hash, text, metadata, source_ts, embedding),
    plus updated_at when given (a snapshot restored keeps its rows' times). `metadata` may be a
    JSON text already (as a snapshot holds it) or an object to serialise."""
    vectors = np.ascontiguousarray(vectors, dtype=">f4")
    if vectors.ndim != 2 or len(vectors) != len(rows):
        raise ValueError(f"{len(rows)} rows but vectors of shape {vectors.shape}")
    dims = vectors.shape[1]
    vector_head = struct.pack(">ihh", 4 + 4 * dims, dims, 0)
    raw = vectors.tobytes()
    width = 4 * dims
    if updated_at is not None and len(updated_at) != len(rows):
        raise ValueError(f"{len(rows)} rows but {len(updated_at)} updated_at values")
    fields = _fields_uuid if updated_at is None else _fields9_uuid
    parts = [HEADER]
    for i, (chunk_id, doc_id, seq, content_hash, text, metadata, source_ts) in enumerate(rows):
        if isinstance(metadata, str):
            meta = metadata.encode()
        else:
            meta = json.dumps(metadata, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
        parts.append(
            b"".join(
                (
                    fields,
                    chunk_id.bytes,
                    _text(doc_id),
                    _int4_field.pack(4, seq),
                    _text(content_hash),
                    _text(text),
                    _jsonb_head.pack(len(meta) + 1, 1),
                    meta,
                    _timestamptz(source_ts),
                    vector_head,
                    raw[i * width : (i + 1) * width],
                    b"" if updated_at is None else _timestamptz(updated_at[i]),
                )
            )
        )
    parts.append(TRAILER)
    return b"".join(parts)
