"""Plain-text tables (markdown), with no pandas dependency."""

from __future__ import annotations

from typing import Sequence


def format_number(x, digits: int = 4) -> str:
    """Compact, aligned-friendly formatting: fixed for moderate, scientific else."""
    if isinstance(x, str):
        return x
    x = float(x)
    if x != x:
        return "nan"
    if x == 0.0:
        return "0"
    ax = abs(x)
    if 1e-3 <= ax < 1e6:
        return f"{x:.{digits}f}" if ax < 10 else f"{x:.{max(digits - 2, 1)}f}"
    return f"{x:.{digits - 1}e}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """Returns a GitHub-flavoured markdown table with padded columns.

    A ``|`` inside a header or cell (as in ``||E g - g*||``) is escaped so it
    does not split the column.
    """
    def escape(text) -> str:
        return str(text).replace("|", "\\|")

    headers = [escape(h) for h in headers]
    cells = [[escape(format_number(c)) for c in row] for row in rows]
    widths = [
        max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h))
        for i, h in enumerate(headers)
    ]
    def line(items):
        return "| " + " | ".join(str(s).rjust(w) for s, w in zip(items, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in cells)])
