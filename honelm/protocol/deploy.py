"""`honelm export RUN --format onnx [--quantize int8]`: a classifier as ONNX, checked and measured on validation.

What it writes (default RUN/onnx/, filled beside its final name and renamed into place):

- `model.onnx`: best/ (a LoRA adapter merged into its base, in fp32) exported with the
  torch.export-based exporter (`torch.onnx.export(..., dynamo=True)`), inputs `input_ids`,
  `attention_mask` (and `token_type_ids` when the run's encoding gives them), output `logits`
  (batch, labels); the batch and sequence axes are dynamic.
- the tokenizer and `config.json` (id2label) beside it: what a consumer needs to encode texts as
  training did (an encoder's own template; a decoder classifier's `text EOS`, see docs/export.md).
- with `--quantize int8`, `model.int8.onnx`: ONNX Runtime's dynamic quantisation of model.onnx
  (int8 weights of MatMul/Gemm, activations quantised per batch at run time).
- `export.json` and `export.md`: the check and the measurements.

The check: ONNX Runtime's logits must equal PyTorch's within `atol + rtol * |logit|` on every row
of the run's VALIDATION split, or nothing is written. Validation, not test: the test split is
sealed (honelm.data.splits; only `honelm test` opens it, and each look goes into the ledger,
honelm.protocol.ledger), and an export is an engineering step that may be repeated freely; a look
at test per export would spend the one look the run's test number depends on. Equality of two
implementations of the same function needs no held-out data.

The measurements, on the same validation rows and the same padded batches (tokenisation is not
timed): the metric (accuracy, or MSE for a regressor) of PyTorch fp32, ONNX fp32 and ONNX int8,
the int8 model's agreement with PyTorch's predictions, and CPU throughput (examples/s, the median
over rounds, the engines interleaved within each round so machine noise falls on all alike) with
the same number of threads for every engine.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import platform
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from honelm import runtime as rt
from honelm.checkpoint import atomic_directory
from honelm.data.splits import verify_manifest
from honelm.errors import HonelmError
from honelm.protocol import measure as M
from honelm.reporting import table
from honelm.stages.export import export

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
FP32_FILE, INT8_FILE = "model.onnx", "model.int8.onnx"


@dataclass(frozen=True)
class Settings:
    """How the export is checked and measured."""

    quantize: str = ""
    """"" (fp32 only) or "int8" (model.int8.onnx too)."""
    atol: float = 1e-4
    """The check's absolute tolerance on each logit."""
    rtol: float = 1e-3
    """The check's tolerance relative to |logit| (added to atol)."""
    batch_size: int = 32
    """Rows per batch, for the check and the timing alike."""
    rounds: int = 5
    """Timing rounds; the median is reported."""
    threads: int = 0
    """CPU threads for every engine; 0 = PyTorch's current setting."""
    max_timed: int = 512
    """At most this many validation rows are timed (all of them are checked and scored)."""


