"""What a run's model costs to use: parameters, bytes on disk, latency, throughput and peak memory.

`honelm compare` (honelm.protocol.compare) reads quality from each run's recorded test look; the
costs are measured here, on inputs that are never test rows:

- **Opening a run** (`open_run`): its stage (from the registry), its config, its split rebuilt by the
  stage's own `splits` (the test split stays locked: nothing here opens it) and best/'s tokenizer;
  `load` then loads best/ with `Stage.load_best` (an adapter directory is merged into its base) and
  builds the stage's `inference` over the timing rows, each model encoding them with its OWN tokenizer.
- **Latency and throughput** (`time_models`): all models live in one process and are measured in
  rounds; within a round each model in turn runs `latency_examples` forwards at batch 1, then
  `throughput_batches` forwards at batch `batch_size`, and the order of the models rotates from
  round to round, so machine noise (another process, frequency scaling) falls on all of them alike.
  Inputs are built before the clock starts (tokenisation is not timed); one warm-up forward of each
  shape comes first. Latency is the median over every batch-1 forward of every round (ms per
  example); throughput is the median over rounds of examples per second at the large batch. On a
  GPU the clock waits for the device (`torch.cuda.synchronize`).
- **Peak memory** (`peak_memory`): each model again, in a fresh process of its own (spawned), so no
  other model's weights or allocator history count: the run is opened (imports, split, tokenizer),
  the model is loaded once and freed (its code imported), freed memory is handed back, the resident
  set is read (`baseline_rss_mb`), the kernel's high-water mark is reset, then the model is loaded
  again and runs the same batch-1 and large-batch forwards, and the high-water mark is read
  (`peak_rss_mb`; `model_rss_mb` = peak − baseline: what the model's weights and working memory
  added). On a GPU the allocator's peak is read too.
- **Disk** (`disk_size`): bytes of best/'s weight files; for a LoRA adapter, the adapter's and its
  base's (when the base is a local directory).
"""

from __future__ import annotations

import json
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from honelm import config as C
from honelm import registry
from honelm import runtime as rt
from honelm.adapters import adapter_base, adapter_info, is_adapter_dir
from honelm.errors import HonelmError
from honelm.models import count_parameters
from honelm.rundir import stage_of
from honelm.stages.contract import Inference, RunContext

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass(frozen=True)
class Budget:
    """How much timing each model gets (the same for all)."""

    rounds: int = 5
    latency_examples: int = 32
    throughput_batches: int = 3
    batch_size: int = 32


@dataclass
class Opened:
    """A run opened for measuring: its stage, a context with the split and tokenizer, and (after `load`) its model."""

    name: str
    stage: Any
    ctx: RunContext
    model: torch.nn.Module | None = None
    inference: Inference | None = None
    single: list[Any] = field(default_factory=list)
    """Batch-1 inputs, built before timing."""
    large: list[Any] = field(default_factory=list)
    """Large-batch inputs, built before timing."""


def device_for(choice: str) -> torch.device:
    """cpu, cuda, or auto (cuda when there is one)."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise HonelmError("--device cuda: no CUDA device is available here")
    return torch.device(choice)


def open_run(name: str, run_dir: Path, device: torch.device) -> Opened:
    """The run's stage, config, split (train and validation only) and best/'s tokenizer; HonelmError says why not."""
    stage_name = stage_of(run_dir)
    if stage_name not in registry.training_verbs():
        raise HonelmError(f"{run_dir}: {stage_name} runs have no stage that could load their model")
    stage = registry.stage(stage_name)
    cfg = C.build(stage.config, run_dir / "config.yaml")
    ctx = RunContext(cfg=cfg, runtime=rt.Runtime(device=device), run_dir=run_dir)
    ctx.splits = stage.splits(cfg, lambda _: None)
    ctx.tokenizer = stage.test_tokenizer(ctx)  # best/'s, or where the stage keeps it
    return Opened(name, stage, ctx)


def timing_rows(opened: Opened, budget: Budget) -> list[Any]:
    """Rows to time on: the run's validation split (its train split when it has none), repeated to fill the
    budget. Never test rows: the test split is not opened."""
    pool = list(opened.ctx.splits.val) or list(opened.ctx.splits.train)
    if not pool:
        raise HonelmError(f"{opened.ctx.run_dir}: no validation or train rows to time the models on")
    wanted = max(budget.latency_examples, budget.batch_size)
    return [pool[i % len(pool)] for i in range(wanted)]


def load(opened: Opened, rows: list[Any], budget: Budget) -> None:
    """Load best/ (merged when it is an adapter), build its inference over `rows` and the batches to time."""
    model = opened.stage.load_best(opened.ctx).to(opened.ctx.device).eval()
    opened.model = model
    opened.inference = opened.stage.inference(opened.ctx, model, rows)
    n = len(rows)
    opened.single = [opened.inference.batch([i % n]) for i in range(budget.latency_examples)]
    # each large batch starts elsewhere in the rows, so the batches are not all the same texts
    opened.large = [opened.inference.batch([(b * budget.batch_size + i) % n for i in range(budget.batch_size)])
                    for b in range(budget.throughput_batches)]


def parameters(model: torch.nn.Module) -> int:
    """Total parameters (tied weights once)."""
    return count_parameters(model)[1]


def _clock(device: torch.device, run: Callable[[], Any]) -> float:
    """Seconds `run` takes (waiting for the GPU when there is one)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _one_round(item: Opened, device: torch.device, batch_size: int) -> tuple[list[float], float]:
    """Per-example seconds at batch 1, and examples per second over the large batches."""
    forward = item.inference.forward  # type: ignore[union-attr]
    single = [_clock(device, lambda b=b: forward(b)) for b in item.single]
    total = sum(_clock(device, lambda b=b: forward(b)) for b in item.large)
    return single, batch_size * len(item.large) / total if total > 0 else float("nan")


