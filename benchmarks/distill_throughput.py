#!/usr/bin/env python
"""Token-level KD throughput for causal LMs: `honelm distill` vs TRL's GKD trainer, same teacher, student, data, steps.

Models: a teacher `decoder/<--teacher-size>` (default `small`: 8 layers, d=384) and a student
`decoder/<--student-size>` (default `tiny`: 4 layers, d=128) from honelm's presets, randomly
initialised (seeds `--seed` and `--seed` + 1), sharing one byte-level BPE tokenizer of `--vocab`
trained in the parent on the conversations as honelm's default chat template renders them (that
template, `<|role|>\\n content EOS` per turn, is saved with it). The parent saves both models with the
tokenizer once; every contender loads those two directories, so all start from identical weights
and render identical text.

Data: `--rows` instruction rows generated in-process (`honelm.demo.instruction_rows`: alpaca rows and
two-turn messages rows with a system prompt), or with `--data` an alpaca/messages file such as
`../shared/data/alpaca-en-demo/alpaca_en_demo.json` (skipped with a message when absent). honelm's
reader turns every row into messages; the parent writes them as one `{"messages": [...]}` JSONL file
that both contenders read. The loss is on the last assistant turn with its EOS (honelm
`data.train_on=last`; TRL's chat collator takes every earlier turn as the prompt and labels the rest).
Rows longer than `--max-length` tokens are counted and printed: honelm keeps their start, TRL's
collator their end, so pick a length that truncates none (the default does on the generated rows).

Work per optimizer step, the same for both: `--batch-size` conversations, one per row (no packing),
off-policy (the data's own answers; no student sampling: honelm `distill.on_policy=0`, TRL `lmbda=0`,
`seq_kd=False`), forward KL(teacher || student) at temperature 1 on the response tokens, no
gold-label term (honelm `distill.alpha=0`; GKD has none), summed over the batch's target tokens and
divided by their number; one AdamW update at `--lr` (linear decay to 0, no warm-up, no weight decay:
TRL's defaults), clip 1.0, dropout off (the presets have none), no gradient checkpointing (TRL's
default is on: turned off, as honelm trains), `--precision` (fp32 by default for both; the TRL
contender `trl_bf16` uses TRL's default bf16=True).

  honelm     `honelm.stages.distill.Distillation` through `honelm.stages.runner.run_stage` (the `honelm
             distill` verb itself) with data.task=generation, distill.mode=token, data.packing=false
             (length-grouped batches of one conversation per row), model.init_from the student and
             teacher.model the teacher; 98% of the rows in train, 2% in validation (`data.split=98:2:0`;
             read only after the timed span), no checkpoints or samples inside it. Before step 0 the
             teacher runs ONCE over every training conversation (fp32, batches of 64, length-sorted) and
             its top-`--top-k` next-token log-probs at the target positions are cached
             (RUN/teacher/topk.safetensors); each step then runs the student only and reads the cache.
  trl        `trl.experimental.gkd.GKDTrainer` with `GKDConfig` defaults except what the work must share
             (lmbda=0, beta=0 = forward KL, batch, max_length, lr, steps, bf16=False,
             gradient_checkpointing=False, no warm-up) and what would write files or report. Every step
             runs the teacher (no_grad) and the student over the whole left-padded batch and takes the
             KL over the full vocabulary at every response position (`generalized_jsd_loss`, T = 1).
  trl_bf16   the same with bf16=True (TRL's default; the teacher's forward is under bf16 autocast too).

Why GKDTrainer: TRL 1.16's `trl.DistillationTrainer` (`DistillationConfig`) has no off-policy mode: every
step samples completions from the student (its `lmbda`-free design is GKD's lmbda = 1). The off-policy
token-level KD that `honelm distill` does by default is `GKDTrainer` with lmbda = 0.

What cannot be made the same:
- The teacher's work is placed differently. honelm pays it once, before step 0, over the whole training
  split; TRL pays it inside every step, over that step's batch. So two spans are timed. "train steps":
  `--steps` whole optimizer steps (the same span for both). "end to end": those steps plus, for honelm,
  the teacher caching prorated to the real tokens the timed steps trained on (cache seconds x timed
  tokens / cached tokens: what the teacher costs per trained example over an epoch, where every cached
  example is trained on once; the raw cache time is printed too). TRL's end to end is its train steps.
- The loss's support: honelm matches the teacher's top-k plus one bucket for the rest of the vocabulary
  (`distill.tail=bucket`, its default; k = `--top-k`, default 32 = honelm's default); TRL the whole
  vocabulary. `--top-k 0` gives honelm the whole vocabulary, where its forward KL equals TRL's exactly.
- Padding: TRL pads every batch on the left to its longest row, in random order; honelm pads on the
  right and draws batches from length-sorted windows (its BatchStream with lengths), so it pads less.
  Tokens/s counts real (non-padding) tokens only, so padding a contender wastes shows as lower tokens/s.
- Batch order: each contender draws its batches in its own seeded order, so the timed steps hold other
  conversations (the table's tokens/step and targets/step show how far apart). Steps/s depends on which
  rows a step drew, tokens/s much less: on data of very unequal lengths (alpaca-en-demo) read tokens/s.
  honelm's length-grouped batches make its steps' lengths vary more, hence 20 timed steps by default.

Timing (as the other throughput benchmarks, `_common.StepClock`): every contender runs warmup + steps + 1
optimizer steps and stamps the start of each (honelm: when the loop asks its BatchStream for the step's
batches; TRL: `on_step_begin`); the span is `--steps` whole steps (collation, teacher forward for TRL,
student forward, loss, backward, optimizer) after `--warmup-steps` untimed ones. honelm's teacher caching
is timed separately around `compute_teacher_topk` (the teacher's forward passes and top-k only; loading
the teacher is outside it, as TRL's is outside its span). Tokens: the real tokens of every row the
contender batched in the timed steps (attention_mask sums, counted by wrapping its batch maker); target
tokens: the response positions the loss covered. Peak memory: the process's RSS high-water mark at the
end of the timed span. Each ratio (honelm / TRL: steps/s and tokens/s, train steps and end to end) is
the median of per-round ratios over `--rounds` rounds in rotating order; before each child the script
waits for the machine to go idle and reruns a contended child (`--retries`).

Run by hand (never by CI):  python benchmarks/distill_throughput.py [--json distill.json]
Smoke run (numbers meaningless):  python benchmarks/distill_throughput.py --teacher-size tiny \\
    --student-size test --rows 120 --vocab 400 --max-length 160 --batch-size 4 --steps 2 --warmup-steps 1 \\
    --rounds 1 --idle-wait 0 --contenders honelm,trl
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

from _common import (StepClock, child_env, fmt_row, machine_info, median, peak_rss_mib,  # noqa: E402
                     pick_contenders, run_child_process, run_rounds, write_json)

DEFAULT_DATA = REPO.parent / "shared" / "data" / "alpaca-en-demo" / "alpaca_en_demo.json"
CONTENDERS = ("honelm", "trl", "trl_bf16")


# ----------------------------------------------------------------------------------------------
# data and models (parent)


def prepare(args: argparse.Namespace, work: Path) -> dict[str, Any] | None:
    """Conversations as messages JSONL, one tokenizer (+ chat template), teacher and student saved in work/."""
    from honelm.data.chat import ensure_template, read_conversations
    from honelm.data.sft import template_texts
    from honelm.demo import instruction_rows
    from honelm.models import build_model, count_parameters
    from honelm.tokenizer import train_tokenizer

    if args.data:
        src = Path(args.data)
        if not src.is_file():
            return None
        source = str(src)
    else:
        src = work / "instructions.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r in instruction_rows(args.rows, args.seed)), encoding="utf-8")
        source = f"generated (honelm.demo.instruction_rows, {args.rows} rows)"
    convs = [c.messages for c in read_conversations(str(src))]
    (work / "convs.jsonl").write_text("".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in convs),
                                      encoding="utf-8")
    tok = train_tokenizer(template_texts(convs), kind="bpe", vocab_size=args.vocab)
    ensure_template(tok)
    sizes = {}
    for role, size, seed in (("teacher", args.teacher_size, args.seed), ("student", args.student_size, args.seed + 1)):
        model = build_model("decoder", size, vocab_size=len(tok), task="lm", seed=seed, max_positions=args.max_length,
                            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        model.save_pretrained(work / role, safe_serialization=True)
        tok.save_pretrained(work / role)
        sizes[role] = count_parameters(model)[1]
    rendered = [tok.apply_chat_template(m, tokenize=False) for m in convs]
    lengths = sorted(len(ids) for ids in tok(rendered, add_special_tokens=False)["input_ids"])
    return {"source": source, "conversations": len(convs), "tokenizer_vocab": len(tok),
            "teacher_parameters": sizes["teacher"], "student_parameters": sizes["student"],
            "tokens_median": lengths[len(lengths) // 2], "tokens_max": lengths[-1],
            "longer_than_max_length": sum(n > args.max_length for n in lengths)}


# ----------------------------------------------------------------------------------------------
# contenders (children)


def total_steps(args: argparse.Namespace) -> int:
    return args.warmup_steps + args.steps + 1


def count(batch: dict[str, Any], tokens: list[int], targets: list[int]) -> None:
    """Record a batch's real tokens and its target (response) positions (position t predicts labels[t+1])."""
    tokens.append(int(batch["attention_mask"].sum()))
    targets.append(int((batch["labels"][:, 1:] != -100).sum()))


