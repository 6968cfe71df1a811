"""Validation of every name that ends up in SQL or a path: collections, model keys, tables.

Names are checked once at the door and then composed with `psycopg.sql.Identifier`, so a
hostile name is refused with a clear message instead of reaching the database.
"""

from __future__ import annotations

import hashlib
import re

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,47}$")
# Postgres silently truncates identifiers longer than 63 bytes; we never let it.
MAX_IDENTIFIER = 63
_SURROGATE = re.compile("[\ud800-\udfff]")


class InvalidName(ValueError):
    """A collection or model name that does not match NAME_PATTERN."""


def validate_name(name: str, what: str = "collection") -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise InvalidName(
            f"invalid {what} name {name!r}: use 1-48 characters, lowercase letters, digits and "
            "underscores, starting with a letter (pattern ^[a-z][a-z0-9_]{0,47}$)"
        )
    return name


def bounded_identifier(*parts: str, suffix: str = "") -> str:
    """Join parts with '__' (+ suffix); if that exceeds 63 bytes, shorten it with a stable hash."""
    full = "__".join(parts) + suffix
    if len(full) <= MAX_IDENTIFIER:
        return full
    digest = hashlib.sha1(full.encode()).hexdigest()[:10]
    keep = MAX_IDENTIFIER - len(digest) - len(suffix) - 1
    return f"{full[:keep]}_{digest}{suffix}"


def unstorable(text: str) -> str | None:
    """What in `text` PostgreSQL text cannot hold, as words for an error message; None when
    it can hold all of it (see `storable_text` to clean it instead)."""
    if "\x00" in text:
        return "a NUL character (\\u0000)"
    if _SURROGATE.search(text):
        return "an unpaired UTF-16 surrogate (not valid Unicode text)"
    return None


def storable_text(text: str) -> str:
    """`text` as PostgreSQL text can hold it, for logs of what users typed (a query, an error):
    NUL characters dropped, unpaired UTF-16 surrogates replaced by U+FFFD."""
    return _SURROGATE.sub("\ufffd", text.replace("\x00", "")) if text else text
