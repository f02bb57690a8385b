#!/usr/bin/env python
"""DPO throughput and memory: `honelm dpo` vs TRL's `DPOTrainer`, same model, same pairs, one run.

Model: honelm's `decoder/<--size>` preset (default `small`: 8 layers, d=384, SwiGLU, RoPE, tied
embeddings), randomly initialised from `--seed`, with a byte-level BPE tokenizer of `--vocab`
(8,000) trained on the pairs' text and honelm's default chat template (`<|role|>\\n content EOS`
per turn). The parent saves model + tokenizer once as a Hugging Face directory; every contender
loads that directory, so all start from identical weights and render identical text.

Data: `../shared/data/dpo-en-demo/dpo_en_demo.json` (300 ShareGPT ranking pairs; long, often
multi-turn prompts) read by honelm's strict reader into conversational rows {prompt: messages,
chosen, rejected}, or with `--synthetic` the demo's generated preference set (short sequences).
Both contenders truncate at `--max-length` tokens (keeping the start; honelm's `data.trim_turns`,
which would drop old prompt turns first, is off so the work is the same) and drop pairs left
without a reply token (honelm counts them in its log; TRL drops pairs whose prompt fills max_length).

Contenders, each in its own subprocess (peak RSS per contender, no shared allocator state):

  honelm     `honelm.stages.dpo.DPOStage` through `honelm.stages.runner.run_stage` (the `honelm dpo`
             verb itself) with `model.init_from` the saved directory: a frozen copy as reference,
             sigmoid loss, β `--beta`, dropout off, length-grouped batches, `train.precision=auto`
             (a measured fp32/bf16 probe); 98% of the pairs in train, 2% in validation (`data.split=98:2:0`:
             a validation share is required; it is read only after the timed span), no checkpoints
             inside the timed span.
  trl        `DPOTrainer` with `DPOConfig` defaults except what the work must share (batch, steps,
             lr, β, max_length) and what would write files or report (save_strategy="no",
             report_to="none"); its reference is loaded from the same directory.
  trl_bf16   the same with `bf16=True` (TRL's best CPU setting when the CPU has bf16 units).

Timing: as `pretrain_throughput.py`: every contender runs `warmup + steps + 1` optimizer steps
and stamps the same point of every iteration (honelm: when the loop asks its BatchStream for the
step's batches; TRL: `on_step_begin`); the span is exactly `--steps` whole steps after the untimed
`--warmup-steps`. Tokens are the real (non-padding) tokens of every chosen and rejected row the
contender batched in the timed steps (attention_mask sums, counted by wrapping its batch maker),
so padding a contender wastes shows as lower tokens/s. Peak memory is the process's RSS
high-water mark (VmHWM) at the end of the timed span: interpreter, libraries, both models,
optimizer state and activations.

Noise: `--rounds` rounds in rotating order; tokens/s is the median over rounds and each ratio the
median of per-round ratios. Before each child the script waits for the machine to go idle and
reruns a contended child (`--retries`).

Targets (honelm vs `trl`, TRL's defaults): throughput >= 1.2x, peak RSS <= 1.0x, PASS/FAIL. The
ratios to `trl_bf16` are shown beside them, without a target.

Run by hand (never by CI):  python benchmarks/dpo_throughput.py [--json dpo.json]
Smoke run (numbers meaningless):  python benchmarks/dpo_throughput.py --synthetic --size test \\
    --steps 2 --warmup-steps 1 --rounds 1 --batch-size 2 --max-length 64 --idle-wait 0
"""

from __future__ import annotations

import argparse
import importlib.util
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
                     peak_rss_mib, run_child_process, run_rounds)

DEFAULT_DATA = REPO.parent / "shared" / "data" / "dpo-en-demo" / "dpo_en_demo.json"
CONTENDERS = ("honelm", "trl", "trl_bf16")
TARGETS = {"trl": {"throughput": 1.2, "memory": 1.0}}  # honelm / trl: tokens/s at least, peak RSS at most


