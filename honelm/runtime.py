"""Where and how training runs: device, processes, precision, seeding, RNG state.

One place decides the device (CUDA if present, else CPU), whether several processes train
together (launched by `torchrun` or `accelerate launch`: both set RANK/WORLD_SIZE/LOCAL_RANK,
and accelerate's `PartialState` joins the process group with NCCL on GPU and gloo on CPU), and
whether bf16 autocast pays on this machine for this model (measured, not assumed: below ~10M
parameters the bf16 casts cost more than AMX saves).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import os
import random
import resource
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from accelerate import PartialState
from torch import nn


@dataclass
class Runtime:
    """The process's place in the world and the precision it trains with."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    precision: str = "fp32"  # "bf16" (autocast) or "fp32"
    precision_reason: str = ""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast context for forward passes (a no-op in fp32)."""
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.SUM)
        return value


def setup(threads: int | str = 0) -> Runtime:
    """Join the process group when launched with several processes; pick the device.

    On CPU, denormal floats are flushed to zero: the first steps from a random init produce
    many (tiny gradients, Adam second moments), and x86 handles them in microcode: a tiny fp32
    model measured 1,024 tokens/s with them and 17,900 without, with identical losses.
    """
    if isinstance(threads, int) and threads > 0:  # "auto" is decided by the loop, on the run's model (honelm.choices)
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # returns False where unsupported; then nothing changes
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        state = PartialState(cpu=not torch.cuda.is_available())
        device = state.device
        return Runtime(device=device, rank=state.process_index, world_size=state.num_processes,
                       local_rank=state.local_process_index)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return Runtime(device=device)


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 matmul units (AMX or AVX512-BF16)."""
    try:
        flags = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


BF16_CLEARLY_FASTER = 1.25
"""bf16 autocast is chosen on a CPU only when measured at least this much faster than fp32."""
BF16_CLEARLY_NOT = 1.05
"""Below this speed-up bf16 clearly does not pay; between the two the choice is fp32 by rule, not by noise."""


def choose_precision(requested: str, device: torch.device, probe: Callable[[str], None] | None) -> tuple[str, str]:
    """Pick bf16 autocast or fp32, with the reason as the log will say it.

    `probe(mode)` runs one forward+backward in that mode; with `requested == "auto"` on a CPU
    with bf16 units we time it both ways, with a margin so noise near one threshold cannot flip
    the choice between identical commands (three measured 1.14x, 1.16x, 1.17x against a single 1.15x
    threshold): bf16 when clearly faster (>= BF16_CLEARLY_FASTER), fp32 when clearly not
    (< BF16_CLEARLY_NOT), and in between fp32, the fixed default, said as such (honelm.choices
    caches the decision so later identical commands do not measure again).
    """
    if requested == "fp32":
        return "fp32", "fp32 (asked for)"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "bf16 autocast (GPU supports bf16)" if requested == "auto" else "bf16 autocast (asked for)"
        if requested == "bf16":
            raise RuntimeError("precision=bf16 asked for, but this GPU does not support bf16")
        return "fp32", "fp32 (GPU without bf16)"
    if requested == "bf16":
        return "bf16", "bf16 autocast (asked for)"
    if not cpu_has_fast_bf16():
        return "fp32", "fp32 (this CPU has no AMX/AVX512-BF16 units)"
    if probe is None:
        return "fp32", "fp32 (no probe batch)"
    timings: dict[str, list[float]] = {"fp32": [], "bf16": []}
    with preserved_rng():
        probe("fp32"), probe("bf16")  # warm-up: first calls pay one-time initialisation
        for _ in range(3):  # alternate so drifting machine load hits both modes alike
            for mode in ("fp32", "bf16"):
                t0 = time.perf_counter()
                probe(mode)
                timings[mode].append(time.perf_counter() - t0)
    fp32, bf16 = sorted(timings["fp32"])[1], sorted(timings["bf16"])[1]  # medians of three
    speedup = fp32 / max(bf16, 1e-9)
    if speedup >= BF16_CLEARLY_FASTER:
        return "bf16", f"bf16 autocast (measured {speedup:.2f}x faster than fp32 on this CPU)"
    if speedup < BF16_CLEARLY_NOT:
        return "fp32", f"fp32 (bf16 autocast measured {speedup:.2f}x: does not pay for this model size)"
    return "fp32", (f"fp32 (bf16 autocast measured {speedup:.2f}x, between {BF16_CLEARLY_NOT}x and "
                    f"{BF16_CLEARLY_FASTER}x: too close to call, so fp32, the fixed default; train.precision=bf16 "
                    "takes the speed-up)")


# One training step as the probe runs it: `step(model, batch, scale, autocast)`, the signature of
# `Objective.step` (forward, backward; the gradient is thrown away after).
ProbeStep = Callable[[nn.Module, dict[str, Any], float, Callable[[], contextlib.AbstractContextManager]], Any]


