"""`honelm report DIR` for the kinds of directory: a run, a search, an ablation, a boost (an ablation with a summary).

A run's report is honelm.protocol.report's. A search's shows the space, every trial (value,
state, parameters), the best trial and its config, and Optuna's plots; an ablation's shows the
table a reader came for (mean ± std, difference from baseline with its interval, verdict, cost),
the chart with intervals, each cell, and each variant's chosen hyperparameters. All three show the
project's test ledger on their test split: how many times, by how many runs, it has been looked at. Both are written
as report.md and a self-contained report.html, built only from the files the search or
ablation leaves behind (so they can be rewritten at any time, also for an unfinished one).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from honelm.errors import HonelmError
from honelm.protocol import ablate, boost, search
from honelm.protocol.report import write_report


def kind_of(path: Path) -> str:
    if boost.is_boost(path):  # a boost directory is an ablation too: its report adds boost's summary on top
        return "boost"
    if (path / "search.json").is_file():
        return "search"
    if (path / "ablation.json").is_file():
        return "ablation"
    return "run"


def write_any(path: str | Path, ledger: str | Path | None = None) -> Path:
    """Write the report of a run, search or ablation directory; returns report.md's path. `ledger`: the test
    ledger the report reads (default: honelm.protocol.ledger.ledger_path of the directory)."""
    path = Path(path)
    if not path.is_dir():
        raise HonelmError(f"{path}: no such run, search or ablation directory")
    kind = kind_of(path)
    if kind == "search":
        return search.write_report(path, ledger)
    if kind == "ablation":
        return ablate.write_report(path, ledger)
    if kind == "boost":
        return boost.write_report(path, ledger)
    return write_report(path, ledger)


def main(argv: list[str]) -> Path:
    """`honelm report DIR`."""
    p = argparse.ArgumentParser(prog="honelm report", description="Write DIR/report.md and a self-contained "
                                "DIR/report.html (plots embedded) for a run, a search or an ablation directory.")
    p.add_argument("run", help="run, search or ablation directory")
    p.add_argument("--ledger", default=None, metavar="PATH", help="the project's test ledger to read (default: "
                   ".honelm/test_ledger.jsonl in the nearest directory above DIR that has .honelm/, else the current "
                   "directory when DIR is inside it, else DIR's parent)")
    args = p.parse_args(argv)
    path = write_any(args.run, args.ledger)
    print(path)
    print(path.with_suffix(".html"))
    return path