class _Logits(nn.Module):
    """The classifier as a function of its input tensors, returning fp32 logits (what the ONNX graph computes)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits.float()


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter and the quantiser log advice (torchvision absent, pre-processing) that is not ours to act on."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def require_export_extra() -> None:
    """A clear error, before anything is loaded, when the `export` extra is not installed."""
    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise HonelmError(f"--format onnx needs {', '.join(missing)}: pip install 'honelm[export]'")


def validation(run: Path) -> M.Opened:
    """The run opened as `honelm compare` opens it, its rebuilt split checked against split_manifest.json,
    with a validation split of its own (the test split stays sealed)."""
    opened = M.open_run(run.name, run, torch.device("cpu"))
    manifest = run / "split_manifest.json"
    if not manifest.is_file():
        raise HonelmError(f"{run}: no split_manifest.json, so the validation split cannot be proved to be the run's")
    verify_manifest(json.loads(manifest.read_text(encoding="utf-8")), opened.ctx.splits.manifest)
    if not opened.ctx.splits.val:
        raise HonelmError(f"{run}: the run has no validation split to check and measure the export on")
    return opened


def classifier(opened: M.Opened) -> nn.Module:
    """best/ in fp32 (an adapter merged into its base), refused unless it is a sequence classifier or regressor."""
    model = opened.stage.load_best(opened.ctx).float().eval()
    if not type(model).__name__.endswith("ForSequenceClassification"):
        raise HonelmError(f"{opened.ctx.run_dir}: --format onnx exports classifiers (a sequence classification or "
                          f"regression head); this {opened.stage.name} run's model is a {type(model).__name__}")
    return model


def batches(opened: M.Opened, model: nn.Module, batch_size: int) -> tuple[list[dict[str, torch.Tensor]], np.ndarray]:
    """The validation rows encoded by the run's own stage, in length-sorted padded batches, and their labels."""
    rows = list(opened.ctx.splits.val)
    try:
        inference = opened.stage.inference(opened.ctx, model, rows)
    except NotImplementedError:
        raise HonelmError(f"{opened.ctx.run_dir}: {opened.stage.name} runs cannot be exported to ONNX: the stage "
                          "does not say how its rows become model inputs (Stage.inference)") from None
    lengths: list[int] = []
    for start in range(0, len(rows), 1024):  # in chunks: one batch of a large split would pad every row to the longest
        lengths += inference.batch(list(range(start, min(start + 1024, len(rows)))))["attention_mask"].sum(-1).tolist()
    order = sorted(range(len(rows)), key=lambda i: lengths[i])
    out, labels = [], []
    for start in range(0, len(order), batch_size):
        batch = inference.batch(order[start:start + batch_size])
        out.append({k: batch[k].cpu() for k in INPUTS if k in batch})
        labels.append(batch["labels"].cpu().numpy())
    return out, np.concatenate(labels)


def write_onnx(model: nn.Module, example: dict[str, torch.Tensor], path: Path) -> list[str]:
    """Export `model` to `path` with dynamic batch and sequence axes; returns the input names."""
    names = [k for k in INPUTS if k in example]
    # two rows of different content so that neither axis is specialised to 1 by the tracer
    args = tuple(torch.cat([example[k][:1], example[k][-1:]]) for k in names)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    shapes = tuple({0: batch, 1: seq} for _ in names)
    with _quiet_exporter():
        program = torch.onnx.export(_Logits(model).eval(), args, dynamo=True, input_names=names,
                                    output_names=["logits"], dynamic_shapes=shapes, verbose=False)
        program.save(str(path), external_data=False)
    return names


def quantize_int8(fp32: Path, int8: Path) -> None:
    """ONNX Runtime's dynamic int8 quantisation (weights int8; activations quantised per batch at run time)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_exporter():
        quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)


def _session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def engines(model: nn.Module, paths: dict[str, Path], threads: int) -> dict[str, Callable[[dict[str, Any]], np.ndarray]]:
    """name → run(batch) → logits as numpy, for PyTorch fp32 and each ONNX file."""
    def torch_run(batch: dict[str, torch.Tensor]) -> np.ndarray:
        with torch.no_grad():
            return model(**batch).logits.float().numpy()

    def onnx_run(session: Any) -> Callable[[dict[str, Any]], np.ndarray]:
        wanted = [i.name for i in session.get_inputs()]
        return lambda batch: session.run(["logits"], {k: batch[k].numpy() for k in wanted})[0]

    out = {"pytorch_fp32": torch_run}
    out.update({name: onnx_run(_session(path, threads)) for name, path in paths.items()})
    return out


def quality(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy (integer labels) or MSE (a regressor's float labels) of `logits`."""
    if labels.dtype.kind == "f":
        return {"mse": float(np.mean((logits[:, 0] - labels) ** 2))}
    return {"accuracy": float(np.mean(logits.argmax(-1) == labels))}


