"""The test ledger: every look at a test split, by every run of a project, in one file.

`honelm test` refuses a second look by the same run (honelm.protocol.test), but ten runs can each
take their one look at the same split and then be compared on test, which is selecting on test.
The ledger makes that visible: every `honelm test` appends its look to PROJECT/.honelm/test_ledger.jsonl,
one JSON object a line,

    {"time": 1767000000.0, "test_hash": "9f2c…", "test_source": "ratio", "run_dir": "/abs/run", "stage": "classify",
     "look": 1, "forced": false, "group": "/abs/run", "metrics": {"test_accuracy": 0.81, ...},
     "earlier_looks": 2, "earlier_runs": 2, "flagged": true}

keyed by the test split's content hash (`split_manifest.json` → hashes.test: the sorted content
hashes of the rows, or a supplied test file's sha256; honelm.data.splits), so every run on the same
split shares one count whatever its stage, search or ablation. A look is FLAGGED when another run
(outside its `group`: the seeds of one configuration an ablation chose are one group) had already
looked at that split: `honelm test` prints a warning and the ledger keeps it. Nothing is refused: a
teacher, a student and a control tested on one split for `honelm compare` is legitimate; it is the
count, shown by every report that reads the ledger ("this test split has been looked at N times
by M runs"), that keeps such comparisons honest.

Where the ledger lives (`ledger_path`): `--ledger PATH` where a command offers it; else the
nearest directory at or above the run (or search, or ablation) directory that holds a `.honelm/`
directory, looking no higher than the current directory when the run lies inside it (else no higher
than the run directory's parent); else that highest directory (the current directory, or the run's parent).
Make `.honelm/` in the directory that holds all of a project's runs to give them one ledger.
"""

from __future__ import annotations

import fcntl
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from honelm.reporting import table

LEDGER_DIR = ".honelm"
LEDGER_FILE = "test_ledger.jsonl"


def ledger_path(start: str | Path, explicit: str | Path | None = None) -> Path:
    """The ledger of the run, search or ablation directory `start` (see the module docstring)."""
    if explicit:
        return Path(explicit)
    here = Path(start).resolve()
    cwd = Path.cwd().resolve()
    # never above the project: the cwd when the run lies inside it, else the run's parent (a stray .honelm/ in
    # /tmp or the home directory must not collect every run on the machine)
    root = cwd if here == cwd or cwd in here.parents else here.parent
    for directory in (here, *here.parents):
        if (directory / LEDGER_DIR).is_dir():
            return directory / LEDGER_DIR / LEDGER_FILE
        if directory == root:
            break
    return root / LEDGER_DIR / LEDGER_FILE


