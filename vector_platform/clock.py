"""One clock for everything that reads "now" (tier rules, archival, query stats).

Tests call `set_now(...)` to move time instead of sleeping (DESIGN invariant 7).
"""

from __future__ import annotations

import datetime as dt

_frozen: dt.datetime | None = None


def now() -> dt.datetime:
    return _frozen if _frozen is not None else dt.datetime.now(dt.timezone.utc)


def set_now(value: dt.datetime | None) -> None:
    """Freeze the clock at `value` (timezone-aware), or unfreeze it with None."""
    global _frozen
    if value is not None and value.tzinfo is None:
        raise ValueError("the clock only takes timezone-aware datetimes")
    _frozen = value