def time_models(items: Sequence[Opened], budget: Budget, device: torch.device,
                say: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Alternated rounds over the loaded models; per name: latency_ms (median at batch 1), throughput (median
    examples/s at the large batch) and the per-round values."""
    out: dict[str, dict[str, Any]] = {i.name: {"latency_s": [], "throughput_rounds": []} for i in items}
    with torch.inference_mode():
        for item in items:  # warm-up: first calls pay one-time initialisation (kernels, allocator)
            item.inference.forward(item.single[0])  # type: ignore[union-attr]
            item.inference.forward(item.large[0])  # type: ignore[union-attr]
        for r in range(budget.rounds):
            shift = r % len(items)
            for item in list(items[shift:]) + list(items[:shift]):
                single, throughput = _one_round(item, device, budget.batch_size)
                out[item.name]["latency_s"] += single
                out[item.name]["throughput_rounds"].append(throughput)
                say(f"round {r + 1}/{budget.rounds} · {item.name}: {1000 * statistics.median(single):.3f} ms/example "
                    f"at batch 1, {throughput:.1f} examples/s at batch {budget.batch_size}")
    return {name: {"latency_ms": 1000 * statistics.median(v["latency_s"]),
                   "throughput": statistics.median(v["throughput_rounds"]),
                   "latency_ms_rounds": [1000 * statistics.median(v["latency_s"][k * budget.latency_examples:
                                                                             (k + 1) * budget.latency_examples])
                                         for k in range(budget.rounds)],
                   "throughput_rounds": v["throughput_rounds"]} for name, v in out.items()}


def _resident_mb() -> float | None:
    """The current resident set (VmRSS, MiB); None where /proc is not there."""
    try:
        with open("/proc/self/status", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def _probe(run_dir: str, device: str, threads: int, rows: list[Any], budget: Budget) -> dict[str, Any]:
    """In a fresh process: open the run, note the resident set, then load and run the model; the peak above it."""
    if threads > 0:
        torch.set_num_threads(threads)
    where = torch.device(device)
    opened = open_run(Path(run_dir).name, Path(run_dir), where)
    # a first load imports the model's code and sets up the allocator: not what the model itself costs
    load(opened, rows[:1], Budget(1, 1, 1, 1))
    opened.model = opened.inference = None
    opened.single, opened.large = [], []
    rt.release_freed_memory()
    if where.type == "cuda":
        torch.cuda.empty_cache()
    baseline = _resident_mb()
    window = rt.reset_peak_memory()
    load(opened, rows, budget)
    with torch.inference_mode():
        for batch in opened.single + opened.large:
            opened.inference.forward(batch)  # type: ignore[union-attr]
    peak = rt.peak_memory_mb(where)
    peak["baseline_rss_mb"] = baseline
    if baseline is not None and "peak_rss_mb" in peak:
        peak["model_rss_mb"] = round(peak["peak_rss_mb"] - baseline, 1)
    peak["peak_memory_window"] = window
    return peak


def peak_memory(run_dir: Path, device: torch.device, threads: int, rows: list[Any], budget: Budget) -> dict[str, Any]:
    """`_probe` in a spawned process (a fresh interpreter: nothing of this process's memory counts)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_probe, str(run_dir), device.type, threads, rows, budget).result()


def _weights_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def disk_size(run_dir: Path) -> dict[str, Any]:
    """Bytes of best/'s weight files; an adapter's with its base's (None when the base is not a local directory)."""
    best = run_dir / "best"
    if not best.is_dir():
        return {"kind": "none", "bytes": None}
    if is_adapter_dir(best) and not (best / "config.json").is_file():
        base = adapter_base(best, adapter_info(best))
        base_path = Path(base)
        base_bytes = _weights_bytes(base_path) if base_path.is_dir() else None
        adapter = _weights_bytes(best)
        return {"kind": "adapter", "adapter_bytes": adapter, "base": base, "base_bytes": base_bytes,
                "bytes": adapter + base_bytes if base_bytes is not None else None}
    if not (best / "config.json").is_file():
        # no model in best/ (a prompted LM records where its model is, RUN/prompted.json): its own directory's weights
        record = run_dir / "prompted.json"
        source = Path(json.loads(record.read_text(encoding="utf-8")).get("path", "")) if record.is_file() else None
        if source is not None and source.is_dir():
            return {"kind": "recorded", "source": str(source), "bytes": _weights_bytes(source)}
        return {"kind": "none", "bytes": None}
    return {"kind": "model", "bytes": _weights_bytes(best)}
