"""Strict readers that turn data files into validated `Example` and `Document` rows.

This module owns file discovery (`expand_paths`), format parsing (plain text, JSONL, JSON,
CSV/TSV, Parquet) and row validation. The rule is that nothing is silently dropped or altered:
every bad row is a `DataError` naming the file, the 1-based line and the field. A read collects
the bad rows (`BadRows`) and reports them together in one `BadRowsError` (the first
BAD_ROWS_SHOWN in file order, then a count), so that a user fixes them in one pass; with
`BadRows(skip=True)` (a stage's `data.skip_bad_rows=true`) they are left out instead, counted and
listed in the log and the split manifest. A problem with a whole file (a missing header, JSON that
does not parse as an array) still stops the read at once. Only formatting is skipped (blank lines
in JSONL/CSV/plain text); text values are returned exactly as found.

Line numbers: plain text and JSONL use the physical line; JSON arrays use the line where each
object starts; CSV/TSV use the physical line where the row starts (the header is line 1);
Parquet uses row index + 1.

An `hf:NAME[:CONFIG][@SPLIT]` item among the paths is a dataset read through `datasets`
(honelm.data.hub); its rows are checked exactly as a Parquet file's, the "file" being the spec.
"""

from __future__ import annotations

import csv
import glob
import json
import math
import re
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import pyarrow.parquet as pq

from honelm.data import hub
from honelm.errors import DataError

__all__ = [
    "BAD_ROWS_SHOWN",
    "BadRows",
    "BadRowsError",
    "DATA_SUFFIXES",
    "Document",
    "Example",
    "check_labels_seen",
    "expand_paths",
    "read_documents",
    "read_examples",
]

# Extensions picked up when a directory is given; any other extension is read as plain text
# when named explicitly (or matched by a glob).
DATA_SUFFIXES: tuple[str, ...] = (".txt", ".jsonl", ".json", ".csv", ".tsv", ".parquet")
_STRUCTURED = {".jsonl", ".json", ".csv", ".tsv", ".parquet"}
_TASKS = ("classification", "regression")
_DOC_UNITS = ("lines", "paragraphs", "files")

# Lone surrogates cannot be encoded as UTF-8, so they would break tokenizers later. In files we
# decode with "surrogateescape", invalid bytes show up as U+DC80..U+DCFF.
_SURROGATE = re.compile("[\ud800-\udfff]")
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")
_JSON_WS = re.compile(r"[ \t\n\r]*")
# Only canonical ints ("0", "-3", not "03" or "+3") are converted in CSV, so string codes such
# as "01" and "1" never collapse into the same class.
_CANONICAL_INT = re.compile(r"-?(?:0|[1-9][0-9]*)")
_BOM = "\ufeff"
T = TypeVar("T")


BAD_ROWS_SHOWN = 20
"""How many bad rows one error lists (then "... and K more")."""


class BadRowsError(DataError):
    """Several bad rows reported together: `errors` holds each row's DataError (the first sets path, line, field)."""

    def __init__(self, errors: Sequence[DataError]) -> None:
        first = errors[0]
        super().__init__(first.path, first.line, first.field, first.message)
        self.errors = list(errors)
        if len(errors) > 1:
            shown = [f"  {e}" for e in errors[:BAD_ROWS_SHOWN]]
            more = len(errors) - BAD_ROWS_SHOWN
            self.args = ("\n".join([f"{len(errors)} bad rows (fix them, or set data.skip_bad_rows=true to leave them "
                                     "out, counted):", *shown] + ([f"  ... and {more} more"] if more > 0 else [])),)

    def __str__(self) -> str:
        return str(self.args[0])


class BadRows:
    """The bad rows met while reading: raised together (`check`), or, with `skip`, left out and kept for the record."""

    def __init__(self, skip: bool = False) -> None:
        self.skip = skip
        self.errors: list[DataError] = []

    def attempt(self, read_row: Callable[[], T]) -> T | None:
        """`read_row()`, or None after recording the DataError it raised (the read goes on to the next row)."""
        try:
            return read_row()
        except DataError as e:
            self.errors.append(e)
            return None

    def check(self) -> None:
        """Raise every bad row so far in one BadRowsError, unless they are being skipped."""
        if self.errors and not self.skip:
            raise BadRowsError(self.errors)

    @staticmethod
    def finish(given: BadRows | None, bad: BadRows, found: Sequence[Any]) -> None:
        """End of a read: a reader that made its own `bad` (given None) raises its bad rows; one that was given
        a BadRows leaves that to its caller (who may read more files first), unless nothing good was found."""
        if given is None or not found:
            bad.check()

    def record(self, first: int = 5) -> dict[str, Any]:
        """What the split manifest keeps: how many rows were left out and the first few errors."""
        return {"count": len(self.errors), "first": [str(e) for e in self.errors[:first]]}

    def say(self, say: Callable[[str], None], first: int = 5) -> None:
        """One log line per skipped row (the first few) after their count; nothing when no row was bad."""
        if not self.errors:
            return
        say(f"data.skip_bad_rows: left out {len(self.errors)} bad row(s); the first {min(first, len(self.errors))}:")
        for e in self.errors[:first]:
            say(f"  {e}")