# ----------------------------------------------------------------------------------------------
# data and model (parent)


def prepare(args: argparse.Namespace, work: Path) -> dict[str, Any] | None:
    """Pairs as conversational JSONL, tokenizer + chat template + random-init model saved in work/model."""
    from honelm.data.chat import ensure_template
    from honelm.data.preferences import read_pairs
    from honelm.models import build_model, count_parameters
    from honelm.tokenizer import train_tokenizer

    if args.synthetic:
        from honelm.demo import preference_rows

        src = work / "synthetic.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r in preference_rows(600, args.seed)), encoding="utf-8")
        source = "synthetic (honelm.demo.preference_rows, 600 pairs)"
    else:
        src = Path(args.data)
        if not src.is_file():
            return None
        source = str(src)
    rows = read_pairs(str(src))
    pairs = [{"prompt": r.pair.prompt, "chosen": r.pair.chosen, "rejected": r.pair.rejected} for r in rows]
    (work / "pairs.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs),
                                      encoding="utf-8")
    texts = [m["content"] for p in pairs for m in p["prompt"]] + [p[k] for p in pairs for k in ("chosen", "rejected")]
    tok = train_tokenizer(texts, kind="bpe", vocab_size=args.vocab)
    ensure_template(tok)
    model = build_model("decoder", args.size, vocab_size=len(tok), task="lm", seed=args.seed,
                        max_positions=args.max_length, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id)
    model.save_pretrained(work / "model", safe_serialization=True)
    tok.save_pretrained(work / "model")
    rendered = [tok.apply_chat_template(p["prompt"] + [{"role": "assistant", "content": p["chosen"]}], tokenize=False)
                for p in pairs]
    lengths = sorted(len(ids) for ids in tok(rendered, add_special_tokens=False)["input_ids"])
    return {"source": source, "pairs": len(pairs), "tokenizer_vocab": len(tok),
            "parameters": count_parameters(model)[1], "chosen_tokens_median": lengths[len(lengths) // 2],
            "longer_than_max_length": sum(n > args.max_length for n in lengths)}


# ----------------------------------------------------------------------------------------------
# contenders (children)


def total_steps(args: argparse.Namespace) -> int:
    return args.warmup_steps + args.steps + 1


def run_honelm(args: argparse.Namespace, clock: StepClock, work: Path, tokens: list[int]) -> dict[str, Any]:
    from honelm import config as C
    from honelm.loop import BatchStream
    from honelm.stages import dpo, preference
    from honelm.stages.runner import run_stage

    class TimedStream(BatchStream):
        def next_step(self):  # type: ignore[no-untyped-def]
            clock.mark()
            batches = super().next_step()
            tokens.append(sum(int(b["attention_mask"].sum()) for b in batches))
            return batches

    preference.BatchStream = TimedStream  # the stage builds its stream from this name
    run_dir = Path(tempfile.mkdtemp(prefix="honelm_run_", dir=work))
    cfg = C.build(dpo.DPOConfig, overrides=[
        f"data.train={work / 'pairs.jsonl'}", "data.split=98:2:0", f"data.max_length={args.max_length}",
        "data.trim_turns=false",  # cut long pairs at the end, as TRL does (keep_start): the same work
        f"model.init_from={work / 'model'}", f"train.batch_size={args.batch_size}",
        f"train.grad_accum={args.grad_accum}", f"train.max_steps={total_steps(args)}", f"train.lr={args.lr}",
        "train.warmup_steps=0", "train.eval_every=0", "train.save_every=0", "train.log_every=1000",
        "train.progress=false", "train.tensorboard=false", f"train.threads={args.threads}",
        f"dpo.beta={args.beta}", f"run.seed={args.seed}", f"run.out_dir={run_dir}", "run.name=dpo"])
    run_stage(dpo.DPOStage(), cfg)
    events = [json.loads(x) for x in (run_dir / "dpo" / "metrics.jsonl").read_text().splitlines()]
    precision = next((e["message"].removeprefix("precision: ") for e in events
                      if e["event"] == "info" and e.get("message", "").startswith("precision:")), "?")
    return {"precision": precision, "settings": "honelm dpo (frozen-copy reference, precision=auto)"}


def run_trl(args: argparse.Namespace, clock: StepClock, work: Path, tokens: list[int], bf16: bool) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(x) for x in (work / "pairs.jsonl").read_text(encoding="utf-8").splitlines()]
    data = Dataset.from_list([{"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
                               "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    model = AutoModelForCausalLM.from_pretrained(work / "model")
    tok = AutoTokenizer.from_pretrained(work / "model")

    class Clock(TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            clock.mark()

    extra = {"bf16": True} if bf16 else {}
    targs = DPOConfig(output_dir=str(work / f"trl_out_{os.getpid()}"), per_device_train_batch_size=args.batch_size,
                      gradient_accumulation_steps=args.grad_accum, max_steps=total_steps(args), learning_rate=args.lr,
                      beta=args.beta, max_length=args.max_length, save_strategy="no", report_to="none",
                      use_cpu=True, logging_steps=1000, seed=args.seed, **extra)
    trainer = DPOTrainer(model=model, args=targs, train_dataset=data, processing_class=tok, callbacks=[Clock()])
    collate = trainer.data_collator

    def counting(examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate(examples)
        tokens.append(int(batch["attention_mask"].sum()))
        return batch

    trainer.data_collator = counting
    trainer.train()
    if args.grad_accum > 1:  # one entry per micro-batch: fold into steps
        tokens[:] = [sum(tokens[i:i + args.grad_accum]) for i in range(0, len(tokens), args.grad_accum)]
    import trl

    settings = ", ".join(f"{k}={v}" for k, v in extra.items())
    return {"precision": "bf16 autocast" if bf16 else "fp32",
            "settings": f"TRL {trl.__version__} DPOConfig({settings or 'defaults'})"}


def child_main(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    clock = StepClock(args.warmup_steps, args.steps)
    tokens: list[int] = []
    t0 = time.perf_counter()
    if args.contender == "honelm":
        info = run_honelm(args, clock, work, tokens)
    else:
        info = run_trl(args, clock, work, tokens, bf16=args.contender == "trl_bf16")
    seconds = clock.seconds()
    timed = sum(tokens[args.warmup_steps: args.warmup_steps + args.steps])
    times = sorted(clock.step_times())
    result = {"contender": args.contender, "tokens": timed, "seconds": seconds, "tokens_per_s": timed / seconds,
              "step_s": seconds / args.steps, "step_s_median": times[len(times) // 2],
              "peak_rss_mib": clock.rss_at_end, "peak_rss_mib_process": peak_rss_mib(),
              "wall_s": time.perf_counter() - t0, "threads": torch.get_num_threads(), **clock.load(), **info}
    print("RESULT " + json.dumps(result), flush=True)
    return 0


# ----------------------------------------------------------------------------------------------
# parent


def run_child(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--contender", name, "--work", str(work),
           "--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps), "--batch-size", str(args.batch_size),
           "--grad-accum", str(args.grad_accum), "--max-length", str(args.max_length), "--beta", str(args.beta),
           "--threads", str(args.threads), "--lr", str(args.lr), "--seed", str(args.seed)]
    env = child_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TQDM_DISABLE="1")
    return run_child_process(cmd, env, "contender", name)


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
    out = {}
    for name, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            out[name] = {"error": rs[-1]["error"] if rs else "not run"}
            continue
        tps = [r["tokens_per_s"] for r in ok]
        out[name] = {"tokens_per_s": median(tps), "tokens_per_s_rounds": tps,
                     "step_s": median([r["step_s"] for r in ok]),
                     "peak_rss_mib": median([r["peak_rss_mib"] for r in ok]),
                     "other_load": max(r["other_load"] for r in ok),
                     "precisions": list(dict.fromkeys(r["precision"] for r in ok)), "settings": ok[0]["settings"],
                     "rounds": len(ok), "failed_rounds": len(rs) - len(ok)}
    return out


def report(runs: dict[str, list[dict]], summary: dict[str, dict]) -> tuple[list[str], dict]:
    head = ["contender", "tokens/s", "range over rounds", "s/step", "peak RSS MiB", "precision", "other load"]
    rows = []
    for name, s in summary.items():
        if "error" in s:
            rows.append([name, "failed", "", "", "", "", ""])
            continue
        rng = f"{min(s['tokens_per_s_rounds']):,.0f}-{max(s['tokens_per_s_rounds']):,.0f}"
        prec = " / ".join(dict.fromkeys(p.split(" (")[0] for p in s["precisions"]))
        rows.append([name, f"{s['tokens_per_s']:,.0f}", rng, f"{s['step_s']:.3f}", f"{s['peak_rss_mib']:,.0f}", prec,
                     f"{s['other_load']:.2f}"])
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    lines = [fmt_row(head, widths), fmt_row(["-" * w for w in widths], widths)]
    lines += [fmt_row(r, widths) for r in rows]
    ratios: dict[str, Any] = {}
    if "error" not in summary.get("honelm", {"error": 1}):
        lines.append("")
        for other in (c for c in summary if c != "honelm"):
            if "error" in summary[other]:
                continue
            both = [(a, b) for a, b in zip(runs["honelm"], runs[other]) if "error" not in a and "error" not in b]
            speed = median([a["tokens_per_s"] / b["tokens_per_s"] for a, b in both])
            memory = median([a["peak_rss_mib"] / b["peak_rss_mib"] for a, b in both])
            target = TARGETS.get(other)
            entry: dict[str, Any] = {"throughput": speed, "memory": memory,
                                     "throughput_per_round": [a["tokens_per_s"] / b["tokens_per_s"] for a, b in both]}
            if target:
                entry.update(throughput_target=target["throughput"], memory_target=target["memory"],
                             throughput_pass=speed >= target["throughput"], memory_pass=memory <= target["memory"])
                lines.append(f"honelm / {other:<9} throughput {speed:5.2f}x (target >= {target['throughput']:.2f}x) "
                             f"{'PASS' if entry['throughput_pass'] else 'FAIL'}   peak RSS {memory:5.2f}x "
                             f"(target <= {target['memory']:.2f}x) {'PASS' if entry['memory_pass'] else 'FAIL'}")
            else:
                lines.append(f"honelm / {other:<9} throughput {speed:5.2f}x   peak RSS {memory:5.2f}x   (no target)")
            ratios[f"honelm/{other}"] = entry
    busy = [n for n, s in summary.items() if "error" not in s and s["other_load"] > 0.25]
    if busy:
        lines += ["", f"WARNING: other processes used CPU during the timed steps of {', '.join(busy)}: rerun on an "
                  "idle machine."]
    lines.append("")
    for name, s in summary.items():
        lines.append(f"{name}: FAILED\n{s['error']}" if "error" in s else
                     f"{name}: {s['settings']}; precision: {' / '.join(s['precisions'])}")
    return lines, ratios


def parent_main(args: argparse.Namespace) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no shard progress bars or length warnings
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    torch.set_num_threads(args.threads)
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = [c for c in contenders if c not in CONTENDERS]
    if unknown:
        print(f"unknown contender(s) {unknown}; known: {', '.join(CONTENDERS)}")
        return 2
    if any(c.startswith("trl") for c in contenders):
        if importlib.util.find_spec("trl") is None:
            print("skipped: TRL is not installed (pip install trl)")
            return 0
    import transformers

    machine = {"cpu": cpu_model(), "bf16_units": cpu_bf16_units(), "logical_cpus": os.cpu_count(),
               "threads": args.threads, "torch": torch.__version__, "transformers": transformers.__version__,
               "trl": getattr(sys.modules.get("trl"), "__version__", None), "python": platform.python_version()}
    print(f"machine: {machine['cpu']} ({machine['bf16_units']}), {machine['logical_cpus']} logical CPUs, "
          f"{args.threads} torch threads; torch {machine['torch']}, transformers {machine['transformers']}, "
          f"TRL {machine['trl']}, Python {machine['python']}")
    with tempfile.TemporaryDirectory(prefix="honelm-dpo-bench-") as tmp:
        work = Path(tmp)
        meta = prepare(args, work)
        if meta is None:
            print(f"skipped: {args.data} not found (pass --data PATH, or --synthetic for generated pairs)")
            return 0
        print(f"data: {meta['source']}: {meta['pairs']} pairs; BPE vocab {meta['tokenizer_vocab']:,}; prompt + chosen "
              f"median {meta['chosen_tokens_median']} tokens, {meta['longer_than_max_length']} longer than "
              f"--max-length {args.max_length}")
        print(f"model: honelm decoder/{args.size}, random init (seed {args.seed}), {meta['parameters'] / 1e6:.2f}M "
              f"parameters; sigmoid DPO, beta {args.beta}, frozen reference copy")
        print(f"work: {args.warmup_steps} untimed warm-up steps, then {args.steps} timed steps of {args.batch_size} "
              f"pairs x {args.grad_accum} accumulation, lr {args.lr}", flush=True)
        runs = run_rounds(contenders, args.rounds, args.idle_wait, args.retries,
                          lambda name: run_child(name, args, work),
                          lambda r: f"{r['tokens_per_s']:,.0f} tokens/s, peak RSS {r['peak_rss_mib']:,.0f} MiB, "
                                    f"other load {r['other_load']:.2f} cores ({r['wall_s']:.0f}s in all)")
    summary = summarize(runs)
    lines, ratios = report(runs, summary)
    print()
    print("\n".join(lines))
    print(f"\nTimed: --steps whole optimizer steps after --warmup-steps untimed ones; tokens are the non-padding "
          f"tokens of the chosen and rejected rows batched in them; tokens/s and peak RSS are medians over "
          f"{args.rounds} round(s), ratios medians of per-round ratios.")
    if args.json:
        payload = {"machine": machine, "data": meta, "settings": {k: v for k, v in vars(args).items() if k != "json"},
                   "summary": summary, "runs": runs, "ratios": ratios}
        Path(args.json).write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")
    failed = any("error" in r for rs in runs.values() for r in rs)
    missed = any(not (v.get("throughput_pass", True) and v.get("memory_pass", True)) for v in ratios.values())
    return 1 if failed or (args.strict and missed) else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="preference pairs (default: dpo-en-demo)")
    p.add_argument("--synthetic", action="store_true", help="the demo's generated pairs instead of --data")
    p.add_argument("--size", default="small", choices=("test", "tiny", "small", "base"), help="honelm decoder preset")
    p.add_argument("--vocab", type=int, default=8000, help="BPE vocabulary trained on the pairs")
    p.add_argument("--max-length", type=int, default=512, help="tokens per sequence (prompt + reply), start kept")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per micro-batch (2x rows)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per contender and round")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed optimizer steps before the timed ones")
    p.add_argument("--rounds", type=int, default=3, help="run every contender this often, rotating the order")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads in every process")
    p.add_argument("--contenders", default=",".join(CONTENDERS),
                   help=f"comma-separated subset of {', '.join(CONTENDERS)}")
    p.add_argument("--idle-wait", type=float, default=300, help="seconds to wait for an idle machine before each run")
    p.add_argument("--retries", type=int, default=2, help="rerun a contended child at most this often")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--strict", action="store_true", help="exit 1 when honelm misses a target")
    p.add_argument("--contender", help=argparse.SUPPRESS)  # internal: run one contender (child process)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup_steps < 0 or args.rounds < 1:
        p.error("--steps and --rounds must be >= 1, --warmup-steps >= 0")
    return child_main(args) if args.contender else parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