def test_hash_of(run_dir: Path) -> str | None:
    """The test split hash a run recorded in split_manifest.json (None when it recorded none)."""
    try:
        manifest = json.loads((run_dir / "split_manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    hashes = manifest.get("hashes") if isinstance(manifest, dict) else None
    value = hashes.get("test") if isinstance(hashes, dict) else None
    return str(value) if value else None


test_hash_of.__test__ = False  # type: ignore[attr-defined]  # a name starting with "test": not a pytest test


def read_ledger(path: Path) -> list[dict[str, Any]]:
    """Every look in the ledger (none when it does not exist; a torn or unreadable line is skipped)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def looks_on(test_hash: str | None, ledgers: Iterable[Path]) -> list[dict[str, Any]]:
    """The looks at the split `test_hash` in the ledgers (a ledger named twice is read once), oldest first."""
    if not test_hash:
        return []
    seen: dict[tuple[Any, ...], dict[str, Any]] = {}
    for path in dict.fromkeys(Path(p).resolve() for p in ledgers):
        for row in read_ledger(path):
            if row.get("test_hash") == test_hash:
                seen.setdefault((row.get("run_dir"), row.get("time"), row.get("look")), row)
    return sorted(seen.values(), key=lambda r: r.get("time") or 0)


@dataclass(frozen=True)
class Count:
    """How often a test split was looked at, and by how many runs."""

    looks: int
    runs: int

    def line(self) -> str:
        """"this test split has been looked at N times by M runs"."""
        times = "once" if self.looks == 1 else f"{self.looks} times"
        return f"this test split has been looked at {times} by {self.runs} run{'s' if self.runs != 1 else ''}"


def count(looks: list[dict[str, Any]]) -> Count:
    return Count(len(looks), len({r.get("run_dir") for r in looks}))


def record_look(ledger: Path, run_dir: Path, manifest: dict[str, Any], stage: str, look: int, forced: bool,
                metrics: dict[str, Any], group: str | None = None) -> dict[str, Any]:
    """Append a look to the ledger and return it; `flagged` when a run outside `group` looked at the split before."""
    run = str(Path(run_dir).resolve())
    hashes = manifest.get("hashes") if isinstance(manifest.get("hashes"), dict) else {}
    test_hash = hashes.get("test")
    earlier = looks_on(test_hash, [ledger])
    others = [r for r in earlier if r.get("run_dir") != run and r.get("group", r.get("run_dir")) != (group or run)]
    entry = {"time": time.time(), "test_hash": test_hash, "test_source": manifest.get("test_source"),
             "n_examples": (manifest.get("counts") or {}).get("test"), "run_dir": run, "stage": stage, "look": look,
             "forced": forced, "group": group or run,
             "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
             "earlier_looks": len(earlier), "earlier_runs": count(earlier).runs, "flagged": bool(others)}
    ledger.parent.mkdir(parents=True, exist_ok=True)
    with open(ledger, "a", encoding="utf-8") as handle:  # one line per look; the lock keeps concurrent lines whole
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.write(json.dumps(entry, default=str) + "\n")
        fcntl.flock(handle, fcntl.LOCK_UN)
    return entry


def warning(entry: dict[str, Any], ledger: Path) -> str | None:
    """What `honelm test` prints for a flagged look (None otherwise)."""
    if not entry.get("flagged"):
        return None
    now = count(looks_on(entry.get("test_hash"), [ledger]))
    return (f"warning: {now.line()} (ledger {ledger}). Comparing runs by their test numbers, or keeping the one that "
            "tested best, is selecting on test: choose on validation and report the chosen run's one look.")


def report_lines(test_hash: str | None, ledgers: Iterable[Path], shown: int = 12) -> list[str]:
    """The ledger's section of a report: the count line and, when more than one run looked, who looked."""
    paths = list(dict.fromkeys(Path(p) for p in ledgers))
    where = ", ".join(f"`{p}`" for p in paths)
    if not test_hash:
        return ["## Test ledger", "", "No test split hash recorded (split_manifest.json): the ledger cannot be read.", ""]
    looks = looks_on(test_hash, paths)
    n = count(looks)
    if not looks:
        return ["## Test ledger", "", f"The ledger ({where}) records no look at this test split yet.", ""]
    text = n.line()
    lines = ["## Test ledger", "", (f"**{text[0].upper() + text[1:]}**" if n.runs > 1 else text[0].upper() + text[1:])
             + f" (test hash `{test_hash[:16]}…`; ledger {where})."]
    if n.runs > 1:
        lines += ["", "Every one of these runs saw the same test examples: comparing them on test, or keeping the one "
                  "that tested best, is selecting on test, and its number is optimistic. Only a run chosen on "
                  "validation and then tested once gives an unbiased estimate.", ""]
        by_run: dict[str, list[dict[str, Any]]] = {}
        for r in looks:
            by_run.setdefault(str(r.get("run_dir")), []).append(r)
        rows = [[f"`{run}`", rs[0].get("stage") or "—", len(rs),
                 time.strftime("%Y-%m-%d %H:%M", time.gmtime(rs[0].get("time") or 0)) + " UTC",
                 "yes" if any(x.get("flagged") for x in rs) else "no"] for run, rs in list(by_run.items())[:shown]]
        lines += table(["run", "stage", "looks", "first look", "flagged"], rows)
        if len(by_run) > shown:
            lines.append(f"… and {len(by_run) - shown} more runs.")
    return lines + [""]

