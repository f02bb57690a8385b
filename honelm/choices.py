"""Choices that repeat: the torch thread count and the training precision, decided once and remembered.

Both are measured (a few timed forward+backward passes on the run's own model and a probe batch),
and both measurements are noisy: on a machine that is doing something else, two identical commands
can time bf16 at 1.14x and 1.17x, or one thread against two the other way round. A measurement that
decides a coin flip each time makes identical seeded commands train differently. So:

- A decision is keyed by what it depends on: the machine (CPU model, logical cores, torch version,
  device), the model's shape (class, parameter counts), the probe batch's shape and the objective.
  It is stored in a small JSON cache, HONELM_CACHE_DIR/choices.json (default $XDG_CACHE_HOME/honelm or ~/.cache/honelm: honelm.config.cache_root), and
  later identical commands take it from there (`train.probe_cache`: true = reuse, false = measure and
  keep nothing, refresh = measure again and replace). The run records what it used in
  RUN/choices.json, which `--resume` reads, so a resumed run keeps its threads even if the cache
  changed; the precision is also in every checkpoint (`TrainState.precision`).
- Each measurement decides with a margin: threads = the FEWEST whose median time is within 10% of
  the fastest (a near-tie never flips to more threads); bf16 only when clearly faster (>= 1.25x),
  fp32 when clearly not (< 1.05x), and in between fp32, the fixed default, said as such
  (honelm.runtime.choose_precision).
- A busy machine (1-minute load average above the logical core count) is named in the log with
  what to do: torch's own default then starts as many threads as there are cores, which compete
  with the other work (measured 3.5x slower than one thread).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from honelm import runtime as rt
from honelm.config import cache_root

CACHE_FILE = "choices.json"
RUN_FILE = "choices.json"
"""Where a run records the choices it trained with (RUN/choices.json; `--resume` reads it)."""
THREAD_MARGIN = 1.10
"""A thread count within this factor of the fastest counts as fast: the fewest such threads win."""
_FORMAT = 1


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (else what the platform module says)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """What a decision depends on about the machine."""
    out: dict[str, Any] = {"cpu": cpu_name(), "cores": os.cpu_count() or 1, "torch": torch.__version__}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def choice_key(model: torch.nn.Module, batch: dict[str, Any], objective: str, device: torch.device) -> dict[str, Any]:
    """The cache key: machine, model shape, batch shape, objective and device."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    shapes = {k: list(v.shape) for k, v in sorted(batch.items()) if isinstance(v, torch.Tensor)}
    return {"machine": machine(), "model": {"class": type(model).__name__, "parameters": total,
                                             "trainable": trainable},
            "batch": shapes, "objective": objective, "device": device.type}