@dataclass(frozen=True)
class Example:
    """One labelled (or unlabelled) row for fine-tuning or evaluation.

    `label` is the raw label as found (str/int for classification, float for regression, None
    when unlabelled); `source` is the file path and `line` the 1-based location of the row.
    """

    text: str
    text_pair: str | None
    label: int | float | str | None
    source: str
    line: int


@dataclass(frozen=True)
class Document:
    """One unlabelled document for language-model training."""

    text: str
    source: str
    line: int


# --------------------------------------------------------------------------------------------
# Path discovery


def _is_hidden(path: Path, root: Path) -> bool:
    # Hidden folders such as .ipynb_checkpoints hold stale copies of data files; reading them
    # would silently duplicate rows.
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _expand_dir(directory: Path) -> list[Path]:
    found = [
        p
        for p in directory.rglob("*")
        if p.is_file() and p.suffix.lower() in DATA_SUFFIXES and not _is_hidden(p, directory)
    ]
    if not found:
        raise DataError(
            directory, None, None,
            f"directory contains no data files ({', '.join('*' + s for s in DATA_SUFFIXES)})",
        )
    return sorted(found, key=lambda p: p.as_posix())


def _expand_one(item: str | Path) -> list[Path]:
    path = Path(item)
    if path.is_file():
        return [path]
    if path.is_dir():
        return _expand_dir(path)
    text = str(item)
    if glob.has_magic(text):
        matches = sorted(glob.glob(text, recursive=True))
        out: list[Path] = []
        for m in matches:
            mp = Path(m)
            if mp.is_dir():
                out.extend(_expand_dir(mp))
            elif mp.is_file():
                out.append(mp)
        if not out:
            raise DataError(text, None, None, "no such file: the pattern matched nothing")
        return out
    raise DataError(text, None, None, "no such file or directory")


def expand_paths(spec: str | Path | Sequence[str | Path]) -> list[Path]:
    """Expand files, directories (recursive, sorted, data extensions only) and globs.

    A list of specs is expanded in order; a file reached twice (say a folder and a file inside
    it) is kept once so its rows are not duplicated. Any spec matching nothing is a DataError.
    """
    items: list[str | Path] = [spec] if isinstance(spec, (str, Path)) else list(spec)
    if not items:
        raise DataError("<no paths>", None, None, "no input paths were given")
    seen: set[Path] = set()
    result: list[Path] = []
    for item in items:
        for p in _expand_one(item):
            key = p.resolve()
            if key not in seen:
                seen.add(key)
                result.append(p)
    return result


def _spec_name(spec: str | Path | Sequence[str | Path]) -> str:
    if isinstance(spec, (str, Path)):
        return str(spec)
    return ", ".join(str(s) for s in spec)


# --------------------------------------------------------------------------------------------
# Byte-level helpers


