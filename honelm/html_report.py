"""Self-contained HTML next to a markdown report: `report.md` → `report.html` with its PNGs inlined.

A reader opens one file, offline, in any browser: images become base64 `data:` URIs, the CSS is
inline, and nothing is fetched from anywhere. The converter handles the markdown subset honelm's
reports are written in, and nothing more (no new dependency for a full CommonMark engine):

- blocks: `#`…`######` headings, paragraphs, `-`/`*` bullet lists (indented lines continue an
  item), GitHub pipe tables (with `:---:` alignment), fenced code blocks (``` or ~~~, any
  length), `>` block quotes (their content is rendered as blocks again);
- inline: `code` spans (any backtick-run length), **bold**, `[text](href)` links,
  `![alt](path)` images, backslash escapes of punctuation (tables use `\\|`).

All text is HTML-escaped. Links with a scheme other than http, https or mailto (javascript:,
data:, …) are rendered as plain text. Images are embedded only from local files (resolved
against the markdown's folder) with an image suffix, or from `data:image/…` URIs; anything
else is shown as a visible "not embedded" note rather than a remote `src`.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

CSS = """
body { max-width: 60rem; margin: 2rem auto; padding: 0 1rem; font: 15px/1.5 system-ui, -apple-system,
  "Segoe UI", Roboto, sans-serif; color: #1f2328; }
h1, h2, h3 { line-height: 1.25; } h1 { border-bottom: 1px solid #d0d7de; padding-bottom: .3rem; }
h2 { border-bottom: 1px solid #d8dee4; padding-bottom: .2rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: 1rem 0; display: block; overflow-x: auto; }
th, td { border: 1px solid #d0d7de; padding: .3rem .7rem; vertical-align: top; }
th { background: #f6f8fa; }
img { max-width: 100%; height: auto; }
figure { margin: 1rem 0; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 90%;
  background: #f6f8fa; padding: .1rem .3rem; border-radius: 4px; }
pre { background: #f6f8fa; padding: .8rem; overflow-x: auto; border-radius: 6px; }
pre code { background: none; padding: 0; }
blockquote { margin: 1rem 0; padding: 0 1rem; border-left: 4px solid #d0d7de; color: #59636e; }
.missing { color: #b35900; }
""".strip()

IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
               ".svg": "image/svg+xml", ".webp": "image/webp"}

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)")
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
_LIST_ITEM = re.compile(r"^ {0,3}[-*]\s+(.*)$")
_TABLE_SEP = re.compile(r"^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$")
_CELL_SPLIT = re.compile(r"(?<!\\)\|")
_IMAGE = re.compile(r'!\[([^\]]*)\]\(([^)\s]+)(?:\s+"[^"]*")?\)')
_LINK = re.compile(r'\[((?:[^\[\]]|\\[\[\]])+)\]\(([^)\s]+)(?:\s+"[^"]*")?\)')
_BOLD = re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*")
_HOLE = re.compile("\x00(\\d+)\x00")
_SAFE_HREF = re.compile(r"^(https?:|mailto:|#|[^:]*$)", re.IGNORECASE)
_ESCAPABLE = set("\\`*_{}[]()#+-.!|<>~\"'")


def esc(text: str) -> str:
    """HTML-escape text and attribute values (quotes included)."""
    return html.escape(text, quote=True)


# --------------------------------------------------------------------------------------------
# Inline markup
# --------------------------------------------------------------------------------------------


def _image(alt: str, src: str, base_dir: Path) -> str:
    """An <img> with the picture inlined as a data: URI, or a visible note when it cannot be."""
    if src.lower().startswith("data:image/"):
        return f'<img alt="{esc(alt)}" src="{esc(src)}">'
    if re.match(r"^[a-z][a-z0-9+.-]*:", src, re.IGNORECASE) and not re.match(r"^[a-z]:[\\/]", src, re.IGNORECASE):
        # a remote (or otherwise schemed) image would break "readable offline": link it instead
        return f'<span class="missing">[image not embedded: {esc(alt or src)} ({esc(src)})]</span>'
    path = Path(src) if Path(src).is_absolute() else base_dir / src
    mime = IMAGE_TYPES.get(path.suffix.lower())
    if mime is None or not path.is_file():
        why = "not an image file" if mime is None else "file not found"
        return f'<span class="missing">[image not embedded: {esc(src)}: {why}]</span>'
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:{mime};base64,{data}">'


def inline(text: str, base_dir: Path) -> str:
    """Render one line (or cell) of inline markdown to escaped HTML.

    Code spans, escapes, images and links are cut out first and replaced by NUL-delimited
    placeholders, so escaping and the **bold** rule never reach inside them; the placeholders
    are filled back in at the end (a NUL in the text itself is replaced first, so it cannot pose
    as a placeholder).
    """
    text = text.replace("\x00", "\ufffd")
    held: list[str] = []

    def hold(fragment: str) -> str:
        held.append(fragment)
        return f"\x00{len(held) - 1}\x00"

    out: list[str] = []
    pos, n = 0, len(text)
    while pos < n:
        ch = text[pos]
        if ch == "`":
            run = len(text[pos:]) - len(text[pos:].lstrip("`"))
            close = re.compile(rf"(?<!`)`{{{run}}}(?!`)").search(text, pos + run)
            if close is None:  # an unmatched backtick run is literal text
                out.append(text[pos:pos + run])
                pos += run
                continue
            content = text[pos + run:close.start()]
            if len(content) >= 2 and content[0] == " " and content[-1] == " " and content.strip():
                content = content[1:-1]  # CommonMark: one space of padding lets a span start with a backtick
            out.append(hold(f"<code>{esc(content)}</code>"))
            pos = close.end()
            continue
        if ch == "\\" and pos + 1 < n and text[pos + 1] in _ESCAPABLE:
            out.append(hold(esc(text[pos + 1])))
            pos += 2
            continue
        if ch == "!" and (m := _IMAGE.match(text, pos)):
            out.append(hold(_image(m.group(1), m.group(2), base_dir)))
            pos = m.end()
            continue
        if ch == "[" and (m := _LINK.match(text, pos)):
            label, href = inline(m.group(1), base_dir), m.group(2)
            out.append(hold(f'<a href="{esc(href)}">{label}</a>' if _SAFE_HREF.match(href) else label))
            pos = m.end()
            continue
        out.append(ch)
        pos += 1
    rendered = _BOLD.sub(r"<strong>\1</strong>", esc("".join(out)))
    # one pass suffices: a link label is rendered by its own inline() call, its holes already filled
    return _HOLE.sub(lambda m: held[int(m.group(1))], rendered)


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------


def _cells(row: str) -> list[str]:
    """The cells of a pipe-table row.

    An escaped pipe (`\\|`) stays inside its cell and becomes a plain `|` before inline parsing,
    code spans included (as GitHub does: the escape belongs to the table, not to the text).
    """
    row = row.strip()
    if row.startswith("|"):
        row = row[1:]
    if row.endswith("|") and not row.endswith("\\|"):
        row = row[:-1]
    return [c.strip().replace("\\|", "|") for c in _CELL_SPLIT.split(row)]


def _alignments(separator: str) -> list[str | None]:
    out: list[str | None] = []
    for c in _cells(separator):
        left, right = c.startswith(":"), c.endswith(":")
        out.append("center" if left and right else "right" if right else "left" if left else None)
    return out


def _table(header: str, separator: str, rows: list[str], base_dir: Path) -> str:
    heads = _cells(header)
    align = (_alignments(separator) + [None] * len(heads))[: len(heads)]

    def cell(tag: str, text: str, a: str | None) -> str:
        style = f' style="text-align: {a}"' if a else ""
        return f"<{tag}{style}>{inline(text, base_dir)}</{tag}>"

    lines = ["<table>", "<thead>", "<tr>" + "".join(cell("th", h, a) for h, a in zip(heads, align)) + "</tr>",
             "</thead>", "<tbody>"]
    for row in rows:
        values = (_cells(row) + [""] * len(heads))[: len(heads)]  # GFM: pad short rows, cut long ones
        lines.append("<tr>" + "".join(cell("td", v, a) for v, a in zip(values, align)) + "</tr>")
    return "\n".join([*lines, "</tbody>", "</table>"])


def _starts_block(lines: list[str], i: int) -> bool:
    """Whether line i opens a block other than a paragraph (which ends the paragraph before it)."""
    line = lines[i]
    return bool(_FENCE.match(line) or _HEADING.match(line) or line.lstrip().startswith(">")
                or _LIST_ITEM.match(line)
                or (line.lstrip().startswith("|") and i + 1 < len(lines) and _TABLE_SEP.match(lines[i + 1])))


def blocks(lines: list[str], base_dir: Path) -> str:
    """Render a list of markdown lines as a sequence of HTML blocks."""
    out: list[str] = []
    i, n = 0, len(lines)
    while i < n:
        line = lines[i]
        if not line.strip():
            i += 1
            continue
        if m := _FENCE.match(line):
            fence, lang = m.group(1), m.group(2)
            body: list[str] = []
            i += 1
            # closed by a line of the same character at least as long (an unclosed fence runs to the end)
            while i < n and not re.fullmatch(rf" {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*", lines[i]):
                body.append(lines[i])
                i += 1
            i += 1
            cls = f' class="language-{esc(lang)}"' if lang else ""
            out.append(f"<pre><code{cls}>{esc(chr(10).join(body))}</code></pre>")
            continue
        if m := _HEADING.match(line):
            level = len(m.group(1))
            out.append(f"<h{level}>{inline(m.group(2), base_dir)}</h{level}>")
            i += 1
            continue
        if line.lstrip().startswith(">"):
            quoted: list[str] = []
            while i < n and lines[i].lstrip().startswith(">"):
                rest = lines[i].lstrip()[1:]
                quoted.append(rest[1:] if rest.startswith(" ") else rest)
                i += 1
            out.append(f"<blockquote>\n{blocks(quoted, base_dir)}\n</blockquote>")
            continue
        if line.lstrip().startswith("|") and i + 1 < n and _TABLE_SEP.match(lines[i + 1]):
            header, separator = line, lines[i + 1]
            i += 2
            rows = []
            while i < n and lines[i].strip().startswith("|"):
                rows.append(lines[i])
                i += 1
            out.append(_table(header, separator, rows, base_dir))
            continue
        if _LIST_ITEM.match(line):
            items: list[str] = []
            while i < n and lines[i].strip():
                if m := _LIST_ITEM.match(lines[i]):
                    items.append(m.group(1))
                elif lines[i].startswith((" ", "\t")) and items:  # an indented line continues the item
                    items[-1] += " " + lines[i].strip()
                else:
                    break
                i += 1
            out.append("<ul>\n" + "\n".join(f"<li>{inline(t, base_dir)}</li>" for t in items) + "\n</ul>")
            continue
        para = [line.strip()]
        i += 1
        while i < n and lines[i].strip() and not _starts_block(lines, i):
            para.append(lines[i].strip())
            i += 1
        text = "\n".join(para)
        if _IMAGE.fullmatch(text):  # a picture on its own line is a figure, not a sentence
            out.append(f"<figure>{inline(text, base_dir)}</figure>")
        else:
            out.append(f"<p>{inline(text, base_dir)}</p>")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def md_to_html(md: str, base_dir: Path, title: str) -> str:
    """A complete, self-contained HTML document for markdown `md`; images resolve against `base_dir`."""
    lines = md.replace("\x00", "\ufffd").replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{esc(title)}</title>\n<style>\n{CSS}\n</style>\n</head>\n<body>\n"
            f"{blocks(lines, Path(base_dir))}\n</body>\n</html>\n")


def _title(md: str, fallback: str) -> str:
    """The text of the first heading, without inline markup characters."""
    for line in md.splitlines():
        if m := _HEADING.match(line):
            return re.sub(r"[`*]", "", m.group(2)).strip() or fallback
    return fallback


def write_html(report_md: Path) -> Path:
    """Write `<name>.html` beside markdown file `report_md` (any honelm report); return its path."""
    report_md = Path(report_md)
    md = report_md.read_text(encoding="utf-8")
    out = report_md.with_suffix(".html")
    out.write_text(md_to_html(md, report_md.parent, _title(md, report_md.stem)), encoding="utf-8")
    return out
