"""Markdown tables: one renderer for the run report, the compare table and the bench table."""
from __future__ import annotations

from collections.abc import Sequence

_RULES = {"-": "---", "l": ":---", "r": "---:", "c": ":---:"}


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> str:
    """A GitHub-flavoured Markdown table (no trailing newline): ``| a | b |`` lines.

    ``align`` has one character per column: ``-`` the renderer's default (``---``), ``l`` left
    (``:---``), ``r`` right (``---:``), ``c`` centred (``:---:``); None is ``-`` for every column.
    Cells are written as given (already formatted strings)."""
    align = align if align is not None else "-" * len(headers)
    if len(align) != len(headers) or set(align) - set(_RULES):
        raise ValueError(f"align {align!r} needs one of {''.join(_RULES)} for each of the {len(headers)} columns")
    lines = ["| " + " | ".join(headers) + " |", "|" + "".join(_RULES[a] + "|" for a in align)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