def _iter_binary_lines(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """Yield (1-based line, byte offset of the line start, raw bytes) without loading the file."""
    offset = 0
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            yield lineno, offset, raw
            offset += len(raw)


def _strip_eol(text: str) -> str:
    if text.endswith("\n"):
        text = text[:-1]
        if text.endswith("\r"):
            text = text[:-1]
    return text


def _bad_utf8_message(offset: int, bad: bytes, column: int | None = None) -> str:
    where = f"byte offset {offset}"
    if column is not None:
        where += f" (byte {column + 1} of the line)"
    return f"invalid UTF-8: byte 0x{bad[:1].hex()} at {where}"


def _first_bad_utf8(path: Path) -> tuple[int, int, bytes, int]:
    """Locate the first invalid UTF-8 byte: (line, absolute offset, bad byte, column in line)."""
    for lineno, start, raw in _iter_binary_lines(path):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return lineno, start + e.start, raw[e.start : e.start + 1], e.start
    return 1, 0, b"", 0  # unreachable when called after a decoding failure


def _decode_line(path: Path, lineno: int, start: int, raw: bytes, json_line: bool = False) -> str:
    """Decode one raw line strictly; a bad byte is a DataError with its offset.

    For a JSONL line the error also names the field whose value holds the bad byte.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        field = _field_with_bad_bytes(raw.decode("utf-8", "surrogateescape")) if json_line else None
        raise DataError(
            path, lineno, field, _bad_utf8_message(start + e.start, raw[e.start : e.start + 1], e.start)
        ) from None
    if lineno == 1 and text.startswith(_BOM):
        # A byte-order mark is an encoding artefact (Windows editors), not part of the text.
        text = text[1:]
    return text


def _field_with_bad_bytes(decoded: str) -> str | None:
    """Best effort: name the top-level JSON field whose value holds an undecodable byte."""
    try:
        obj = json.loads(decoded)
    except (ValueError, RecursionError):
        return None
    return _field_holding(obj, _ESCAPED_BYTE)


def _field_holding(obj: Any, pattern: re.Pattern[str]) -> str | None:
    if not isinstance(obj, dict):
        return None
    for key, value in obj.items():
        if pattern.search(key):
            return key
        blob = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        if pattern.search(blob):
            return key
    return None


# --------------------------------------------------------------------------------------------
# Row validation


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json keeps the last of two equal keys and drops the other silently; refuse instead.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return obj


_DECODER = json.JSONDecoder(object_pairs_hook=_pairs_hook)
_PLAIN_DECODER = json.JSONDecoder()


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _get_field(path: Path, line: int, row: Mapping[str, Any], field: str) -> Any:
    if field not in row:
        available = ", ".join(repr(k) for k in row) or "(none)"
        raise DataError(path, line, field, f"is missing; available fields: {available}")
    return row[field]


def _check_text(path: Path, line: int, field: str, value: Any) -> str:
    if not isinstance(value, str):
        raise DataError(path, line, field, f"must be a string, got {_json_type(value)}")
    if not value.strip():
        raise DataError(path, line, field, "is empty" if not value else "is whitespace-only")
    if _SURROGATE.search(value):
        raise DataError(path, line, field, "contains a lone surrogate (not valid Unicode)")
    if "\x00" in value:
        raise DataError(path, line, field, f"contains a NUL byte (character {value.index(chr(0)) + 1}): a binary or "
                        "corrupted file?")
    return value


def _check_label(path: Path, line: int, field: str, value: Any, task: str) -> int | float | str:
    """Validate a typed (JSON/Parquet) label; CSV strings go through `_convert_csv_labels`."""
    kind = _json_type(value)
    if task == "regression":
        if kind not in ("int", "float"):
            raise DataError(path, line, field, f"has wrong type {kind}: regression needs a number")
        result = float(value)
        if not math.isfinite(result):
            raise DataError(path, line, field, f"must be finite for regression, got {value!r}")
        return result
    if kind == "int":
        return int(value)
    if kind == "str":
        if not value.strip():
            raise DataError(path, line, field, "is empty")
        return str(value)
    raise DataError(
        path, line, field,
        f"has wrong type {kind}: classification labels must be str or int",
    )


class _LabelTypeGuard:
    """Refuse int and str classification labels in one read: 1 and "1" would be two classes."""

    def __init__(self) -> None:
        self.kind: str | None = None
        self.first: tuple[str, int] | None = None

    def check(self, path: Path, line: int, field: str, label: Any) -> None:
        if label is None or isinstance(label, float):
            return
        kind = _json_type(label)
        if self.kind is None:
            self.kind, self.first = kind, (str(path), line)
        elif kind != self.kind:
            assert self.first is not None
            raise DataError(
                path, line, field,
                f"label type {kind} but earlier rows have {self.kind} "
                f"(first at {self.first[0]}:{self.first[1]})",
            )


@dataclass(frozen=True)
class _Fields:
    text: str
    pair: str | None
    label: str | None
    task: str

    def needed(self) -> list[str]:
        return [f for f in (self.text, self.pair, self.label) if f is not None]


def _typed_row(
    path: Path | str, line: int, row: Any, fields: _Fields, guard: _LabelTypeGuard
) -> Example:
    """Validate one JSON/Parquet row (typed values) and build its Example."""
    if not isinstance(row, dict):
        raise DataError(path, line, None, f"row is a JSON {_json_type(row)}, expected an object")
    text = _check_text(path, line, fields.text, _get_field(path, line, row, fields.text))
    pair = None
    if fields.pair is not None:
        pair = _check_text(path, line, fields.pair, _get_field(path, line, row, fields.pair))
    label = None
    if fields.label is not None:
        raw = _get_field(path, line, row, fields.label)
        label = _check_label(path, line, fields.label, raw, fields.task)
        guard.check(path, line, fields.label, label)
    return Example(text, pair, label, str(path), line)


# --------------------------------------------------------------------------------------------
# Format readers (each yields validated Examples in file order)


_BLANK = object()  # a blank JSONL line: formatting, not a row


def _jsonl_value(path: Path, lineno: int, start: int, raw: bytes) -> Any:
    """One JSONL line decoded and parsed (`_BLANK` for a blank line); a bad line is a DataError."""
    text = _decode_line(path, lineno, start, raw, json_line=True)
    if not text.strip():
        return _BLANK
    try:
        return _DECODER.decode(text)
    except _DuplicateKey as e:
        raise DataError(path, lineno, e.key, "appears twice in the same object") from None
    except json.JSONDecodeError as e:
        raise DataError(path, lineno, None, f"invalid JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:
        raise DataError(path, lineno, None, "invalid JSON: nested too deeply") from None


def _read_jsonl(path: Path, fields: _Fields, guard: _LabelTypeGuard, bad: BadRows) -> Iterator[Example]:
    def example(lineno: int, start: int, raw: bytes) -> Example | None:
        row = _jsonl_value(path, lineno, start, raw)
        return None if row is _BLANK else _typed_row(path, lineno, row, fields, guard)

    for lineno, start, raw in _iter_binary_lines(path):
        ex = bad.attempt(lambda: example(lineno, start, raw))  # noqa: B023 (called at once)
        if ex is not None:
            yield ex


class _LineCounter:
    """Turn increasing character offsets into 1-based line numbers in O(total length)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.line = 1

    def at(self, pos: int) -> int:
        self.line += self.text.count("\n", self.pos, pos)
        self.pos = pos
        return self.line


def _json_error(path: Path, e: json.JSONDecodeError) -> DataError:
    return DataError(path, e.lineno, None, f"invalid JSON: {e.msg} (column {e.colno})")


def _decode_json_value(path: Path, text: str, pos: int, lines: _LineCounter) -> tuple[Any, int]:
    try:
        return _DECODER.raw_decode(text, pos)
    except _DuplicateKey as e:
        raise DataError(path, lines.at(pos), e.key, "appears twice in the same object") from None
    except json.JSONDecodeError as e:
        raise _json_error(path, e) from None
    except RecursionError:
        raise DataError(path, lines.at(pos), None, "invalid JSON: nested too deeply") from None


def _expect(path: Path, text: str, pos: int, char: str, lines: _LineCounter, what: str) -> int:
    """Skip whitespace, require `char`, return the offset just past it."""
    pos = _JSON_WS.match(text, pos).end()
    if not text.startswith(char, pos):
        raise DataError(path, lines.at(pos), None, f"invalid JSON: expected {what}")
    return pos + 1


def _iter_json_array(
    path: Path, text: str, pos: int, lines: _LineCounter
) -> Generator[tuple[int, Any], None, int]:
    """Walk the JSON array at `text[pos] == "["`, yielding (start line, element).

    Returns the offset just past the closing bracket.
    """
    pos = _JSON_WS.match(text, pos + 1).end()
    if text.startswith("]", pos):
        return pos + 1
    while True:
        line = lines.at(pos)
        value, pos = _decode_json_value(path, text, pos, lines)
        yield line, value
        pos = _JSON_WS.match(text, pos).end()
        if text.startswith(",", pos):
            pos = _JSON_WS.match(text, pos + 1).end()
        elif text.startswith("]", pos):
            return pos + 1
        else:
            raise DataError(path, lines.at(pos), None, "invalid JSON: expected ',' or ']' in the array")


def _locate_row_list(path: Path, text: str, pos: int, lines: _LineCounter) -> tuple[int, int]:
    """For a top-level object at `pos`, find its single list value.

    Returns (offset of that list, offset just past the object). Member values are scanned with
    the plain C decoder; the rows themselves are decoded strictly later, one by one.
    """
    seen: set[str] = set()
    lists: list[tuple[str, int]] = []
    pos = _JSON_WS.match(text, pos + 1).end()
    if text.startswith("}", pos):
        end = pos + 1
    else:
        while True:
            if not text.startswith('"', pos):
                raise DataError(path, lines.at(pos), None, "invalid JSON: expected a string key")
            key, pos = _decode_json_value(path, text, pos, lines)
            if key in seen:
                raise DataError(path, lines.at(pos), key, "appears twice in the same object")
            seen.add(key)
            pos = _expect(path, text, pos, ":", lines, "':' after the key")
            pos = _JSON_WS.match(text, pos).end()
            try:
                value, value_end = _PLAIN_DECODER.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise _json_error(path, e) from None
            if isinstance(value, list):
                lists.append((key, pos))
            pos = _JSON_WS.match(text, value_end).end()
            if text.startswith(",", pos):
                pos = _JSON_WS.match(text, pos + 1).end()
            elif text.startswith("}", pos):
                end = pos + 1
                break
            else:
                raise DataError(path, lines.at(pos), None, "invalid JSON: expected ',' or '}' in the object")
    if len(lists) != 1:
        found = [k for k, _ in lists]
        raise DataError(
            path, 1, None,
            "a top-level JSON object must hold exactly one list of rows; "
            f"found list values under {found or 'no keys'}",
        )
    return lists[0][1], end


def _iter_json_rows(path: Path, text: str) -> Generator[tuple[int, Any], None, None]:
    """Rows of a .json file: a top-level array, or an object with exactly one list value.

    Each row is decoded with `raw_decode` at its own offset, so its start line is exact.
    """
    lines = _LineCounter(text)
    pos = _JSON_WS.match(text, 0).end()
    if pos == len(text):
        raise DataError(path, None, None, "empty JSON file: expected an array of objects")
    if text[pos] == "[":
        end = yield from _iter_json_array(path, text, pos, lines)
    elif text[pos] == "{":
        array_pos, end = _locate_row_list(path, text, pos, lines)
        # The line counter only moves forward; restart it for the second pass over the rows.
        yield from _iter_json_array(path, text, array_pos, _LineCounter(text))
    else:
        raise DataError(
            path, lines.at(pos), None,
            f"expected a JSON array of objects (or an object holding one), found {text[pos]!r}",
        )
    trailing = _JSON_WS.match(text, end).end()
    if trailing != len(text):
        raise DataError(
            path, _LineCounter(text).at(trailing), None,
            "invalid JSON: extra data after the top-level value",
        )


def _read_json(path: Path, fields: _Fields, guard: _LabelTypeGuard, bad: BadRows) -> Iterator[Example]:
    # A JSON document cannot be streamed with the standard library; this format alone loads
    # its file.
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1)
        raise DataError(
            path, line, _json_field_with_bad_bytes(path, data, line),
            _bad_utf8_message(e.start, data[e.start : e.start + 1], column),
        ) from None
    if text.startswith(_BOM):
        text = " " + text[1:]  # keep offsets (and so columns) stable
    for line, row in _iter_json_rows(path, text):
        ex = bad.attempt(lambda: _typed_row(path, line, row, fields, guard))  # noqa: B023 (called at once)
        if ex is not None:
            yield ex