def run_honelm(args: argparse.Namespace, clock: StepClock, work: Path, tokens: list[int], targets: list[int],
               teacher: dict[str, float]) -> dict[str, Any]:
    from honelm import config as C
    from honelm import teacher_lm
    from honelm.loop import BatchStream
    from honelm.stages import contract, distill
    from honelm.stages.runner import run_stage

    class TimedStream(BatchStream):
        def next_step(self):  # type: ignore[no-untyped-def]
            clock.mark()
            batches = super().next_step()
            for b in batches:
                count(b, tokens, targets)
            return batches

    cache_topk = teacher_lm.compute_teacher_topk

    def timed_topk(model, examples, *a, **k):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        out = cache_topk(model, examples, *a, **k)
        teacher["seconds"] += time.perf_counter() - t0
        teacher["tokens"] += sum(len(ids) for ids in examples.ids)
        return out

    contract.BatchStream = TimedStream  # RunContext.stream builds the stage's stream from this name
    teacher_lm.compute_teacher_topk = timed_topk  # teacher_topk calls it by this name
    run_dir = Path(tempfile.mkdtemp(prefix="honelm_run_", dir=work))
    cfg = C.build(distill.DistillConfig, overrides=[
        f"data.train={work / 'convs.jsonl'}", "data.task=generation", "data.format=messages", "data.split=98:2:0",
        f"data.max_length={args.max_length}", "data.packing=false", "data.train_on=last",
        f"teacher.model={work / 'teacher'}", f"model.init_from={work / 'student'}", "distill.mode=token",
        "distill.divergence=forward", "distill.alpha=0", "distill.temperature=1", "distill.on_policy=0",
        f"distill.top_k={args.top_k or args.vocab_size}", f"train.batch_size={args.batch_size}", "train.grad_accum=1",
        f"train.max_steps={total_steps(args)}", f"train.lr={args.lr}", "train.warmup_steps=0", "train.schedule=linear",
        "train.min_lr_ratio=0", "train.weight_decay=0", "train.eval_every=0",
        "train.save_every=0", "train.log_every=1000", "train.progress=false", "train.tensorboard=false",
        f"train.threads={args.threads}", f"train.precision={args.precision}", "samples.n=0", f"run.seed={args.seed}",
        f"run.out_dir={run_dir}", "run.name=distill"])
    run_stage(distill.Distillation(), cfg)
    k = f"top-{args.top_k} + tail bucket" if args.top_k else "whole vocabulary"
    return {"settings": f"honelm distill token-level (precision={args.precision}, {k})"}


