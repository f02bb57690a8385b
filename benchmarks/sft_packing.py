#!/usr/bin/env python
"""SFT throughput: packed rows against padded rows, in real (non-padding) tokens per second, in one run.

Data: alpaca-en-demo (`../shared/data/alpaca-en-demo/alpaca_en_demo.json` from the repository
root; 999 instructions), read by `honelm.data.chat.read_conversations`, a byte-level BPE tokenizer
(vocab 8,000 by default) trained on the conversations as honelm's default chat template renders
them, then encoded exactly as `honelm sft` encodes them (`encode_conversations`: default template,
loss on the assistant replies with their EOS, `--max-length` 512, longer examples truncated).

Model: honelm's `decoder/<--size>` preset (`small` by default: 8 layers, d=384) from random init
(seed), with the tokenizer's vocabulary; the same initial weights in every mode.

Modes, each in its own subprocess, all through honelm's `fit()` with `CausalLM` and the same
TrainConfig (AdamW, lr, clip 1.0, batch `--batch-size` rows, one fixed precision):

  packed          `honelm sft` (data.packing=true): best-fit-decreasing rows of up to max-length
                  tokens, position_ids restarting per example, no attention mask (block-diagonal
                  causal attention built by transformers from the position_ids).
  padded          one example per row, right-padded to the batch's longest with an attention mask,
                  batches in random order: what a padded SFT trainer does by default (TRL's
                  SFTTrainer with packing=False, group_by_length=False). The reference for the target.
  padded_grouped  `honelm sft data.packing=false`: the same padded rows, but batches drawn from
                  length-sorted windows (honelm's BatchStream `lengths`), which removes most padding.

Timing: every mode runs `warmup + steps + 1` optimizer steps; the loop's call for the next step's
batches is time-stamped (as in pretrain_throughput.py), and the measured span runs from the mark
of step `warmup` to the mark of step `warmup + steps`: exactly `steps` whole iterations (batch
collation, forward, backward, clipping, optimizer). Set-up, the precision probe, the warm-up steps
and the final save are outside it. Real tokens are the tokens of the examples in the timed steps'
batches (padding and packed-row tails excluded); tokens/s = real tokens / time. Rows per step are
equal in every mode, so a packed step carries more real tokens than a padded one: that is the point.

Precision: `--precision auto` lets the first mode's run choose (honelm's measured probe) and passes
its choice to every later run, so all modes compute in the same precision.

Rounds: the modes run in `--rounds` rounds in rotating order; tokens/s is the median over rounds,
and each ratio the median of the per-round ratios. Before each run the script waits for the
machine to go quiet and records the CPU other processes used meanwhile ("other load").

Target: packed / padded >= 1.8x (PASS/FAIL); packed / padded_grouped is printed for information.

Run by hand (never by CI):  python benchmarks/sft_packing.py [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from _common import (StepClock, child_env, cpu_bf16_units, cpu_model, fmt_row, median,  # noqa: E402
                     run_child_process, wait_for_idle)

DEFAULT_DATA = REPO.parent / "shared" / "data" / "alpaca-en-demo" / "alpaca_en_demo.json"
MODES = ("packed", "padded", "padded_grouped")
TARGET = ("padded", 1.8)


# ----------------------------------------------------------------------------------------------
# data (parent)


def prepare_data(args: argparse.Namespace, work: Path) -> dict[str, Any] | None:
    """Tokenizer + encoded examples saved under `work`; None when the data set is absent."""
    from honelm.data.chat import ensure_template, read_conversations
    from honelm.data.sft import encode_conversations, template_texts
    from honelm.tokenizer import train_tokenizer

    path = Path(args.data)
    if not path.is_file():
        return None
    t0 = time.perf_counter()
    convs = [c.messages for c in read_conversations(str(path))]
    tok = train_tokenizer(template_texts(convs), kind="bpe", vocab_size=args.vocab)
    ensure_template(tok)
    ex = encode_conversations(tok, convs, args.max_length, "assistant")
    tok.save_pretrained(work / "tokenizer")
    (work / "examples.json").write_text(json.dumps({"ids": ex.ids, "labels": ex.labels, "pad_id": ex.pad_id}))
    lengths = sorted(ex.lengths)
    return {"source": str(path), "conversations": len(convs), "examples": len(ex), "truncated": ex.truncated,
            "dropped": len(ex.dropped), "tokens": ex.n_tokens, "trained_tokens": ex.n_targets,
            "length_median": lengths[len(lengths) // 2], "length_max": lengths[-1], "tokenizer_vocab": len(tok),
            "prep_s": round(time.perf_counter() - t0, 1), "pad_token_id": tok.pad_token_id,
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}


# ----------------------------------------------------------------------------------------------
# one mode (child)


def child_main(args: argparse.Namespace) -> int:
    import torch

    from honelm import runtime as rt
    from honelm.config import TrainConfig
    from honelm.data.sft import SFTExamples, pack_examples
    from honelm.loop import BatchStream, TrainPlan, fit
    from honelm.models import build_model
    from honelm.objectives.lm import CausalLM
    from honelm.tracking import Tracker

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    meta = json.loads((work / "meta.json").read_text())
    raw = json.loads((work / "examples.json").read_text())
    examples = SFTExamples(raw["ids"], raw["labels"], raw["pad_id"])
    model = build_model("decoder", args.size, vocab_size=meta["tokenizer_vocab"], task="lm", seed=args.seed,
                        max_positions=max(512, args.max_length), pad_token_id=meta["pad_token_id"],
                        bos_token_id=meta["bos_token_id"], eos_token_id=meta["eos_token_id"], attention_dropout=0.0)
    clock = StepClock(args.warmup_steps, args.steps)
    counts: list[tuple[int, int]] = []  # (real tokens, row slots) of every collated micro-batch, in order

    if args.mode == "packed":
        items: Any = pack_examples(examples, args.max_length)
        lengths: list[int] | None = items.lengths
    else:
        items, lengths = examples, (examples.lengths if args.mode == "padded_grouped" else None)
    item_tokens = items.lengths

    def collate(idx: list[int]) -> dict[str, torch.Tensor]:
        batch = items.collate(idx)
        counts.append((sum(item_tokens[i] for i in idx), batch["input_ids"].numel()))
        return batch

    class TimedStream(BatchStream):
        def next_step(self) -> list[dict[str, Any]]:
            clock.mark()
            return super().next_step()

    cfg = TrainConfig(lr=args.lr, batch_size=args.batch_size, grad_accum=1,
                      max_steps=args.warmup_steps + args.steps + 1, precision=args.precision, eval_every=0,
                      save_every=0, progress=False, tensorboard=False, threads=args.threads, log_every=10**9)
    runtime = rt.setup(cfg.threads)
    rt.seed_everything(args.seed)
    stream = TimedStream(len(items), collate, cfg.batch_size, 1, args.seed, lengths=lengths)
    run_dir = Path(tempfile.mkdtemp(prefix=f"{args.mode}_run_", dir=work))
    tracker = Tracker(run_dir, enabled=True, tensorboard=False, progress=False)
    t0 = time.perf_counter()
    fit(model, TrainPlan(CausalLM(), stream, None, lambda m, info: None, metric="val_loss"), cfg, runtime, run_dir,
        tracker=tracker)
    tracker.close()
    # counts[0] is the precision probe's batch (auto) or absent; the steps' batches are the last ones
    steps_counts = counts[-(args.warmup_steps + args.steps + 1):]
    timed = steps_counts[args.warmup_steps: args.warmup_steps + args.steps]
    real, slots = sum(c[0] for c in timed), sum(c[1] for c in timed)
    seconds = clock.seconds()
    print("RESULT " + json.dumps({
        "mode": args.mode, "rows": len(items), "real_tokens": real, "slots": slots, "fill": real / max(slots, 1),
        "seconds": seconds, "tokens_per_s": real / seconds, "step_s": seconds / args.steps,
        "real_tokens_per_step": real / args.steps, "precision": runtime.precision,
        "peak_rss_mib": clock.rss_at_end, "wall_s": time.perf_counter() - t0, **clock.load()}), flush=True)
    return 0


# ----------------------------------------------------------------------------------------------
# parent


def run_child(mode: str, args: argparse.Namespace, work: Path, precision: str) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--mode", mode, "--work", str(work),
           "--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps), "--batch-size", str(args.batch_size),
           "--max-length", str(args.max_length), "--size", args.size, "--threads", str(args.threads),
           "--lr", str(args.lr), "--seed", str(args.seed), "--precision", precision]
    return run_child_process(cmd, child_env(), "mode", mode)


def report(runs: dict[str, list[dict]]) -> tuple[list[str], dict[str, Any], dict[str, Any]]:
    summary: dict[str, Any] = {}
    for mode, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            summary[mode] = {"error": rs[-1]["error"] if rs else "not run"}
            continue
        tps = [r["tokens_per_s"] for r in ok]
        summary[mode] = {"tokens_per_s": median(tps), "tokens_per_s_rounds": tps,
                         "step_s": median([r["step_s"] for r in ok]),
                         "real_tokens_per_step": ok[0]["real_tokens_per_step"], "fill": ok[0]["fill"],
                         "rows": ok[0]["rows"], "peak_rss_mib": max(r["peak_rss_mib"] or 0 for r in ok),
                         "precision": ok[0]["precision"], "other_load": max(r["other_load"] for r in ok)}
    head = ["mode", "real tokens/s", "range over rounds", "s/step", "real tokens/step", "fill", "rows",
            "peak RSS MiB", "other load"]
    rows = []
    for mode, s in summary.items():
        if "error" in s:
            rows.append([mode, "failed"] + [""] * (len(head) - 2))
            continue
        rng = f"{min(s['tokens_per_s_rounds']):,.0f}-{max(s['tokens_per_s_rounds']):,.0f}"
        rows.append([mode, f"{s['tokens_per_s']:,.0f}", rng, f"{s['step_s']:.3f}", f"{s['real_tokens_per_step']:,.0f}",
                     f"{100 * s['fill']:.0f}%", f"{s['rows']:,}", f"{s['peak_rss_mib']:,.0f}", f"{s['other_load']:.2f}"])
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    lines = [fmt_row(head, widths), fmt_row(["-" * w for w in widths], widths), *(fmt_row(r, widths) for r in rows), ""]
    ratios: dict[str, Any] = {}
    for other in ("padded", "padded_grouped"):
        if any("error" in summary.get(m, {"error": 1}) for m in ("packed", other)):
            continue
        pairs = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(runs["packed"], runs[other])
                 if "error" not in a and "error" not in b]
        ratio = median(pairs)
        entry: dict[str, Any] = {"ratio": ratio, "per_round": pairs}
        verdict = "(information)"
        if other == TARGET[0]:
            entry.update(target=TARGET[1], passed=ratio >= TARGET[1])
            verdict = f"target >= {TARGET[1]:.1f}x   {'PASS' if entry['passed'] else 'FAIL'}"
        ratios[f"packed/{other}"] = entry
        lines.append(f"packed / {other:<15} {ratio:5.2f}x   {verdict}   (per round: "
                     f"{', '.join(f'{x:.2f}' for x in pairs)})")
    busy = [m for m, s in summary.items() if "error" not in s and s["other_load"] > 0.25]
    if busy:
        lines.append(f"\nWARNING: other processes used CPU during the timed steps of {', '.join(busy)}: "
                     "those numbers are contended; rerun on an idle machine.")
    for mode, s in summary.items():
        if "error" in s:
            lines.append(f"\n{mode}: FAILED\n{s['error']}")
    return lines, summary, ratios


def parent_main(args: argparse.Namespace) -> int:
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if unknown := [m for m in modes if m not in MODES]:
        print(f"unknown mode(s) {unknown}; known: {', '.join(MODES)}")
        return 2
    machine = {"cpu": cpu_model(), "bf16_units": cpu_bf16_units(), "logical_cpus": os.cpu_count(),
               "threads": args.threads, "torch": torch.__version__, "transformers": transformers.__version__,
               "python": platform.python_version()}
    print(f"machine: {machine['cpu']} ({machine['bf16_units']}), {machine['logical_cpus']} logical CPUs, "
          f"{args.threads} torch threads; torch {machine['torch']}, transformers {machine['transformers']}")
    with tempfile.TemporaryDirectory(prefix="honelm-sft-bench-") as tmp:
        work = Path(tmp)
        meta = prepare_data(args, work)
        if meta is None:
            print(f"skipped: {args.data} not found (pass --data PATH)")
            return 0
        (work / "meta.json").write_text(json.dumps(meta))
        from honelm.models import build_model, count_parameters

        n_params = count_parameters(build_model("decoder", args.size, vocab_size=meta["tokenizer_vocab"], task="lm",
                                                seed=args.seed, max_positions=max(512, args.max_length)))[1]
        print(f"data: {meta['source']}: {meta['conversations']} conversations → {meta['examples']} examples, "
              f"{meta['tokens']:,} tokens (median {meta['length_median']}, max {meta['length_max']}; "
              f"{meta['truncated']} truncated at {args.max_length}, {meta['dropped']} dropped); BPE vocab "
              f"{meta['tokenizer_vocab']:,} (prep {meta['prep_s']}s)")
        print(f"model: honelm decoder/{args.size}, {n_params / 1e6:.2f}M parameters; {args.warmup_steps} untimed + "
              f"{args.steps} timed steps of {args.batch_size} rows per mode and round, AdamW lr {args.lr}, clip 1.0")
        precision = args.precision
        runs: dict[str, list[dict]] = {m: [] for m in modes}
        for rnd in range(args.rounds):
            order = modes[rnd % len(modes):] + modes[:rnd % len(modes)]
            print(f"round {rnd + 1}/{args.rounds}", flush=True)
            for mode in order:
                wait_for_idle(args.idle_wait)
                r = run_child(mode, args, work, precision)
                runs[mode].append(r)
                if "error" in r:
                    print(f"  {mode}: FAILED", flush=True)
                    continue
                if precision == "auto":  # every later run computes in what the first one chose
                    precision = r["precision"]
                    print(f"  precision: {precision} (chosen by the first run's probe; used for all)")
                print(f"  {mode}: {r['tokens_per_s']:,.0f} real tokens/s ({100 * r['fill']:.0f}% of row slots real), "
                      f"other load {r['other_load']:.2f} cores ({r['wall_s']:.0f}s in all)", flush=True)
    print()
    lines, summary, ratios = report(runs)
    print("\n".join(lines))
    print(f"\nTimed: exactly --steps whole optimizer steps after --warmup-steps untimed ones, the same number of rows "
          f"per step in every mode; real tokens exclude padding and packed-row tails. tokens/s is the median over "
          f"{args.rounds} rounds (modes in rotating order, one process each); ratios are medians of per-round ratios. "
          f"Precision: {precision}.")
    if args.json:
        payload = {"machine": machine, "data": meta, "model": {"size": args.size, "parameters": n_params},
                   "settings": {k: v for k, v in vars(args).items() if k != "json"}, "precision": precision,
                   "summary": summary, "runs": runs, "ratios": ratios}
        Path(args.json).write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")
    failed = any("error" in r for rs in runs.values() for r in rs)
    missed = any(not v.get("passed", True) for v in ratios.values())
    return 1 if failed or (args.strict and missed) else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="SFT data (default: alpaca-en-demo)")
    p.add_argument("--size", default="small", choices=["test", "tiny", "small", "base"], help="honelm decoder preset")
    p.add_argument("--vocab", type=int, default=8000, help="BPE vocabulary trained on the data")
    p.add_argument("--max-length", type=int, default=512, help="longest example and packed-row length (tokens)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per optimizer step (every mode)")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per mode and round")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed optimizer steps before the timed ones")
    p.add_argument("--rounds", type=int, default=3, help="rounds over all modes (rotating order)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="auto: the first run chooses")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads per run")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--idle-wait", type=float, default=60.0, help="seconds to wait at most for an idle machine per run")
    p.add_argument("--json", default="", help="also write every number to this JSON file")
    p.add_argument("--strict", action="store_true", help="exit 1 when packed misses its target")
    p.add_argument("--mode", default="", help=argparse.SUPPRESS)  # child: run one mode
    p.add_argument("--work", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    return child_main(args) if args.mode else parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