def _json_field_with_bad_bytes(path: Path, data: bytes, line: int) -> str | None:
    try:
        rows = list(_iter_json_rows(path, data.decode("utf-8", "surrogateescape")))
    except (DataError, RecursionError):
        return None
    # The bad byte is in the last row that starts at or before its line.
    candidates = [row for start, row in rows if start <= line]
    return _field_holding(candidates[-1], _ESCAPED_BYTE) if candidates else None


def _parse_csv(path: Path, fields: _Fields | None) -> tuple[list[str], dict[str, int], list[tuple[int, list[str]]]]:
    """(header, column index, [(line, cells)]) of a CSV/TSV file, strictly: wrong column counts,
    bad bytes and malformed quoting are errors naming file and line."""
    delimiter, kind = ("\t", "TSV") if path.suffix.lower() == ".tsv" else (",", "CSV")
    # Long documents exceed the csv module's default 128 KiB field limit.
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    rows: list[tuple[int, list[str]]] = []
    index: dict[str, int] = {}
    # surrogateescape lets the csv module keep going over a bad byte; we then report it with
    # the exact field (column) and byte offset.
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as fh:
        # TSV (IANA text/tab-separated-values, GLUE) has no quoting: a field may start with a quote
        # character that is text (SST-2 phrases do); CSV follows RFC 4180 quoting
        quoting = csv.QUOTE_NONE if kind == "TSV" else csv.QUOTE_MINIMAL
        reader = csv.reader(fh, delimiter=delimiter, strict=True, quoting=quoting)
        header: list[str] | None = None
        prev_end = 0
        while True:
            start = prev_end + 1
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                raise DataError(path, start, None, f"malformed {kind}: {e}") from None
            prev_end = reader.line_num
            if header is None:
                if row and row[0].startswith(_BOM):
                    row[0] = row[0][1:]
                header = row
                _check_csv_cells(path, start, None, row)
                _check_header(path, header, fields or _Fields(header[0] if header else "", None, None, "classification"))
                index = {name: i for i, name in enumerate(header)}
                continue
            if not row:
                continue  # blank line
            _check_csv_cells(path, start, header, row)
            if len(row) != len(header):
                raise DataError(
                    path, start, None,
                    f"expected {len(header)} columns got {len(row)} (delimiter {delimiter!r})",
                )
            rows.append((start, row))
    if header is None:
        raise DataError(path, 1, None, "empty file: a header row is required")
    return header, index, rows