def key_id(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()[:16]


class ChoiceCache:
    """The JSON cache of decisions, one entry per key; unreadable files are treated as empty (and replaced)."""

    def __init__(self, directory: Path | None = None) -> None:
        self.path = (directory or cache_root()) / CACHE_FILE

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        entries = data.get("entries") if isinstance(data, dict) and data.get("format") == _FORMAT else None
        return entries if isinstance(entries, dict) else {}

    def get(self, key: dict[str, Any], what: str) -> dict[str, Any] | None:
        entry = self._read().get(key_id(key), {})
        found = entry.get(what) if entry.get("key") == key else None
        return found if isinstance(found, dict) else None

    def put(self, key: dict[str, Any], what: str, decision: dict[str, Any]) -> str:
        """Store one decision (atomically: a temporary file renamed over the cache); returns a warning when the
        cache cannot be written (training goes on: the run still records its choice), else ""."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # read, add and replace under one lock: two runs starting together would otherwise each write the
            # cache as it was before the other's decision, and the later rename would drop the earlier entry
            with open(self.path.with_name(f".{CACHE_FILE}.lock"), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                entries = self._read()
                entry = entries.get(key_id(key), {})
                entry = entry if entry.get("key") == key else {"key": key}
                entry[what] = decision
                entries[key_id(key)] = entry
                tmp = self.path.with_name(f".{CACHE_FILE}.{os.getpid()}")
                tmp.write_text(json.dumps({"format": _FORMAT, "entries": entries}, indent=1), encoding="utf-8")
                os.replace(tmp, self.path)
        except OSError as e:  # a read-only home must not stop training: the decision is still recorded in the run
            return (f"warning: {self.path}: cannot write the probe cache ({e.strerror or e}); set HONELM_CACHE_DIR to "
                    "a writable directory, or train.probe_cache=false")
        return ""


def load_average() -> float | None:
    """The 1-minute load average (None where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def busy_warning(threads: int, measured: bool) -> str:
    """A warning when the machine is busy (load above the logical cores), with what to do; "" otherwise.
    `measured`: the thread count was measured just now, under this load (and cached)."""
    load, cores = load_average(), os.cpu_count() or 1
    if load is None or load <= cores:
        return ""
    if measured:
        advice = ("the thread count was measured under this load and is cached: once the machine is idle, "
                  "train.probe_cache=refresh measures it again")
    elif threads > 1:
        advice = "train.threads=1 usually trains faster while it lasts (or wait for the other work to finish)"
    else:
        advice = "training is slower than on an idle machine (wait for the other work to finish for full speed)"
    return (f"warning: the machine is busy (load average {load:.1f} on {cores} logical cores): torch threads compete "
            f"with other processes; {advice}")


def thread_candidates(cores: int) -> list[int]:
    """1, 2, 4, ... up to the logical core count, and the core count itself."""
    out, n = [], 1
    while n < cores:
        out.append(n)
        n *= 2
    return [*out, cores]


def time_threads(probe: Callable[[], None], candidates: list[int], rounds: int = 3) -> dict[int, float]:
    """Median seconds of `probe()` with each thread count (one warm-up each; rounds alternate so drifting load
    hits every count alike). The thread count is left at what it was."""
    before = torch.get_num_threads()
    timings: dict[int, list[float]] = {n: [] for n in candidates}
    try:
        with rt.preserved_rng():
            for n in candidates:
                torch.set_num_threads(n)
                probe()
            for _ in range(rounds):
                for n in candidates:
                    torch.set_num_threads(n)
                    t0 = time.perf_counter()
                    probe()
                    timings[n].append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return {n: statistics.median(ts) for n, ts in timings.items()}


def pick_threads(medians: dict[int, float]) -> int:
    """The fewest threads whose median is within THREAD_MARGIN of the fastest."""
    fastest = min(medians.values())
    return min(n for n, t in medians.items() if t <= fastest * THREAD_MARGIN)


@dataclass
class ThreadChoice:
    """The thread count a run trains with, why, and what was measured (empty when nothing was)."""

    threads: int
    reason: str
    measured: dict[int, float]
    warning: str = ""
    fresh: bool = False
    """Measured just now (not taken from the cache, the run's record or the config)."""


def _describe(medians: dict[int, float]) -> str:
    return ", ".join(f"{n}: {t * 1000:.1f} ms" for n, t in sorted(medians.items()))


def decide_threads(requested: int | str, device: torch.device, world: int, probe: Callable[[], None],
                   key: dict[str, Any], cache_mode: bool | str) -> ThreadChoice:
    """The torch thread count for training: asked for, from OMP_NUM_THREADS, from the cache, or measured."""
    if requested != "auto":
        if int(requested) > 0:
            return ThreadChoice(int(requested), f"{requested} (asked for)", {})
        return ThreadChoice(torch.get_num_threads(), f"{torch.get_num_threads()} (torch's default: train.threads=0)", {})
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return ThreadChoice(int(omp), f"{omp} (from OMP_NUM_THREADS)", {})
    if device.type != "cpu":
        return ThreadChoice(torch.get_num_threads(), f"{torch.get_num_threads()} (torch's default: the model runs "
                                                     f"on {device.type})", {})
    cores = os.cpu_count() or 1
    if world > 1:  # the processes share the machine: a probe in one would measure without the others
        share = max(1, cores // world)
        return ThreadChoice(share, f"{share} ({cores} logical cores shared by {world} processes)", {})
    cache = ChoiceCache()
    if cache_mode is True:
        cached = cache.get(key, "threads")
        if cached is not None and isinstance(cached.get("threads"), int):
            measured = {int(k): float(v) for k, v in cached.get("measured_s", {}).items()}
            return ThreadChoice(cached["threads"], f"{cached['threads']} (cached: measured {cached.get('when', '?')}"
                                f" as {_describe(measured)}; train.probe_cache=refresh measures again)", measured)
    medians = time_threads(probe, thread_candidates(cores))
    chosen = pick_threads(medians)
    warning = ""
    if cache_mode is not False:
        warning = cache.put(key, "threads", {"threads": chosen, "when": time.strftime("%Y-%m-%d %H:%M"),
                                             "load": load_average(),
                                             "measured_s": {str(n): round(t, 6) for n, t in medians.items()}})
    return ThreadChoice(chosen, f"{chosen} (measured {_describe(medians)} per probe step; the fewest within "
                        f"{round((THREAD_MARGIN - 1) * 100)}% of the fastest)", medians, warning, fresh=True)


def precision_is_measured(requested: str, device: torch.device) -> bool:
    """Whether `honelm.runtime.choose_precision` would time bf16 against fp32 (auto on a CPU with bf16 units):
    only such decisions are cached, the others follow from rules."""
    return requested == "auto" and device.type == "cpu" and rt.cpu_has_fast_bf16()


def decide_precision(requested: str, runtime: rt.Runtime, model: torch.nn.Module, batch: dict[str, Any],
                     step: rt.ProbeStep, key: dict[str, Any], cache_mode: bool | str) -> tuple[str, str, str]:
    """(precision, reason, cache warning): a measured decision from the cache when there is one, else
    `honelm.runtime.training_precision` (whose measurement is then cached)."""
    measured = precision_is_measured(requested, runtime.device) and not runtime.distributed
    cache = ChoiceCache()
    if measured and cache_mode is True:
        cached = cache.get(key, "precision")
        if cached is not None and cached.get("precision") in ("bf16", "fp32"):
            return cached["precision"], f"{cached['reason']} (cached {cached.get('when', '?')})", ""
    precision, reason = rt.training_precision(requested, runtime, model, batch, step)
    warning = ""
    if measured and cache_mode is not False:
        warning = cache.put(key, "precision", {"precision": precision, "reason": reason,
                                               "when": time.strftime("%Y-%m-%d %H:%M")})
    return precision, reason, warning


def read_recorded(run_dir: Path) -> dict[str, Any] | None:
    """RUN/choices.json, when the run recorded its choices."""
    path = run_dir / RUN_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def record(run_dir: Path, payload: dict[str, Any]) -> None:
    """Write RUN/choices.json (what the run trains with and what was measured)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{RUN_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps(payload, indent=2), encoding="utf-8")
    os.replace(tmp, run_dir / RUN_FILE)