def check(reference: np.ndarray, exported: np.ndarray, settings: Settings) -> dict[str, Any]:
    """Whether the exported logits equal the reference within atol + rtol * |reference|, elementwise."""
    diff = np.abs(exported - reference)
    bound = settings.atol + settings.rtol * np.abs(reference)
    return {"max_abs_diff": float(diff.max()), "atol": settings.atol, "rtol": settings.rtol,
            "passed": bool((diff <= bound).all()), "worst_excess": float((diff - bound).max()),
            "argmax_agreement": float(np.mean(exported.argmax(-1) == reference.argmax(-1)))}


def throughput(runs: dict[str, Callable[[dict[str, Any]], np.ndarray]], timed: list[dict[str, torch.Tensor]],
               rounds: int) -> dict[str, dict[str, float]]:
    """Examples per second of each engine over the `timed` batches, by the wall clock and by this process's CPU
    time: the median over rounds, engines interleaved within a round (in an order that rotates), one untimed
    warm-up pass each first. Per CPU-second is what other processes on a shared machine disturb least."""
    n = sum(int(b["input_ids"].shape[0]) for b in timed)
    names = list(runs)
    for name in names:
        runs[name](timed[0])
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start, start_cpu = time.perf_counter(), time.process_time()
            for batch in timed:
                runs[name](batch)
            wall[name].append(n / (time.perf_counter() - start))
            cpu[name].append(n / max(time.process_time() - start_cpu, 1e-9))
    return {"examples_per_s": {k: round(statistics.median(v), 2) for k, v in wall.items()},
            "examples_per_cpu_s": {k: round(statistics.median(v), 2) for k, v in cpu.items()}}


def measure(model: nn.Module, data: list[dict[str, torch.Tensor]], labels: np.ndarray, paths: dict[str, Path],
            settings: Settings) -> dict[str, Any]:
    """The check of every ONNX file against PyTorch, each engine's metric, and the throughputs."""
    runs = engines(model, paths, settings.threads)
    logits = {name: np.concatenate([run(b) for b in data]) for name, run in runs.items()}
    reference = logits["pytorch_fp32"]
    timed, count = [], 0
    for b in data:
        if count >= settings.max_timed:
            break
        timed.append(b)
        count += int(b["input_ids"].shape[0])
    speed = throughput(runs, timed, settings.rounds)
    wall, cpu = speed["examples_per_s"], speed["examples_per_cpu_s"]
    return {
        "split": "validation", "n_examples": int(len(labels)),
        "check": {name: check(reference, logits[name], settings) for name in paths},
        "quality": {name: quality(value, labels) for name, value in logits.items()},
        "throughput": {**speed, "n_examples": count, "batch_size": settings.batch_size,
                       "threads": settings.threads, "rounds": settings.rounds,
                       "ratio_vs_pytorch_fp32": {k: round(v / wall["pytorch_fp32"], 3) for k, v in wall.items()},
                       "cpu_ratio_vs_pytorch_fp32": {k: round(v / cpu["pytorch_fp32"], 3) for k, v in cpu.items()}},
    }