def _csv_example(path: Path, line: int, row: list[str], index: dict[str, int], fields: _Fields) -> tuple[Example, str]:
    """One CSV record's texts checked, and its raw label (converted once the whole column is known)."""
    text = _check_text(path, line, fields.text, row[index[fields.text]])
    pair = None
    if fields.pair is not None:
        pair = _check_text(path, line, fields.pair, row[index[fields.pair]])
    raw = ""
    if fields.label is not None:
        raw = row[index[fields.label]]
        if not raw.strip():
            raise DataError(path, line, fields.label, "is empty")
    return Example(text, pair, None, str(path), line), raw


def _read_csv(path: Path, fields: _Fields, guard: _LabelTypeGuard, bad: BadRows) -> Iterator[Example]:
    _, index, rows = _parse_csv(path, fields)
    checked = [bad.attempt(lambda: _csv_example(path, line, row, index, fields)) for line, row in rows]  # noqa: B023
    good = [c for c in checked if c is not None]
    examples = [ex for ex, _ in good]
    if fields.label is None:
        yield from examples
        return
    labels = _convert_csv_labels(path, examples, [raw for _, raw in good], fields, bad)
    for ex, label in zip(examples, labels):
        if label is None:  # a regression value that is not a number: recorded by _convert_csv_labels
            continue
        labelled = bad.attempt(lambda: _guarded(path, ex, label, fields, guard))  # noqa: B023 (called at once)
        if labelled is not None:
            yield labelled


def _guarded(path: Path, ex: Example, label: int | float | str, fields: _Fields, guard: _LabelTypeGuard) -> Example:
    """`ex` with its label, once the label's type agrees with the earlier rows'."""
    assert fields.label is not None
    guard.check(path, ex.line, fields.label, label)
    return Example(ex.text, ex.text_pair, label, ex.source, ex.line)


def _check_header(path: Path, header: list[str], fields: _Fields) -> None:
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise DataError(path, 1, name, "appears twice in the header")
        seen.add(name)
    for field in fields.needed():
        if field not in seen:
            available = ", ".join(repr(h) for h in header)
            raise DataError(path, 1, field, f"is missing from the header row; available fields: {available}")


