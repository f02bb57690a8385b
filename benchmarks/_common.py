"""Machine and measurement helpers shared by the benchmark scripts in this directory.

What the machine is (CPU model, bf16 units), what a process costs (peak and current RSS, CPU
time of this process and of the whole machine), a per-iteration clock (`StepClock`), waiting for
other processes to go quiet, running one contender in its own subprocess (`child_env`,
`run_child_process`: a child reports one `RESULT {json}` line on stdout), the rotate-order /
retry-when-contended round loop (`run_rounds`), and the small table and median helpers.

Not a benchmark itself and not part of honelm; the scripts import it as `_common` (their own
directory is on `sys.path`, whether they are run as scripts or imported).
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent

# A child whose timed span saw more than this many cores of other processes is "contended".
CONTENDED = 0.25


# ----------------------------------------------------------------------------------------------
# this process and this machine


def peak_rss_mib() -> float:
    """Peak resident set size of this process (VmHWM), MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rss_mib() -> float:
    """Current resident set size of this process (VmRSS), MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_bf16_units() -> str:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown"
    found = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    return ", ".join(found) or "none"


def cpu_counters() -> tuple[float, float]:
    """(CPU seconds of this process, busy CPU seconds of the whole machine) so far."""
    t = os.times()
    own = t.user + t.system
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait
    except (OSError, ValueError, IndexError):
        busy = math.nan
    return own, busy


class StepClock:
    """Timestamps one fixed point of every iteration; the timed span is marks[W] .. marks[W+S].

    Also samples CPU time at both ends of the span: `other_load` is the CPU the rest of the
    machine used meanwhile, in cores (near 0 on an idle machine; another training job shows as ~1+).

    `sync`, when given, is called before every timestamp: on a GPU pass `torch.cuda.synchronize`,
    so a mark is taken when the work queued so far has finished rather than when it was launched
    (kernels run asynchronously; without it the span would time the CPU's launching). None (the
    CPU case) reads the clock directly.
    """

    def __init__(self, warmup: int, steps: int, sync: Callable[[], None] | None = None):
        self.warmup, self.steps = warmup, steps
        self.sync = sync
        self.marks: list[float] = []
        self.rss_at_end: float | None = None
        self.cpu: list[tuple[float, float]] = []

    def mark(self) -> None:
        if self.sync is not None:
            self.sync()
        self.marks.append(time.perf_counter())
        if len(self.marks) in (self.warmup + 1, self.warmup + self.steps + 1):
            self.cpu.append(cpu_counters())
        if len(self.marks) == self.warmup + self.steps + 1:
            self.rss_at_end = peak_rss_mib()

    def load(self) -> dict[str, float]:
        (own0, busy0), (own1, busy1) = self.cpu[0], self.cpu[-1]
        wall = self.seconds()
        own = own1 - own0
        return {"own_cores": own / wall, "other_load": max(0.0, (busy1 - busy0) - own) / wall}

    def seconds(self) -> float:
        need = self.warmup + self.steps + 1
        if len(self.marks) < need:
            raise RuntimeError(f"only {len(self.marks)} step marks, expected at least {need}")
        return self.marks[self.warmup + self.steps] - self.marks[self.warmup]

    def step_times(self) -> list[float]:
        m = self.marks[self.warmup: self.warmup + self.steps + 1]
        return [b - a for a, b in zip(m, m[1:])]


def other_busy(window: float = 3.0) -> float:
    """Cores kept busy by other processes over `window` seconds (this process sleeps meanwhile)."""
    own0, busy0 = cpu_counters()
    time.sleep(window)
    own1, busy1 = cpu_counters()
    return max(0.0, (busy1 - busy0) - (own1 - own0)) / window


def wait_for_idle(limit: float, threshold: float = CONTENDED, window: float = 3.0) -> float:
    """Wait (at most `limit` s) until other processes use under `threshold` cores; returns the last reading.

    The first reading samples `window` seconds (later ones, while waiting, 5 s).
    """
    deadline = time.monotonic() + limit
    busy = other_busy(window)
    said = False
    while busy >= threshold and time.monotonic() < deadline:
        if not said:
            print(f"    waiting for the machine to go idle (other processes use {busy:.1f} cores)", flush=True)
            said = True
        busy = other_busy(5.0)
    return busy


# ----------------------------------------------------------------------------------------------
# children and rounds (parent)


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child: this one, quiet transformers and tokenizers, the repository importable.

    `extra` adds or overrides variables (e.g. HF_HUB_OFFLINE="1", MALLOC_MMAP_THRESHOLD_="131072").
    """
    return dict(os.environ, TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false",
                PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")])), **extra)


def run_child_process(cmd: list[str], env: dict[str, str], key: str, name: str) -> dict[str, Any]:
    """Run `cmd` in the repository root; the dict of its `RESULT {json}` line, or {key: name, "error": ...}.

    The error holds the exit status, the run time and the last 25 lines of stderr (stdout when
    stderr is empty).
    """
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO))
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-25:])
    return {key: name, "error": f"exit {proc.returncode} after {time.perf_counter() - t0:.0f}s:\n{tail}"}


