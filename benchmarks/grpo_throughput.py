#!/usr/bin/env python
"""GRPO step throughput: `honelm grpo` vs TRL's `GRPOTrainer`, same model, prompts and G, one run.

Model: honelm's `decoder/<--size>` preset (default `tiny`), randomly initialised from `--seed`, with a
byte-level BPE tokenizer of `--vocab` (300: nearly one token per digit) trained on the generated
additions of the GRPO worked example (`honelm.demo.arithmetic_data`). The parent saves model and
tokenizer once; both contenders load that directory, so they start from identical weights.

Work per optimizer step, the same for both: `--prompts` prompts ("a + b =", plain text, no chat
template) x `--group` sampled completions of up to `--length` tokens at temperature 1 (no top-k/top-p),
each scored by the same numeric check (the completion's number equals the reference: honelm's
`reward.function=numeric`; for TRL a reward function calling the same `honelm.rl.checks` code),
advantages normalised within each group by its std, no KL term (beta 0: no reference model), one
on-policy update (no old log-probabilities), the loss averaged over all completion tokens (honelm
`grpo.length_norm=token`, TRL's default `loss_type="dapo"`), lr `--lr`, `--precision` (fp32 by default
for both; TRL's own default on CPU is bf16=True, contender `trl_bf16`).

  honelm     `honelm.stages.grpo.GRPOStage` through `honelm.stages.runner.run_stage` (the verb itself);
             98% of the prompts in train, 2% in validation (a validation share is required; it is read only
             after the timed span), no checkpoints inside the timed span.
  trl        `GRPOTrainer` with `GRPOConfig` defaults except what the work must share
             (per_device_train_batch_size = prompts x group, num_generations, max_completion_length,
             lr, beta=0, bf16 per --precision) and what would write files or report.
  trl_bf16   the same with bf16=True (TRL's default).

Timing (as the other throughput benchmarks, `_common.StepClock`): every contender runs warmup + steps
+ 1 optimizer steps and stamps the start of each (honelm: when the loop asks the rollout stream for the
step's batches, which samples the rollout; TRL: `on_step_begin`, before it generates); the span is
`--steps` whole steps (generation, scoring, forward, backward, optimizer) after `--warmup-steps`. The
ratio is steps/s honelm over steps/s TRL, the median of per-round ratios over `--rounds` rounds in
rotating order; the mean completion length of each contender is printed beside it (the same work
needs about the same lengths: a random model rarely stops early).

Run by hand (never by CI):  python benchmarks/grpo_throughput.py [--json grpo.json]
Smoke run (numbers meaningless):  python benchmarks/grpo_throughput.py --size test --steps 2 \\
    --warmup-steps 1 --rounds 1 --idle-wait 0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from _common import (StepClock, child_env, fmt_row, machine_info, median, pick_contenders,  # noqa: E402
                     run_child_process, run_rounds, write_json)

CONTENDERS = ("honelm", "trl", "trl_bf16")
TARGET = 1.2  # honelm / trl steps per second, at least


def prepare(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Prompt rows (prompt, answer) and a random-init model + tokenizer saved in work/model."""
    from honelm.demo import arithmetic_data
    from honelm.models import build_model, count_parameters
    from honelm.tokenizer import train_tokenizer

    corpus, _, prompts = arithmetic_data(seed=args.seed)
    (work / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts), encoding="utf-8")
    tok = train_tokenizer(corpus, kind="bpe", vocab_size=args.vocab)
    model = build_model("decoder", args.size, vocab_size=len(tok), task="lm", seed=args.seed, max_positions=64,
                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model.save_pretrained(work / "model", safe_serialization=True)
    tok.save_pretrained(work / "model")
    return {"prompts": len(prompts), "tokenizer_vocab": len(tok), "parameters": count_parameters(model)[1]}


def total_steps(args: argparse.Namespace) -> int:
    return args.warmup_steps + args.steps + 1


def run_honelm(args: argparse.Namespace, clock: StepClock, work: Path, lengths: list[float]) -> dict[str, Any]:
    from honelm import config as C
    from honelm.rl.group import GroupRolloutStream
    from honelm.stages import grpo
    from honelm.stages.runner import run_stage

    class TimedStream(GroupRolloutStream):
        def next_step(self):  # type: ignore[no-untyped-def]
            clock.mark()
            batches = super().next_step()
            lengths.append(sum(float(b["response_mask"].sum()) for b in batches) / (args.prompts * args.group))
            return batches

    grpo.GroupRolloutStream = TimedStream  # the stage builds its stream from this name
    run_dir = Path(tempfile.mkdtemp(prefix="honelm_run_", dir=work))
    cfg = C.build(grpo.GRPOConfig, overrides=[
        f"data.train={work / 'prompts.jsonl'}", "data.split=98:2:0", "data.chat=off", f"model.init_from={work / 'model'}",
        "reward.function=numeric", f"grpo.group_size={args.group}", f"grpo.prompts_per_rollout={args.prompts}",
        f"grpo.response_length={args.length}", "grpo.temperature=1.0", "grpo.kl_coef=0", "grpo.length_norm=token",
        f"train.batch_size={args.prompts * args.group}", "train.grad_accum=1", f"train.max_steps={total_steps(args)}",
        f"train.lr={args.lr}", f"train.precision={args.precision}", "train.eval_every=0", "train.save_every=0",
        "train.log_every=1000", "train.progress=false", "train.tensorboard=false", f"train.threads={args.threads}",
        f"run.seed={args.seed}", f"run.out_dir={run_dir}", "run.name=grpo"])
    run_stage(grpo.GRPOStage(), cfg)
    return {"settings": f"honelm grpo (precision={args.precision}, length_norm=token)"}


def run_trl(args: argparse.Namespace, clock: StepClock, work: Path, lengths: list[float], bf16: bool) -> dict[str, Any]:
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from honelm.rl.checks import parse_number, response_number

    rows = [json.loads(x) for x in (work / "prompts.jsonl").read_text(encoding="utf-8").splitlines()]
    data = Dataset.from_list(rows)
    model = AutoModelForCausalLM.from_pretrained(work / "model")
    tok = AutoTokenizer.from_pretrained(work / "model")

    def numeric(completions: list[str], answer: list[str], **_: Any) -> list[float]:
        """honelm's numeric check (the same code, the same cost)."""
        out = []
        for text, ref in zip(completions, answer):
            got, want = response_number(text), parse_number(ref)
            out.append(float(got is not None and want is not None and abs(got - want) <= 1e-6))
        return out

    class Clock(TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            clock.mark()

        def on_log(self, _args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **k: Any) -> None:
            if logs and "completions/mean_length" in logs:
                lengths.append(float(logs["completions/mean_length"]))

    targs = GRPOConfig(output_dir=str(work / f"trl_out_{os.getpid()}"), per_device_train_batch_size=args.prompts * args.group,
                       num_generations=args.group, max_completion_length=args.length, max_steps=total_steps(args),
                       learning_rate=args.lr, beta=0.0, bf16=bf16, use_cpu=True, save_strategy="no", report_to="none",
                       logging_steps=1, seed=args.seed, disable_tqdm=True)
    trainer = GRPOTrainer(model=model, reward_funcs=numeric, args=targs, train_dataset=data, processing_class=tok,
                          callbacks=[Clock()])
    trainer.train()
    return {"settings": f"TRL {trl.__version__} GRPOConfig(beta=0, bf16={bf16}; otherwise defaults)"}


def child_main(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    clock = StepClock(args.warmup_steps, args.steps)
    lengths: list[float] = []
    t0 = time.perf_counter()
    work = Path(args.work)
    if args.contender == "honelm":
        info = run_honelm(args, clock, work, lengths)
    else:
        info = run_trl(args, clock, work, lengths, bf16=args.contender == "trl_bf16")
    seconds = clock.seconds()
    result = {"contender": args.contender, "seconds": seconds, "steps_per_s": args.steps / seconds,
              "step_s": seconds / args.steps, "completion_length": sum(lengths) / max(len(lengths), 1),
              "wall_s": time.perf_counter() - t0, **clock.load(), **info}
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def run_child(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--contender", name, "--work", str(work)]
    for key in ("steps", "warmup_steps", "prompts", "group", "length", "lr", "precision", "threads", "seed", "size",
                "vocab"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    env = child_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TQDM_DISABLE="1")
    return run_child_process(cmd, env, "contender", name)


def report(runs: dict[str, list[dict]]) -> tuple[list[str], dict[str, Any]]:
    head = ["contender", "steps/s", "s/step", "completion tokens", "other load", "settings"]
    rows, ratios = [], {}
    for name, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            rows.append([name, "failed", "", "", "", rs[-1].get("error", "")[-200:] if rs else ""])
            continue
        rows.append([name, f"{median([r['steps_per_s'] for r in ok]):.3f}", f"{median([r['step_s'] for r in ok]):.3f}",
                     f"{median([r['completion_length'] for r in ok]):.1f}",
                     f"{max(r['other_load'] for r in ok):.2f}", ok[0]["settings"]])
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    lines = [fmt_row(head, widths), fmt_row(["-" * w for w in widths], widths), *(fmt_row(r, widths) for r in rows), ""]
    for other in (c for c in runs if c != "honelm"):
        both = [(a, b) for a, b in zip(runs.get("honelm", []), runs[other]) if "error" not in a and "error" not in b]
        if not both:
            continue
        per_round = [a["steps_per_s"] / b["steps_per_s"] for a, b in both]
        ratio = median(per_round)
        ratios[f"honelm/{other}"] = {"throughput": ratio, "per_round": per_round}
        verdict = f" (target >= {TARGET:.1f}x) {'PASS' if ratio >= TARGET else 'FAIL'}" if other == "trl" else ""
        lines.append(f"honelm / {other:<9} steps/s {ratio:5.2f}x{verdict}   rounds: "
                     + ", ".join(f"{x:.2f}" for x in per_round))
    return lines, ratios


def parent_main(args: argparse.Namespace) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch
    import transformers

    try:
        import trl
    except ImportError:
        print("skipped: TRL is not installed (pip install trl)")
        return 0
    torch.set_num_threads(args.threads)
    contenders = pick_contenders(args.contenders, CONTENDERS)
    if contenders is None:
        return 2
    machine = machine_info(args.threads, transformers=transformers.__version__, trl=trl.__version__)
    print(f"machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs, {args.threads} torch threads; "
          f"torch {machine['torch']}, transformers {machine['transformers']}, TRL {machine['trl']}")
    with tempfile.TemporaryDirectory(prefix="honelm-grpo-bench-") as tmp:
        work = Path(tmp)
        meta = prepare(args, work)
        print(f"model: honelm decoder/{args.size}, random init, {meta['parameters'] / 1e6:.2f}M parameters, BPE vocab "
              f"{meta['tokenizer_vocab']}; {meta['prompts']} addition prompts")
        print(f"work per step: {args.prompts} prompts x {args.group} completions of up to {args.length} tokens; "
              f"{args.warmup_steps} untimed + {args.steps} timed steps; precision {args.precision}", flush=True)
        runs = run_rounds(contenders, args.rounds, args.idle_wait, args.retries, lambda n: run_child(n, args, work),
                          lambda r: f"{r['steps_per_s']:.3f} steps/s, completions {r['completion_length']:.1f} tokens, "
                                    f"other load {r['other_load']:.2f} ({r['wall_s']:.0f}s in all)")
    lines, ratios = report(runs)
    print("\n" + "\n".join(lines))
    if args.json:
        write_json(args.json, {"machine": machine, "data": meta, "settings": {
            k: v for k, v in vars(args).items() if k != "json"}, "runs": runs, "ratios": ratios})
    return 1 if any("error" in r for rs in runs.values() for r in rs) else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny", choices=("test", "tiny", "small"), help="honelm decoder preset")
    p.add_argument("--vocab", type=int, default=300, help="BPE vocabulary trained on the additions")
    p.add_argument("--prompts", type=int, default=8, help="prompts per optimizer step")
    p.add_argument("--group", type=int, default=8, help="G: completions per prompt")
    p.add_argument("--length", type=int, default=16, help="most tokens per completion")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per contender and round")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed optimizer steps before the timed ones")
    p.add_argument("--rounds", type=int, default=3, help="run every contender this often, rotating the order")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="honelm's; TRL: bf16=False for trl")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads in every process")
    p.add_argument("--contenders", default="honelm,trl", help=f"comma-separated subset of {', '.join(CONTENDERS)}")
    p.add_argument("--idle-wait", type=float, default=300, help="seconds to wait for an idle machine before each run")
    p.add_argument("--retries", type=int, default=1, help="rerun a contended child at most this often")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--contender", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup_steps < 0 or args.rounds < 1 or args.group < 2:
        p.error("--steps and --rounds must be >= 1, --warmup-steps >= 0, --group >= 2")
    return child_main(args) if args.contender else parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