def run_trl(args: argparse.Namespace, clock: StepClock, work: Path, tokens: list[int], targets: list[int],
            bf16: bool) -> dict[str, Any]:
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    rows = [json.loads(x) for x in (work / "convs.jsonl").read_text(encoding="utf-8").splitlines()]
    student = AutoModelForCausalLM.from_pretrained(work / "student")
    teacher = AutoModelForCausalLM.from_pretrained(work / "teacher")
    tok = AutoTokenizer.from_pretrained(work / "student")

    class Clock(TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            clock.mark()

    targs = GKDConfig(output_dir=str(work / f"trl_out_{os.getpid()}"), per_device_train_batch_size=args.batch_size,
                      gradient_accumulation_steps=1, max_steps=total_steps(args), learning_rate=args.lr,
                      warmup_steps=0, lmbda=0.0, beta=0.0, seq_kd=False, max_length=args.max_length, bf16=bf16,
                      gradient_checkpointing=False, use_cpu=True, save_strategy="no", report_to="none",
                      logging_steps=1000, seed=args.seed, disable_tqdm=True)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=targs, train_dataset=Dataset.from_list(rows),
                         processing_class=tok, callbacks=[Clock()])
    collate = trainer.data_collator

    def counting(examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate(examples)
        count(batch, tokens, targets)
        return batch

    trainer.data_collator = counting
    trainer.train()
    return {"settings": f"TRL {trl.__version__} GKDConfig(lmbda=0, beta=0, bf16={bf16}, gradient_checkpointing=False)"}


def child_main(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    clock = StepClock(args.warmup_steps, args.steps)
    tokens: list[int] = []
    targets: list[int] = []
    teacher = {"seconds": 0.0, "tokens": 0}
    t0 = time.perf_counter()
    if args.contender == "honelm":
        info = run_honelm(args, clock, work, tokens, targets, teacher)
    else:
        info = run_trl(args, clock, work, tokens, targets, bf16=args.contender == "trl_bf16")
    seconds = clock.seconds()
    timed = slice(args.warmup_steps, args.warmup_steps + args.steps)  # one batch per step (grad_accum 1)
    real, target = sum(tokens[timed]), sum(targets[timed])
    # the teacher's caching, prorated to the tokens the timed steps trained on (0 for TRL: its teacher is in the span)
    teacher_share = teacher["seconds"] * real / teacher["tokens"] if teacher["tokens"] else 0.0
    e2e = seconds + teacher_share
    result = {"contender": args.contender, "seconds": seconds, "steps_per_s": args.steps / seconds,
              "step_s": seconds / args.steps, "tokens": real, "tokens_per_s": real / seconds, "target_tokens": target,
              "targets_per_step": target / args.steps,
              "teacher_cache_s": teacher["seconds"], "teacher_cache_tokens": teacher["tokens"],
              "teacher_share_s": teacher_share, "e2e_seconds": e2e, "e2e_steps_per_s": args.steps / e2e,
              "e2e_tokens_per_s": real / e2e, "peak_rss_mib": clock.rss_at_end, "peak_rss_mib_process": peak_rss_mib(),
              "wall_s": time.perf_counter() - t0, **clock.load(), **info}
    print("RESULT " + json.dumps(result), flush=True)
    return 0


# ----------------------------------------------------------------------------------------------
# parent


def run_child(name: str, args: argparse.Namespace, work: Path, vocab_size: int) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--contender", name, "--work", str(work),
           "--vocab-size", str(vocab_size)]
    for key in ("steps", "warmup_steps", "batch_size", "max_length", "top_k", "lr", "precision", "threads", "seed"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    env = child_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TQDM_DISABLE="1")
    return run_child_process(cmd, env, "contender", name)


def report(runs: dict[str, list[dict]]) -> tuple[list[str], dict[str, Any]]:
    head = ["contender", "steps/s", "tokens/s", "e2e steps/s", "e2e tokens/s", "teacher cache s", "tokens/step",
            "targets/step",
            "peak RSS MiB", "other load", "settings"]
    rows = []
    for name, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            error = rs[-1].get("error", "") if rs else ""
            rows.append([name, "failed", *[""] * (len(head) - 3), error[-200:]])
            continue
        cache = median([r["teacher_cache_s"] for r in ok])
        rows.append([name, f"{median([r['steps_per_s'] for r in ok]):.3f}",
                     f"{median([r['tokens_per_s'] for r in ok]):,.0f}",
                     f"{median([r['e2e_steps_per_s'] for r in ok]):.3f}",
                     f"{median([r['e2e_tokens_per_s'] for r in ok]):,.0f}",
                     f"{cache:.2f} ({median([r['teacher_share_s'] for r in ok]):.2f})" if cache else "in steps",
                     f"{median([r['tokens'] / (r['seconds'] * r['steps_per_s']) for r in ok]):.0f}",
                     f"{median([r['targets_per_step'] for r in ok]):.0f}",
                     f"{median([r['peak_rss_mib'] for r in ok]):,.0f}", f"{max(r['other_load'] for r in ok):.2f}",
                     ok[0]["settings"]])
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    lines = [fmt_row(head, widths), fmt_row(["-" * w for w in widths], widths), *(fmt_row(r, widths) for r in rows),
             "", "teacher cache s: honelm's one teacher pass over the training split (in brackets: its share for the "
             "timed steps' tokens, added to the e2e span)", ""]
    ratios: dict[str, Any] = {}
    for other in (c for c in runs if c != "honelm"):
        both = [(a, b) for a, b in zip(runs.get("honelm", []), runs[other]) if "error" not in a and "error" not in b]
        if not both:
            continue
        entry = {}
        for key, what in (("steps_per_s", "steps/s"), ("tokens_per_s", "tokens/s"), ("e2e_steps_per_s", "e2e steps/s"),
                          ("e2e_tokens_per_s", "e2e tokens/s")):
            per_round = [a[key] / b[key] for a, b in both]
            entry[key] = {"ratio": median(per_round), "per_round": per_round}
            lines.append(f"honelm / {other:<9} {what:<13} {median(per_round):5.2f}x   rounds: "
                         + ", ".join(f"{x:.2f}" for x in per_round))
        ratios[f"honelm/{other}"] = entry
    return lines, ratios


def parent_main(args: argparse.Namespace) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch
    import transformers

    try:
        import trl
        from trl.experimental.gkd import GKDTrainer  # the reference contender
    except ImportError:
        print("skipped: TRL with trl.experimental.gkd is not installed (pip install trl)")
        return 0
    torch.set_num_threads(args.threads)
    contenders = pick_contenders(args.contenders, CONTENDERS)
    if contenders is None:
        return 2
    machine = machine_info(args.threads, transformers=transformers.__version__, trl=trl.__version__,
                           reference=f"{GKDTrainer.__module__}.{GKDTrainer.__qualname__}")
    print(f"machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs, {args.threads} torch threads; "
          f"torch {machine['torch']}, transformers {machine['transformers']}, TRL {machine['trl']} "
          f"({machine['reference']})")
    with tempfile.TemporaryDirectory(prefix="honelm-distill-bench-") as tmp:
        work = Path(tmp)
        meta = prepare(args, work)
        if meta is None:
            print(f"skipped: {args.data} not found (leave out --data for generated instructions)")
            return 0
        print(f"data: {meta['source']}: {meta['conversations']} conversations, median {meta['tokens_median']} tokens "
              f"(max {meta['tokens_max']}), {meta['longer_than_max_length']} longer than --max-length "
              f"{args.max_length}")
        print(f"models: teacher decoder/{args.teacher_size} {meta['teacher_parameters'] / 1e6:.2f}M, student "
              f"decoder/{args.student_size} {meta['student_parameters'] / 1e6:.2f}M parameters, random init; shared "
              f"BPE vocab {meta['tokenizer_vocab']}")
        print(f"work per step: {args.batch_size} conversations, off-policy forward KL at T=1; {args.warmup_steps} "
              f"untimed + {args.steps} timed steps; precision {args.precision}; honelm top-k "
              f"{args.top_k or 'whole vocabulary'}", flush=True)
        runs = run_rounds(contenders, args.rounds, args.idle_wait, args.retries,
                          lambda n: run_child(n, args, work, meta["tokenizer_vocab"]),
                          lambda r: f"{r['steps_per_s']:.3f} steps/s, {r['tokens_per_s']:,.0f} tokens/s, e2e "
                                    f"{r['e2e_steps_per_s']:.3f} steps/s, other load {r['other_load']:.2f} "
                                    f"({r['wall_s']:.0f}s in all)")
    lines, ratios = report(runs)
    print("\n" + "\n".join(lines))
    if args.json:
        write_json(args.json, {"machine": machine, "data": meta, "settings": {
            k: v for k, v in vars(args).items() if k != "json"}, "runs": runs, "ratios": ratios})
    return 1 if any("error" in r for rs in runs.values() for r in rs) else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher-size", default="small", choices=("test", "tiny", "small"), help="teacher decoder preset")
    p.add_argument("--student-size", default="tiny", choices=("test", "tiny", "small"), help="student decoder preset")
    p.add_argument("--data", help=f"alpaca/messages rows instead of generated ones (e.g. {DEFAULT_DATA})")
    p.add_argument("--rows", type=int, default=600, help="generated instruction rows (without --data)")
    p.add_argument("--vocab", type=int, default=2000,
                   help="BPE vocabulary trained on the conversations (at most: the generated rows make ~600)")
    p.add_argument("--max-length", type=int, default=128, help="longest conversation in tokens (both contenders)")
    p.add_argument("--batch-size", type=int, default=8, help="conversations per optimizer step")
    p.add_argument("--top-k", type=int, default=32, help="honelm's cached teacher log-probs per token; 0 = all")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per contender and round")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed optimizer steps before the timed ones")
    p.add_argument("--rounds", type=int, default=3, help="run every contender this often, rotating the order")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="honelm's; TRL: bf16=False for trl")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads in every process")
    p.add_argument("--contenders", default="honelm,trl", help=f"comma-separated subset of {', '.join(CONTENDERS)}")
    p.add_argument("--idle-wait", type=float, default=300, help="seconds to wait for an idle machine before each run")
    p.add_argument("--retries", type=int, default=1, help="rerun a contended child at most this often")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--contender", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--vocab-size", type=int, default=0, help=argparse.SUPPRESS)  # the tokenizer's, for --top-k 0
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup_steps < 0 or args.rounds < 1 or args.batch_size < 1 or args.top_k < 0:
        p.error("--steps, --rounds and --batch-size must be >= 1, --warmup-steps and --top-k >= 0")
    return child_main(args) if args.contender else parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
