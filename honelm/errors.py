"""Error types that honelm raises on purpose, so the CLI can print them without a traceback.

Every data problem is a `DataError` naming the file, the line (1-based, or None when the
problem is not tied to a line) and the field, so a user can find and fix the row.
"""

from __future__ import annotations

from pathlib import Path


class HonelmError(Exception):
    """Base class for errors whose message is meant for the user (printed without traceback)."""


class ConfigError(HonelmError):
    """A config file or override is invalid (unknown key, wrong type, bad value)."""


class DataError(HonelmError):
    """A bad input row or file: the message always names file, line and field."""

    def __init__(self, path: str | Path, line: int | None, field: str | None, message: str):
        self.path = str(path)
        self.line = line
        self.field = field
        self.message = message
        where = self.path if line is None else f"{self.path}:{line}"
        what = f" field '{field}'" if field else ""
        super().__init__(f"{where}:{what} {message}".replace(": ", ": ", 1))


class TestSplitAccessError(HonelmError):
    """Something other than `honelm test` tried to read the test split."""

    __test__ = False  # not a pytest test class


class TrainingError(HonelmError):
    """Training cannot continue (non-finite loss, unusable checkpoint, ...)."""