def run_rounds(contenders: list[str], rounds: int, idle_wait: float | None, retries: int,
               run_one: Callable[[str], dict[str, Any]], describe: Callable[[dict[str, Any]], str],
               label: Callable[[str], str] = str, rerun: str = "running {} again", idle_window: float = 3.0
               ) -> dict[str, list[dict[str, Any]]]:
    """Run every contender once per round, in an order rotated by one each round; {name: [result per round]}.

    Before each attempt waits for the machine to go idle (at most `idle_wait` s, first sampling
    `idle_window` s; None: do not check); `run_one(name)` runs one child and returns its result, with "error" when it failed.
    A successful attempt prints "  <label(name)>: <describe(result)>"; one whose timed span was
    contended (other_load > CONTENDED) runs again, at most `retries` times, printing
    "    contended: <rerun.format(label(name))>". Kept per round: the least contended successful
    attempt (the last attempt when all failed), with "attempts" = how many were made.
    """
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in contenders}
    for rnd in range(rounds):
        order = contenders[rnd % len(contenders):] + contenders[:rnd % len(contenders)]  # rotate: no fixed slot
        print(f"round {rnd + 1}/{rounds}", flush=True)
        for name in order:
            tries: list[dict[str, Any]] = []
            while True:
                if idle_wait is not None:
                    wait_for_idle(idle_wait, window=idle_window)
                r = run_one(name)
                tries.append(r)
                if "error" in r:
                    print(f"  {label(name)}: FAILED", flush=True)
                    break
                print(f"  {label(name)}: {describe(r)}", flush=True)
                if r["other_load"] <= CONTENDED or len(tries) > retries:
                    break
                print(f"    contended: {rerun.format(label(name))}", flush=True)
            ok = [t for t in tries if "error" not in t]
            best = min(ok, key=lambda t: t["other_load"]) if ok else tries[-1]
            best["attempts"] = len(tries)
            runs[name].append(best)
    return runs


# ----------------------------------------------------------------------------------------------
# reporting


def fmt_row(cells: list[str], widths: list[int]) -> str:
    return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def pick_contenders(spec: str, known: tuple[str, ...]) -> list[str] | None:
    """The comma-separated contenders of `spec`, in its order; None, after printing which, when one is unknown."""
    names = [c.strip() for c in spec.split(",") if c.strip()]
    unknown = [c for c in names if c not in known]
    if unknown:
        print(f"unknown contender(s) {unknown}; known: {', '.join(known)}")
        return None
    return names


def machine_info(threads: int, **libraries: str) -> dict[str, Any]:
    """The machine and library versions a throughput result names (torch, python; `libraries`: the others)."""
    import torch

    return {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            **libraries, "python": platform.python_version()}


def write_json(path: str, payload: dict[str, Any]) -> None:
    """A benchmark's --json file, and the line that says where it went."""
    Path(path).write_text(json.dumps(payload, indent=2))
    print(f"wrote {path}")
