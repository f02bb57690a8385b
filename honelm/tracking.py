"""One readable log line per event, `metrics.jsonl`, TensorBoard when installed, a progress bar, and the
MLflow / W&B sinks `run.trackers` asks for (honelm.trackers).

Only the main process writes. Every event is a JSON object with `event`, `step` and `time`
(see docs/run-directory.md for the schema); the same event is printed as one line, so the
terminal, `log.txt` and `metrics.jsonl` always tell the same story. A resumed run drops the events
of the steps it replays (`drop_after`); a metrics.jsonl deleted under a running run (its run
directory removed) stops the run at the next event instead of writing into nothing.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from honelm.errors import HonelmError
from honelm.trackers import Sink

console = Console(stderr=True, highlight=False, soft_wrap=True)
PHASE_SAYS_AFTER_S = 2.0
"""A phase (`phase`) that took at least this long says its duration in the log."""
_SHOWN: list[Progress] = []  # the phase display on screen (rich shows one live display at a time)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value == 0 or math.isnan(value) or math.isinf(value):
            return str(value)
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) < 1e-3:
            return f"{value:.2e}"
        return f"{value:.4f}"
    return str(value)


class Tracker:
    """Writes events; prints them; drives the optional progress bar."""

    def __init__(self, run_dir: Path | None, enabled: bool = True, tensorboard: bool = False, total_steps: int = 0,
                 progress: bool = True, sinks: Sequence[Sink] = ()):
        self.enabled = enabled
        self.run_dir = run_dir
        self.sinks = list(sinks)
        self._jsonl = None
        self._log = None
        self._tb = None
        self._progress: Progress | None = None
        self._task = None
        self._want_progress = False
        if not enabled or run_dir is None:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self._log = open(run_dir / "log.txt", "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(run_dir / "tb"))
            except ImportError:  # tensorboard is optional
                self._tb = None
        self._want_progress = progress
        if total_steps > 0:
            self.start_progress(total_steps)

    def start_progress(self, total_steps: int) -> None:
        """Show a progress bar for `total_steps` steps (interactive terminals only)."""
        if self.enabled and self._want_progress and self._progress is None and sys.stderr.isatty():
            self._progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=console, transient=True,
            )
            self._task = self._progress.add_task("train", total=total_steps, info="")
            self._progress.start()

    def say(self, line: str) -> None:
        """Print one line (and keep it in log.txt)."""
        if not self.enabled:
            return
        console.print(line, markup=False)
        if self._log:
            self._log.write(line + "\n")
            self._log.flush()

    def event(self, kind: str, step: int, **fields: Any) -> None:
        """Record an event in metrics.jsonl and print it as one line."""
        if not self.enabled:
            return
        record = {"event": kind, "step": step, **fields, "time": round(time.time(), 3)}
        if self._jsonl:
            if os.fstat(self._jsonl.fileno()).st_nlink == 0:  # unlinked: the run directory was removed under us
                raise HonelmError(f"{self.run_dir}: metrics.jsonl was deleted while the run was writing it (the run "
                                  "directory was removed?); the run stops here")
            self._jsonl.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._jsonl.flush()
        numbers = {f"{kind}/{k}": v for k, v in fields.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if self._tb is not None:
            for key, value in numbers.items():
                self._tb.add_scalar(key, value, step)
        for sink in self.sinks:
            if numbers:
                sink.metrics(step, numbers)
            if kind == "best" and self.run_dir is not None:
                sink.best(str((self.run_dir / "best").resolve()), step)
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in fields.items() if k != "message")
        message = fields.get("message", "")
        self.say(f"[step {step}] {kind}{(' ' + message) if message else ''}{(' ' + shown) if shown else ''}")

    def drop_after(self, step: int) -> int:
        """Remove from metrics.jsonl the events after `step` (and lines torn by a kill); returns how many went.

        A resumed run replays the steps after its checkpoint and logs them again: without this they
        would be there twice. The file is replaced atomically.
        """
        if not self._jsonl or self.run_dir is None:
            return 0
        path = self.run_dir / "metrics.jsonl"
        self._jsonl.flush()
        kept, dropped = [], 0
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if not isinstance(row, dict) or (isinstance(row.get("step"), int) and row["step"] > step):
                dropped += 1
                continue
            kept.append(line + "\n")
        if dropped:
            tmp = path.with_name(f".metrics.jsonl.{os.getpid()}")
            tmp.write_text("".join(kept), encoding="utf-8")
            self._jsonl.close()
            os.replace(tmp, path)
            self._jsonl = open(path, "a", encoding="utf-8")
        return dropped

    def progress(self, step: int, info: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step, info=info)

    def stop_progress(self) -> None:
        """Remove the progress bar (a later `start_progress` shows a new one)."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def close(self, failed: bool = False) -> None:
        """Flush and close everything; `failed` marks the trackers' runs as failed (an exception ended the run)."""
        self.stop_progress()
        for sink in self.sinks:
            sink.close(failed)
        self.sinks = []
        for handle in (self._jsonl, self._log):
            if handle:
                handle.close()
        self._jsonl = self._log = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


@contextlib.contextmanager
def phase(say: Callable[[str], None] | None, what: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
    """A stretch of work before (or outside) training that may take a while: reading, splitting, the duplicate scan,
    tokenising, teacher outputs, test scoring. While it runs, an interactive terminal (stderr) shows what it is and
    for how long so far, with a bar when `total` is given (advance it with the yielded function); when it took
    PHASE_SAYS_AFTER_S or longer, "`what`: 12.3 s" is said (the log), so no minute passes without a word. A phase
    inside another shows no display of its own (the outer one is on screen) but says its duration all the same."""
    started = time.perf_counter()
    shown: Progress | None = None
    if not _SHOWN and sys.stderr.isatty():
        columns = [SpinnerColumn(), TextColumn(what), *((BarColumn(), MofNCompleteColumn()) if total else ()),
                   TimeElapsedColumn()]
        shown = Progress(*columns, console=console, transient=True)
        task = shown.add_task(what, total=total)
        shown.start()
        _SHOWN.append(shown)

    def advance(n: int = 1) -> None:
        if shown is not None:
            shown.advance(task, n)
    try:
        yield advance
    finally:
        if shown is not None:
            shown.stop()
            _SHOWN.remove(shown)
        took = time.perf_counter() - started
        if say is not None and took >= PHASE_SAYS_AFTER_S:
            say(f"{what}: {took:.1f} s")
