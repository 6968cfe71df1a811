"""Small pictures for asset metadata: Markdown tables with a bar per row.

The Dagster UI renders Markdown metadata on the asset and check pages, so a bar drawn with
block characters is seen where people look, needs no image store and no plotting library,
and stays readable as text in `dagster asset` output and in the event log.
"""

from __future__ import annotations

from typing import Iterable, Sequence

_EIGHTHS = " ▏▎▍▌▋▊▉"


def bar(value: float, top: float, width: int = 24) -> str:
    """A horizontal bar of `value` on a scale from 0 to `top`, in eighths of a character."""
    if top <= 0 or value <= 0:
        return ""
    eighths = round(min(value / top, 1.0) * width * 8)
    return "█" * (eighths // 8) + (_EIGHTHS[eighths % 8] if eighths % 8 else "")


def bar_table(headers: Sequence[str], rows: Iterable[Sequence], values: Sequence[float], top: float | None = None,
              bar_header: str = "") -> str:
    """A Markdown table of `rows` plus a last column drawing each row's value as a bar.
    `top`: the value of a full bar (default: the largest value)."""
    rows = [list(r) for r in rows]
    values = [float(v or 0) for v in values]
    scale = top if top is not None else max(values, default=0.0)
    lines = ["| " + " | ".join([*headers, bar_header]) + " |", "|" + "---|" * (len(headers) + 1)]
    for row, value in zip(rows, values):
        drawn = bar(value, scale)
        lines.append("| " + " | ".join([*(_cell(c) for c in row), f"`{drawn}`" if drawn else ""]) + " |")
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value).replace("|", "\\|")


def human_bytes(n: int | float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
