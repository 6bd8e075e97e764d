"""Result tables: Markdown for people, CSV for programs (written atomically)."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any, Sequence

from d2gp.checkpoints import atomic_write_text

__all__ = ["markdown_table", "write_table"]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def write_table(header: Sequence[str], rows: Sequence[Sequence[Any]], stem: str | os.PathLike) -> None:
    """Write ``stem.md`` and ``stem.csv``."""
    stem = Path(stem)
    atomic_write_text(markdown_table(header, rows) + "\n", stem.with_suffix(".md"))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(buffer.getvalue(), stem.with_suffix(".csv"))
