"""docs/reference/: one Markdown page per verb, generated from what `honelm VERB --help` prints.

    python -m honelm.reference            # (re)write docs/reference/
    python -m honelm.reference --check    # exit 1, naming the stale pages, when they differ from the code

A stage's or config verb's page lists every field of its config, section by section, with type,
default, allowed range and its attribute docstring (`honelm.config.describe`, the rows `--help`
prints). A command verb's page is its argparse help (options, and the fields of its YAML file
where it reads one), rendered at a fixed width so the page does not depend on the terminal.
`tests/unit/test_reference.py` regenerates the pages in memory and fails when one is stale.
"""

from __future__ import annotations

import argparse
import functools
import sys
import typing
from pathlib import Path
from typing import Any

from honelm import config as C
from honelm import registry
from honelm.cli import config_usage
from honelm.registry import VERBS, Verb

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "reference"
COMMAND = "python -m honelm.reference"
HELP_WIDTH = 100
"""Columns of a command verb's argparse help (its `--help` wraps at the terminal's width)."""


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell: pipes escaped, angle brackets not read as HTML."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace("\n", " ")


def _section_doc(cls: type, head: str) -> str:
    """The docstring of section `head` of `cls` (empty when the section class has none of its own)."""
    tp = typing.get_type_hints(cls).get(head)
    doc = getattr(tp, "__doc__", "") or ""
    generated = doc.startswith(f"{getattr(tp, '__name__', '')}(")  # dataclass's signature, not a docstring
    return "" if generated else " ".join(doc.split())


def _presets(name: str) -> str:
    """The verb's shipped presets as links from docs/reference/ to configs/."""
    shipped = sorted(p.stem for p in (ROOT / "configs" / name).glob("*.yaml"))
    return ", ".join(f"[{n}](../../configs/{name}/{n}.yaml)" for n in shipped)


def config_page(verb: Verb) -> str:
    """The page of a stage or config verb: usage, presets, then each section's fields as a table."""
    cls = registry.config_class(verb.name)
    lines = [f"# honelm {verb.name}", "", verb.summary, "", "```", config_usage(verb), "```", ""]
    presets = _presets(verb.name)
    if presets:
        lines += [f"Presets (`--config NAME`): {presets}.", ""]
    lines += [f"Every field below is set in a preset's YAML or as `key.sub=value` on the command line "
              f"(`honelm {verb.name} --help` prints the same list).", ""]
    section = None
    for key, tp, default, doc in C.describe(cls):
        head = key.split(".")[0] if "." in key else ""
        if head != section:
            section = head
            title = f"`{head}`" if head else "top-level fields"
            lines += [*([""] if lines[-1] else []), f"## {title}", ""]
            about = _section_doc(cls, head) if head else ""
            if about:
                lines += [about, ""]
            lines += ["| key | type | default | description |", "|---|---|---|---|"]
        lines.append(f"| `{key}` | `{_cell(tp)}` | `{_cell(default)}` | {_cell(doc)} |")
    return "\n".join(lines) + "\n"


class _Parser(Exception):
    """Raised in place of parsing: carries the parser a command's `main` built."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__(parser.prog)
        self.parser = parser


def command_parser(name: str) -> argparse.ArgumentParser:
    """The argparse parser of command verb `name`: its `main` is called and stopped where it parses its arguments
    (nothing runs), so the page shows exactly the options `--help` shows."""
    def capture(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> Any:
        raise _Parser(self)

    # every way of parsing (parse_args, parse_intermixed_args) goes through parse_known_args
    original = argparse.ArgumentParser.parse_known_args
    argparse.ArgumentParser.parse_known_args = capture  # type: ignore[method-assign]
    try:
        registry.command(name)(["--help"])
    except _Parser as found:
        return found.parser
    finally:
        argparse.ArgumentParser.parse_known_args = original  # type: ignore[method-assign]
    raise RuntimeError(f"honelm {name}: its main() parsed no arguments with argparse")


def command_page(verb: Verb) -> str:
    """The page of a command verb: its argparse help at HELP_WIDTH columns."""
    parser = command_parser(verb.name)
    parser.formatter_class = functools.partial(parser.formatter_class, width=HELP_WIDTH)  # type: ignore[assignment]
    text = parser.format_help().rstrip()
    return "\n".join([f"# honelm {verb.name}", "", verb.summary, "", "```text", text, "```"]) + "\n"


def index_page() -> str:
    """docs/reference/README.md: every verb with its summary and page, and how the pages are made."""
    lines = ["# Reference: every verb", "",
             "One page per verb, generated from the code: for a verb that takes a config, every field with its type, "
             "default, allowed values and description; for a command, its options (and the fields of the YAML file "
             "it reads). The same text as `honelm VERB --help`.", "",
             "| verb | what it does | page |", "|---|---|---|"]
    lines += [f"| `{v.name}` | {_cell(v.summary)} | [{v.name}.md]({v.name}.md) |" for v in VERBS.values()]
    lines += ["", "## How these pages are made", "",
              "They are written by `honelm/reference.py` from the config classes' attribute docstrings (the text "
              "`honelm VERB --help` prints, read by `honelm.config.describe`) and, for commands, from their argparse "
              "options. Do not edit them by hand: change the docstring or the option's help, then run", "",
              f"    {COMMAND}", "",
              "`tests/unit/test_reference.py` fails while a page differs from what the code would generate "
              f"(`{COMMAND} --check` says the same)."]
    return "\n".join(lines) + "\n"


def pages() -> dict[str, str]:
    """Every page of docs/reference/, by file name, as the code generates it now."""
    out = {"README.md": index_page()}
    for verb in VERBS.values():
        out[f"{verb.name}.md"] = command_page(verb) if verb.kind == "command" else config_page(verb)
    return out


def stale(directory: Path = OUT, wanted: dict[str, str] | None = None) -> list[str]:
    """File names under `directory` that differ from the generated pages (`wanted`, default: `pages()`), are
    missing, or are left over."""
    wanted = pages() if wanted is None else wanted
    found = {p.name for p in directory.glob("*.md")} if directory.is_dir() else set()
    differ = [name for name, text in wanted.items()
              if not (directory / name).is_file() or (directory / name).read_text(encoding="utf-8") != text]
    return sorted(differ + sorted(found - set(wanted)))


def write(directory: Path = OUT, wanted: dict[str, str] | None = None) -> list[str]:
    """Write every page (`wanted`, default: `pages()`) and remove pages of verbs that no longer exist; returns the
    names written."""
    directory.mkdir(parents=True, exist_ok=True)
    wanted = pages() if wanted is None else wanted
    for old in directory.glob("*.md"):
        if old.name not in wanted:
            old.unlink()
    for name, text in wanted.items():
        (directory / name).write_text(text, encoding="utf-8")
    return sorted(wanted)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=COMMAND, description="Write docs/reference/ from the verbs' --help.")
    p.add_argument("--check", action="store_true", help="only say which pages are stale (exit 1 if any)")
    p.add_argument("--out", default=str(OUT), help=f"directory of the pages (default: {OUT})")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.check:
        differ = stale(Path(args.out))
        if differ:
            print(f"stale: {', '.join(differ)}; run {COMMAND}", file=sys.stderr)
            return 1
        print("docs/reference is up to date")
        return 0
    names = write(Path(args.out))
    print(f"wrote {len(names)} pages to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
