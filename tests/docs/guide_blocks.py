"""The runnable examples of docs/guide/: each ```bash block that follows a `<!-- run -->` line.

A runnable block holds `honelm ...` commands (and `torchrun ...` for the multi-process guide), one a
line, `\\` continuing a line and `#` starting a comment. The blocks of one page run in order, in one
fresh directory, exactly as written: each page's example is tiny (`model.size=test`, tens of steps).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "guide"
MARK = "<!-- run -->"
PROGRAMS = ("honelm", "torchrun")


@dataclass(frozen=True)
class Command:
    """One command of a runnable block: where it is written and its words."""

    page: str
    line: int
    words: tuple[str, ...]


def guide_pages() -> list[Path]:
    """Every guide page except the index."""
    return sorted(p for p in GUIDE.glob("*.md") if p.name != "README.md")


def commands(page: Path) -> list[Command]:
    """The commands of every runnable block of `page`, in order."""
    lines = page.read_text(encoding="utf-8").splitlines()
    found: list[Command] = []
    i = 0
    while i < len(lines):
        if lines[i].strip() != MARK:
            i += 1
            continue
        start = i + 1
        if start >= len(lines) or lines[start].strip() != "```bash":
            raise ValueError(f"{page.name}:{i + 1}: {MARK} must be followed by a ```bash block")
        i = start + 1
        pending, first = "", 0
        while i < len(lines) and lines[i].strip() != "```":
            text = lines[i]
            if not pending:
                first = i + 1
            if text.rstrip().endswith("\\"):
                pending += text.rstrip()[:-1] + " "
            else:
                words = shlex.split(pending + text, comments=True)
                pending = ""
                if words:
                    found.append(Command(page.name, first, tuple(words)))
            i += 1
        if i >= len(lines):
            raise ValueError(f"{page.name}:{start + 1}: the runnable block is never closed")
    return found