def report_md(info: dict[str, Any]) -> str:
    """export.md: what was exported, the check and the measurements, in a few lines."""
    m = info["measured"]
    t = m["throughput"]
    lines = [f"# ONNX export of `{info['run']}`", "",
             f"Inputs {', '.join(f'`{n}`' for n in info['inputs'])} (batch and sequence axes dynamic), output "
             "`logits`. Checked and measured on the run's **validation** split "
             f"({m['n_examples']} examples; the test split stays sealed for `honelm test`).", ""]
    rows = []
    for name, speed in t["examples_per_s"].items():
        (metric, value), = m["quality"][name].items()
        checked = m["check"].get(name)
        rows.append([name, f"{value:.4f}", f"{speed:,.1f}", f"{t['ratio_vs_pytorch_fp32'][name]:.2f}x",
                     f"{t['examples_per_cpu_s'][name]:,.1f}", f"{t['cpu_ratio_vs_pytorch_fp32'][name]:.2f}x",
                     "reference" if checked is None else
                     f"max |diff| {checked['max_abs_diff']:.2e}, argmax agrees {checked['argmax_agreement']:.2%}"])
    lines += table(["engine", metric, "examples/s", "vs PyTorch fp32", "examples/CPU-s", "vs PyTorch fp32 (CPU)",
                    "logits vs PyTorch fp32"], rows)
    lines += ["", f"Throughput: median of {t['rounds']} rounds over {t['n_examples']} validation examples in "
              f"length-sorted batches of {t['batch_size']}, {t['threads']} CPU thread(s) for every engine, "
              f"tokenisation not timed; {info['machine']}. Per CPU-second counts this process's CPU time (all its "
              "threads), which other processes on a shared machine disturb less than the wall clock.", ""]
    fp32 = m["check"]["onnx_fp32"]
    lines.append(f"ONNX fp32 equals PyTorch within atol {fp32['atol']:g} + rtol {fp32['rtol']:g}·|logit| on every "
                 "validation logit." if fp32["passed"] else "ONNX fp32 does NOT match PyTorch.")
    return "\n".join(lines) + "\n"