def _check_csv_cells(path: Path, line: int, header: list[str] | None, row: list[str]) -> None:
    for i, cell in enumerate(row):
        if _ESCAPED_BYTE.search(cell):
            bad_line, offset, bad, column = _first_bad_utf8(path)
            field = header[i] if header is not None and i < len(header) else None
            raise DataError(path, bad_line, field, _bad_utf8_message(offset, bad, column))


def _regression_value(path: Path, line: int, field: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise DataError(path, line, field, f"must be a number for regression, got {value!r}") from None
    if not math.isfinite(number):
        raise DataError(path, line, field, f"must be finite for regression, got {value!r}")
    return number


def _convert_csv_labels(
    path: Path, examples: list[Example], raw: list[str], fields: _Fields, bad: BadRows
) -> list[int | float | str | None]:
    """The label column converted; for regression a value that is not a number is recorded in `bad` (None)."""
    label = fields.label
    assert label is not None
    if fields.task == "regression":
        return [bad.attempt(lambda: _regression_value(path, ex.line, label, value))  # noqa: B023 (called at once)
                for ex, value in zip(examples, raw)]
    # All values in CSV are strings; a column that is entirely canonical ints (e.g. 0/1) is a
    # numeric label column, anything else keeps every label as the string it is.
    if raw and all(_CANONICAL_INT.fullmatch(v) for v in raw):
        return [int(v) for v in raw]
    return list(raw)


def _read_parquet(path: Path, fields: _Fields, guard: _LabelTypeGuard, bad: BadRows) -> Iterator[Example]:
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several unrelated types for corrupt files
        raise DataError(path, None, None, f"not a readable parquet file: {e}") from None
    names = pf.schema_arrow.names
    for field in fields.needed():
        if field not in names:
            available = ", ".join(repr(n) for n in names)
            raise DataError(path, None, field, f"is missing; available fields: {available}")
    row_index = 0
    try:
        batches = pf.iter_batches(batch_size=8192, columns=fields.needed())
        for batch in batches:
            columns = {name: batch.column(name).to_pylist() for name in fields.needed()}
            for i in range(batch.num_rows):
                row_index += 1
                row = {name: values[i] for name, values in columns.items()}
                ex = bad.attempt(lambda: _typed_row(path, row_index, row, fields, guard))  # noqa: B023 (called at once)
                if ex is not None:
                    yield ex
    except DataError:
        raise
    except Exception as e:
        raise DataError(path, row_index + 1, None, f"cannot read parquet row: {e}") from None


def _text_line(path: Path, lineno: int, start: int, raw: bytes, field: str) -> Example | None:
    text = _strip_eol(_decode_line(path, lineno, start, raw))
    if not text.strip():
        return None  # blank lines separate nothing in "lines" mode; they are formatting
    return Example(_check_text(path, lineno, field, text), None, None, str(path), lineno)


def _open_hub(spec: hub.HubSpec, needed: list[str]) -> Any:
    """The dataset of an `hf:` spec, with the fields it must have checked up front (as a Parquet schema is)."""
    dataset = hub.load(spec)
    names = hub.columns(dataset)
    for field in needed:
        if field not in names:
            raise DataError(spec.spec, None, field, f"is missing; available fields: {', '.join(repr(n) for n in names)}")
    return dataset


def _read_hub(spec: hub.HubSpec, fields: _Fields, guard: _LabelTypeGuard, bad: BadRows) -> Iterator[Example]:
    dataset = _open_hub(spec, fields.needed())
    for line, row in hub.rows(spec, dataset):
        ex = bad.attempt(lambda: _typed_row(spec.spec, line, row, fields, guard))  # noqa: B023 (called at once)
        if ex is not None:
            yield ex


def _inputs(spec: str | Path | Sequence[str | Path]) -> list[Path | hub.HubSpec]:
    """`expand_paths`, with each `hf:` item kept as a parsed HubSpec in its place."""
    items: list[str | Path] = [spec] if isinstance(spec, (str, Path)) else list(spec)
    out: list[Path | hub.HubSpec] = []
    seen: set[Path] = set()
    for item in items:
        if hub.is_hub(item):
            out.append(hub.parse(str(item)))
            continue
        for p in expand_paths(item):
            if p.resolve() not in seen:  # a file reached twice is read once, as expand_paths does
                seen.add(p.resolve())
                out.append(p)
    return out


def _read_text_lines(path: Path, field: str, bad: BadRows) -> Iterator[Example]:
    for lineno, start, raw in _iter_binary_lines(path):
        ex = bad.attempt(lambda: _text_line(path, lineno, start, raw, field))  # noqa: B023 (called at once)
        if ex is not None:
            yield ex


def _read_structured(path: Path, fields: _Fields, guard: _LabelTypeGuard, bad: BadRows) -> Iterator[Example]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path, fields, guard, bad)
    if suffix == ".json":
        return _read_json(path, fields, guard, bad)
    if suffix in (".csv", ".tsv"):
        return _read_csv(path, fields, guard, bad)
    return _read_parquet(path, fields, guard, bad)


