"""Every relative link in README.md, docs/ and the other top-level guides leads somewhere: the file exists, and a `#anchor` names a
heading of that page (GitHub's anchors: lower case, punctuation dropped, spaces as hyphens, repeats numbered)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"!?\[([^\]]*)\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def pages() -> list[Path]:
    top = [ROOT / name for name in ("README.md", "CONTRIBUTING.md", "DEVELOPERS.md", "benchmarks/README.md")]
    return [*top, *sorted((ROOT / "docs").rglob("*.md"))]


def prose(path: Path) -> list[tuple[int, str]]:
    """The page's lines outside fenced code blocks, numbered from 1."""
    out, fenced = [], False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            out.append((number, line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor of a heading's text."""
    text = LINK.sub(lambda m: m.group(1), heading).replace("`", "").lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose(path):
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
        found.update(re.findall(r"<a (?:id|name)=\"([^\"]+)\"", line))
    return found


def broken_links(path: Path) -> list[str]:
    problems = []
    for number, line in prose(path):
        for m in LINK.finditer(re.sub(r"`[^`]*`", "", line)):  # a link in inline code is text
            target = m.group(2)
            if re.match(r"[a-z][a-z0-9+.-]*:", target):
                continue  # http(s), mailto: checked by nobody offline
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.relative_to(ROOT)}:{number}: ({target})"
            if not dest.exists():
                problems.append(f"{where} no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{where} no heading with the anchor #{anchor} in {dest.relative_to(ROOT)}")
    return problems


def test_every_relative_link_and_anchor_resolves():
    problems = [p for page in pages() for p in broken_links(page)]
    assert not problems, "\n".join(problems)


def test_the_slugs_are_githubs():
    assert slug("Why LoRA lost: learning curves (issue 19, part 1; 2026-12-03)") == \
        "why-lora-lost-learning-curves-issue-19-part-1-2026-12-03"
    assert slug("DPO in detail (`honelm dpo`)") == "dpo-in-detail-honelm-dpo"
    assert slug("Choosing plae's ε (2026-11-22)") == "choosing-plaes-ε-2026-11-22"


def test_readme_stays_short_and_keeps_its_set_up():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.encode("utf-8")) <= 20_000, "README.md is over 20 KB: move reference text to docs/"
    assert "make demo" in text and "make test" in text