def export_onnx(run: str | Path, out: str | Path | None = None, settings: Settings = Settings(),
                overwrite: bool = False, say: Callable[[str], None] = print) -> Path:
    """Export RUN's best classifier to ONNX (and int8), checked and measured on validation; see the module docstring."""
    run = Path(run)
    require_export_extra()
    if not (run / "run.json").is_file():
        raise HonelmError(f"{run}: --format onnx needs a run directory (its validation split checks the export)")
    dest = Path(out) if out is not None else run / "onnx"
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())) and not overwrite:
        raise HonelmError(f"{dest} exists and is not empty; pass --overwrite to replace it")
    settings = Settings(**{**settings.__dict__, "threads": settings.threads or torch.get_num_threads()})
    rt.setup(settings.threads)
    opened = validation(run)
    model = classifier(opened)
    data, labels = batches(opened, model, settings.batch_size)
    with atomic_directory(dest) as tmp:
        names = write_onnx(model, data[-1] if len(data[-1]["input_ids"]) > 1 else data[0], tmp / FP32_FILE)
        paths = {"onnx_fp32": tmp / FP32_FILE}
        if settings.quantize == "int8":
            quantize_int8(tmp / FP32_FILE, tmp / INT8_FILE)
            paths["onnx_int8"] = tmp / INT8_FILE
        say(f"exported {run}/best to ONNX; checking and timing on {len(labels)} validation examples")
        measured = measure(model, data, labels, paths, settings)
        if not measured["check"]["onnx_fp32"]["passed"]:
            raise HonelmError(f"ONNX Runtime's logits differ from PyTorch's on validation beyond tolerance: "
                              f"{measured['check']['onnx_fp32']}; nothing written")
        info = provenance(run, names, settings, measured)
        opened.ctx.tokenizer.save_pretrained(tmp)
        model.config.save_pretrained(tmp)
        (tmp / "export.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
        (tmp / "export.md").write_text(report_md(info), encoding="utf-8")
    say(summary(dest, measured))
    return dest


def provenance(run: Path, names: list[str], settings: Settings, measured: dict[str, Any]) -> dict[str, Any]:
    """export.json: the source, the files, the versions and the measurements."""
    import onnxruntime

    files = {"onnx_fp32": FP32_FILE, **({"onnx_int8": INT8_FILE} if settings.quantize == "int8" else {})}
    return {"format": "onnx", "run": str(run), "source": str(run / "best"), "files": files, "inputs": names,
            "outputs": ["logits"], "dynamic_axes": {"batch": 0, "sequence": 1},
            "quantization": ("onnxruntime.quantization.quantize_dynamic, QInt8 weights" if settings.quantize else None),
            "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
            "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs",
            "measured": measured}


def summary(dest: Path, measured: dict[str, Any]) -> str:
    """The one line printed after an export."""
    ratio = measured["throughput"]["ratio_vs_pytorch_fp32"]
    parts = [f"{dest}: ONNX fp32 matches PyTorch (max |diff| {measured['check']['onnx_fp32']['max_abs_diff']:.1e}), "
             f"{ratio['onnx_fp32']:.2f}x PyTorch's CPU throughput"]
    if "onnx_int8" in ratio:
        (metric, fp32), = measured["quality"]["pytorch_fp32"].items()
        int8 = measured["quality"]["onnx_int8"][metric]
        parts.append(f"int8 {ratio['onnx_int8']:.2f}x, validation {metric} {fp32:.4f} -> {int8:.4f}")
    return "; ".join(parts)


def main(argv: list[str]) -> Path:
    """`honelm export RUN [--merge] [--format hf|onnx|int8] [--quantize int8] [--out DIR] [--overwrite] ...`."""
    p = argparse.ArgumentParser(
        prog="honelm export",
        description="Write RUN's best model to a directory that needs nothing else. --format hf (default): a LoRA run "
        "merged into a plain transformers model (--merge) or its PEFT adapter as is; any other run's best/ copied. "
        "--format onnx: a classifier as model.onnx (dynamic batch and sequence axes) with its tokenizer, its logits "
        "checked against PyTorch's on the run's validation split; --quantize int8 (or --format int8) adds "
        "model.int8.onnx, ONNX Runtime's dynamic int8 quantisation, with the accuracy change and CPU throughput of "
        "each engine measured on validation and written to export.json and export.md. Needs the `export` extra "
        "(pip install 'honelm[export]'). See docs/export.md.")
    p.add_argument("run", help="run directory (e.g. runs/classify/latest) or, for --format hf, a model/adapter "
                   "directory (then --out)")
    p.add_argument("--format", choices=("hf", "onnx", "int8"), default="hf",
                   help="hf: transformers/PEFT directory; onnx: ONNX classifier; int8: onnx plus --quantize int8")
    p.add_argument("--quantize", choices=("int8",), default=None, help="with --format onnx: add an int8 model")
    p.add_argument("--merge", action="store_true", help="--format hf: merge a LoRA adapter into its base (in fp32) "
                   "and save a plain checkpoint (ONNX exports always merge)")
    p.add_argument("--out", default=None, help="destination directory (default: RUN/export, or RUN/onnx for ONNX)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty destination")
    p.add_argument("--atol", type=float, default=Settings.atol, help="ONNX check: absolute tolerance on each logit")
    p.add_argument("--rtol", type=float, default=Settings.rtol, help="ONNX check: tolerance relative to |logit|")
    p.add_argument("--batch-size", type=int, default=Settings.batch_size, help="batch size of the check and timing")
    p.add_argument("--rounds", type=int, default=Settings.rounds, help="timing rounds (the median is reported)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for every engine (0: PyTorch's default)")
    args = p.parse_args(argv)
    if args.format == "hf":
        if args.quantize:
            raise HonelmError("--quantize int8 quantises an ONNX export: add --format onnx")
        return export(args.run, merge=args.merge, out=args.out, overwrite=args.overwrite)
    for name, value in (("--batch-size", args.batch_size), ("--rounds", args.rounds)):
        if value < 1:
            raise HonelmError(f"{name} must be at least 1, got {value}")
    if args.threads < 0 or args.atol < 0 or args.rtol < 0:
        raise HonelmError("--threads, --atol and --rtol cannot be negative")
    settings = Settings(quantize="int8" if args.format == "int8" else args.quantize or "", atol=args.atol,
                        rtol=args.rtol, batch_size=args.batch_size, rounds=args.rounds, threads=args.threads)
    return export_onnx(args.run, out=args.out, settings=settings, overwrite=args.overwrite)