# --------------------------------------------------------------------------------------------
# Public readers


def read_examples(
    path: str | Path | Sequence[str | Path],
    text_field: str = "text",
    pair_field: str | None = None,
    label_field: str | None = "label",
    task: str = "classification",
    bad: BadRows | None = None,
) -> list[Example]:
    """Read labelled examples from one or more files (see `expand_paths`), strictly.

    Formats by extension: .jsonl, .json, .csv, .tsv, .parquet. Plain text (.txt or any other
    extension) holds one example per non-blank line and is allowed only with
    `label_field=None` and `pair_field=None`, since it has no fields.

    Classification labels must be str or int (bool, float, null, list and object are errors);
    int and str labels may not be mixed within one call. In CSV/TSV a label column made only of
    canonical ints becomes int. Regression labels must be finite numbers and come back as
    float. With `label_field=None` every label is None and `task` is not consulted.
    Text is returned unaltered; it is only checked to be a non-blank string without NUL bytes.
    Bad rows are collected and raised together at the end; given `bad`, they are collected there
    and its owner raises them (`check`) once it has read every file, or, with `bad.skip`, reports
    them as left out.
    """
    if label_field is not None and task not in _TASKS:
        raise ValueError(f"task must be one of {_TASKS}, got {task!r}")
    fields = _Fields(text_field, pair_field, label_field, task)
    guard = _LabelTypeGuard()
    given, bad = bad, BadRows() if bad is None else bad
    examples: list[Example] = []
    for file in _inputs(path):
        if isinstance(file, hub.HubSpec):
            examples.extend(_read_hub(file, fields, guard, bad))
            continue
        if file.suffix.lower() in _STRUCTURED:
            examples.extend(_read_structured(file, fields, guard, bad))
            continue
        if label_field is not None or pair_field is not None:
            missing = label_field if label_field is not None else pair_field
            raise DataError(
                file, None, missing,
                "cannot be read from a plain-text file (one text per line, no fields); "
                "use .jsonl/.json/.csv/.tsv/.parquet or pass label_field=None",
            )
        examples.extend(_read_text_lines(file, text_field, bad))
    BadRows.finish(given, bad, examples)
    if not examples:
        raise DataError(_spec_name(path), None, None, "no examples found (the files hold no rows"
                        + (f" but the {len(bad.errors)} bad ones left out)" if bad.errors else ")"))
    return examples


@dataclass(frozen=True)
class Row:
    """One raw structured row (a JSON object, a CSV record, a Parquet row) and where it came from."""

    data: dict[str, Any]
    source: str
    line: int


def _jsonl_row(path: Path, lineno: int, start: int, raw: bytes) -> Row | None:
    value = _jsonl_value(path, lineno, start, raw)
    return None if value is _BLANK else _checked_row(path, lineno, value)


def _rows_of(path: Path, bad: BadRows) -> Iterator[Row]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        for lineno, start, raw in _iter_binary_lines(path):
            found = bad.attempt(lambda: _jsonl_row(path, lineno, start, raw))  # noqa: B023 (called at once)
            if found is not None:
                yield found
    elif suffix == ".json":
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            column = e.start - (data.rfind(b"\n", 0, e.start) + 1)
            raise DataError(path, line, _json_field_with_bad_bytes(path, data, line),
                            _bad_utf8_message(e.start, data[e.start: e.start + 1], column)) from None
        if text.startswith(_BOM):
            text = " " + text[1:]
        for line, row in _iter_json_rows(path, text):
            found = bad.attempt(lambda: _checked_row(path, line, row))  # noqa: B023 (called at once)
            if found is not None:
                yield found
    elif suffix == ".parquet":
        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several unrelated types for corrupt files
            raise DataError(path, None, None, f"not a readable parquet file: {e}") from None
        for i, row in enumerate(table.to_pylist(), start=1):
            yield Row(row, str(path), i)
    elif suffix in (".csv", ".tsv"):
        header, _, records = _parse_csv(path, None)
        for line, cells in records:
            yield Row(dict(zip(header, cells)), str(path), line)
    else:
        raise DataError(path, None, None, "structured rows need .jsonl, .json, .csv, .tsv or .parquet")


def convert_rows(rows: Sequence[Row], convert: Callable[[Row], T], bad: BadRows | None = None) -> list[T]:
    """`convert` applied to every row; the rows it refuses (DataError) are collected in `bad` and raised together
    (or, with `bad.skip`, left out)."""
    given, bad = bad, BadRows() if bad is None else bad
    out = [x for x in (bad.attempt(lambda: convert(row)) for row in rows) if x is not None]  # noqa: B023
    BadRows.finish(given, bad, out)
    return out


def _checked_row(path: Path, line: int, row: Any) -> Row:
    if not isinstance(row, dict):
        raise DataError(path, line, None, f"row is a JSON {_json_type(row)}, expected an object")
    return Row(row, str(path), line)