def _probe_once(runtime: Runtime, model: nn.Module, batch: dict[str, Any], step: ProbeStep, mode: str) -> None:
    step(model, batch, 1.0, Runtime(device=runtime.device, precision=mode).autocast)
    model.zero_grad(set_to_none=True)


def probe_step(runtime: Runtime, model: nn.Module, batch: dict[str, Any], step: ProbeStep, mode: str
               ) -> Callable[[], None]:
    """One training step of `model` on `batch` in precision `mode`, gradient thrown away: what probes time."""
    return functools.partial(_probe_once, runtime, model, batch, step, mode)


def training_precision(requested: str, runtime: Runtime, model: nn.Module, batch: dict[str, Any],
                       step: ProbeStep) -> tuple[str, str]:
    """The precision a run trains in, and why (`choose_precision`), measured with `step` on `batch`.

    `batch` is already on the device; the model is put in training mode (the probe must time what
    training does). With several processes every rank takes rank 0's choice, so all train alike.
    """
    model.train()
    precision, reason = choose_precision(requested, runtime.device, functools.partial(_probe_once, runtime, model,
                                                                                      batch, step))
    if runtime.distributed:  # every rank must agree: take rank 0's measurement
        flag = torch.tensor([1 if precision == "bf16" else 0], device=runtime.device)
        torch.distributed.broadcast(flag, 0)
        precision = "bf16" if int(flag) else "fp32"
    return precision, reason


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """All RNG states a resumed run must restore to continue bit-identically."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block without disturbing any RNG (used by the precision probe)."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


# ----------------------------------------------------------------------------------------------
# Peak memory of one run inside a longer process (a search or an ablation runs many in one).


def release_freed_memory(collect: bool = True) -> bool:
    """Collect garbage (unless `collect=False`: a full collection costs ~0.1-0.2 s in a process
    with transformers loaded), then ask glibc to return the free pages of its heap (`malloc_trim(0)`).

    glibc keeps freed small and medium blocks resident, so a process that trained one model and
    then another holds both runs' high-water heap. Returns whether malloc_trim could be called:
    only glibc has it (musl, macOS and Windows do not, and their allocators behave differently),
    so its absence is expected and not an error.
    """
    if collect:
        gc.collect()
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # no loadable libc, or a libc without malloc_trim (musl)
        return False
    if trim is None:
        return False
    trim(0)
    return True


class PeakMemory:
    """The process's resident-memory high-water mark, and what it covers since it was last reset.

    The mark itself is the kernel's (VmHWM), one per process; this object only remembers whether
    `reset` managed to restart it, so that `read` can label its number honestly ("run": since the
    last reset; "process": since the process started). The label is reported, never branched on.
    """

    def __init__(self) -> None:
        self.window = "process"  # until a reset succeeds, the peak is the whole process's
        self.runs_started = 0
        """How many runs started in this process (one reset each). A run that was not the first carries what the
        earlier ones left resident (freed heap kept by the allocator, caches), so its peak depends on the order
        runs went in: `honelm ablate` reports a cell's memory only when the cell's runs were the process's first."""

    def reset(self) -> str:
        """Start a fresh window for the run about to start; returns how it will be measured.

        Linux: writing 5 to /proc/self/clear_refs resets the resident high-water mark (VmHWM), so a
        run's peak does not include an earlier trial in the same process. Elsewhere the
        process-lifetime peak (ru_maxrss) is all there is, and is labelled so. CUDA: the
        allocator's peak counter is reset too. Before the reset, memory the earlier runs freed is
        handed back to the operating system (`release_freed_memory`): otherwise a long in-process
        search or ablation carries every earlier run's retained heap, and each run's "peak" starts
        from there.
        """
        self.runs_started += 1
        release_freed_memory()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            self.window = "run"
        except OSError:
            self.window = "process"
        return self.window

    def read(self, device: torch.device) -> dict[str, Any]:
        """Peak resident memory (MiB) in the current window (`peak_memory_window`: run or process),
        plus the CUDA allocator's peak on a GPU."""
        out: dict[str, Any] = {"peak_memory_window": self.window}
        try:
            with open("/proc/self/status") as handle:
                for line in handle:
                    if line.startswith("VmHWM:"):
                        out["peak_rss_mb"] = round(int(line.split()[1]) / 1024, 1)
        except OSError:
            maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
            out["peak_rss_mb"] = round(maxrss / (2**20 if sys.platform == "darwin" else 1024), 1)
        if device.type == "cuda":
            out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        return out


# One per process, as the kernel's high-water mark it describes is.
PROCESS_PEAK = PeakMemory()


def reset_peak_memory() -> str:
    """`PROCESS_PEAK.reset()`: called once per run by whoever starts it (the runner for each stage
    run, so each trial of a search), never inside fit(): benchmarks call fit() directly and compare
    whole-process peaks with other trainers."""
    return PROCESS_PEAK.reset()


def peak_memory_mb(device: torch.device) -> dict[str, Any]:
    """`PROCESS_PEAK.read(device)`: the peak since `reset_peak_memory` (or the process's)."""
    return PROCESS_PEAK.read(device)
