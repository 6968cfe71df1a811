"""The metadata filter language, with one meaning in every tier.

A filter is a JSON object matched by containment, exactly as PostgreSQL's `jsonb @>`:
`{"year": 2024}` matches metadata whose `year` is 2024; `{"tags": ["a"]}` matches metadata
whose `tags` array holds "a"; nested objects match nested objects. The active tier runs
`metadata @> filter` in SQL; the cold tier runs `contains` below, which follows the same
rules (tested against PostgreSQL itself). Keys starting with `$` look like operators of
other query languages (`$gt`, `$in`): they are refused, not silently matched as keys.

A filter is refused, in every tier alike, unless PostgreSQL's jsonb could hold it: no NUL
character or unpaired surrogate in a key or a string, no NaN or infinity, no number with
more digits than Python writes (4,300), nesting at most MAX_DEPTH levels. Such a filter
could match no stored metadata anyway (the sources refuse the same values).
"""

from __future__ import annotations

import math
from typing import Any

from vector_platform.names import unstorable

# As deep as stored metadata may be (`ingest.sources.MAX_METADATA_DEPTH`).
MAX_DEPTH = 64
# Python refuses to write ints longer than this many digits (sys.get_int_max_str_digits).
_MAX_INT_BITS = 14_000

class UnsupportedFilter(ValueError):
    """A filter this language cannot express (refused in every tier alike)."""


def validate(filters: Any) -> dict[str, Any] | None:
    if filters is None:
        return None
    if not isinstance(filters, dict):
        raise UnsupportedFilter('filters must be a JSON object, e.g. {"year": 2024}')
    _check(filters, "", 0)
    return filters


def _check(value: Any, path: str, depth: int) -> None:
    if isinstance(value, (dict, list)) and depth >= MAX_DEPTH:
        raise UnsupportedFilter(f"filters nested deeper than {MAX_DEPTH} levels at {path[:80]}")
    if isinstance(value, dict):
        for key, inner in value.items():
            if not isinstance(key, str):
                raise UnsupportedFilter(f"filter keys must be strings, got {key!r} at {path or 'the top'}")
            _check_text(key, f"the key {key!r} at {path or 'the top'}")
            if key.startswith("$"):
                raise UnsupportedFilter(
                    f"unsupported filter operator {key!r} at {path or 'the top'}: filters match by JSON containment "
                    '(e.g. {"year": 2024} or {"tags": ["a"]}); comparison operators are not supported'
                )
            _check(inner, f"{path}.{key}" if path else key, depth + 1)
    elif isinstance(value, list):
        for i, inner in enumerate(value):
            _check(inner, f"{path}[{i}]", depth + 1)
    elif isinstance(value, float) and not math.isfinite(value):
        raise UnsupportedFilter(f"{'NaN' if value != value else 'infinity'} in filters at {path}: not a JSON number")
    elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > _MAX_INT_BITS:
        raise UnsupportedFilter(f"a number of more than 4,000 digits in filters at {path}")
    elif isinstance(value, str):
        _check_text(value, f"the value at {path}")
    elif not (value is None or isinstance(value, (str, int, float, bool))):
        raise UnsupportedFilter(f"filter values must be JSON, got {type(value).__name__} at {path}")


def _check_text(text: str, where: str) -> None:
    problem = unstorable(text)
    if problem:
        raise UnsupportedFilter(f"{where[:120]} holds {problem}, which no stored metadata can hold")


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def contains(doc: Any, pattern: Any, top: bool = True) -> bool:
    """`doc @> pattern` with jsonb's semantics."""
    doc_kind, pattern_kind = _kind(doc), _kind(pattern)
    if pattern_kind == "object":
        return doc_kind == "object" and all(k in doc and contains(doc[k], v, False) for k, v in pattern.items())
    if pattern_kind == "array":
        return doc_kind == "array" and all(any(contains(d, p, False) for d in doc) for p in pattern)
    if doc_kind == "array":
        # jsonb's one exception to "structures must match": a top-level array contains a scalar
        # it holds as an element.
        return top and any(_kind(d) == pattern_kind and d == pattern for d in doc)
    return doc_kind == pattern_kind and doc == pattern