def read_rows(path: str | Path | Sequence[str | Path], bad: BadRows | None = None) -> list[Row]:
    """Every structured row of the files (see `expand_paths`), with file and line, strictly parsed.

    The stages whose rows are nested (SFT conversations, preference pairs) validate the fields
    themselves (`convert_rows`) and name file, line and field in their errors. Rows that do not
    parse are collected in `bad` as `read_examples` does.
    """
    rows: list[Row] = []
    given, bad = bad, BadRows() if bad is None else bad
    for file in _inputs(path):
        if isinstance(file, hub.HubSpec):
            rows.extend(Row(row, file.spec, line) for line, row in hub.rows(file, _open_hub(file, [])))
            continue
        if file.suffix.lower() not in _STRUCTURED:
            raise DataError(file, None, None, "rows need a structured file: .jsonl, .json, .csv, .tsv or .parquet")
        rows.extend(_rows_of(file, bad))
    BadRows.finish(given, bad, rows)
    if not rows:
        raise DataError(_spec_name(path), None, None, "no rows found (the files hold no rows)")
    return rows


def _read_paragraphs(path: Path) -> Iterator[Document]:
    block: list[str] = []
    first = 0
    for lineno, start, raw in _iter_binary_lines(path):
        text = _strip_eol(_decode_line(path, lineno, start, raw))
        if text.strip():
            if not block:
                first = lineno
            block.append(text)
        elif block:
            yield Document("\n".join(block), str(path), first)
            block = []
    if block:
        yield Document("\n".join(block), str(path), first)


def _read_whole_file(path: Path) -> Iterator[Document]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1)
        raise DataError(path, line, None, _bad_utf8_message(e.start, data[e.start : e.start + 1], column)) from None
    if text.startswith(_BOM):
        text = text[1:]
    if not text.strip():
        # In "files" mode the file is the document, so an empty one is an empty document.
        raise DataError(path, 1, None, "document is empty (the whole file is blank)")
    yield Document(text, str(path), 1)


def iter_documents(spec: str | Path | Sequence[str | Path], unit: str = "lines", text_field: str = "text",
                   bad: BadRows | None = None) -> Iterator[Document]:
    """The documents of `read_documents`, one at a time in the same order, without holding them all.

    Plain text files are read line by line; bad rows go to `bad` (the caller checks it at the end).
    """
    if unit not in _DOC_UNITS:
        raise ValueError(f"unit must be one of {_DOC_UNITS}, got {unit!r}")
    fields = _Fields(text_field, None, None, "classification")
    guard = _LabelTypeGuard()
    bad = BadRows() if bad is None else bad
    for file in _inputs(spec):
        if isinstance(file, hub.HubSpec):
            yield from (Document(e.text, e.source, e.line) for e in _read_hub(file, fields, guard, bad))
        elif file.suffix.lower() in _STRUCTURED:
            yield from (Document(e.text, e.source, e.line) for e in _read_structured(file, fields, guard, bad))
        elif unit == "lines":
            yield from (Document(e.text, e.source, e.line) for e in _read_text_lines(file, text_field, bad))
        elif unit == "paragraphs":
            yield from _read_paragraphs(file)
        else:
            yield from _read_whole_file(file)


def read_documents(
    spec: str | Path | Sequence[str | Path], unit: str = "lines", text_field: str = "text",
    bad: BadRows | None = None,
) -> list[Document]:
    """Read unlabelled documents from files, directories or globs.

    Plain text (.txt or any unknown extension) is split by `unit`: "lines" (one document per
    non-blank line; blank and whitespace-only lines are skipped as formatting), "paragraphs"
    (blocks separated by blank lines, joined with "\\n", line = the block's first line) or
    "files" (the whole file, line 1). Structured files (.jsonl/.json/.csv/.tsv/.parquet) give
    one document per row from `text_field`, validated like `read_examples` (no label needed),
    whatever `unit` says. Invalid UTF-8 is a DataError with the line and byte offset.
    """
    given, bad = bad, BadRows() if bad is None else bad
    docs = list(iter_documents(spec, unit, text_field, bad))
    BadRows.finish(given, bad, docs)
    if not docs:
        raise DataError(_spec_name(spec), None, None, "no documents found (the files are empty)")
    return docs


def check_labels_seen(
    train: Sequence[Example | Document], other: Sequence[Example | Document], split_name: str
) -> None:
    """Raise a DataError at the first `other` row whose classification label train lacks.

    A model cannot predict a class it never saw, so such a row would silently count as an
    error. Regression (float) labels and unlabelled rows are not checked.
    """
    # Documents have no label attribute at all; they are never checked.
    train_labels = (getattr(e, "label", None) for e in train)
    seen = {(type(lbl), lbl) for lbl in train_labels if _is_class_label(lbl)}
    for ex in other:
        label = getattr(ex, "label", None)
        if _is_class_label(label) and (type(label), label) not in seen:
            known = sorted((repr(lbl) for _, lbl in seen))
            shown = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "")
            raise DataError(
                ex.source, ex.line, "label",
                f"label {label!r} in the {split_name} split never appears in train "
                f"(train labels: {shown or 'none'})",
            )


def _is_class_label(label: Any) -> bool:
    return isinstance(label, (str, int)) and not isinstance(label, bool)
