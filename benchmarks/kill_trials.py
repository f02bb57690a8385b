"""Kill trials: runs killed at random moments, resumed, and compared bit for bit with an uninterrupted run.

    python benchmarks/kill_trials.py [--out runs/bench-kill] [--trials 6] [--seed 0] [--json kill.json]

Every verb that trains (pretrain, classify, sft, dpo, grpo, distill) is run once uninterrupted on
the demo's generated data (`honelm.demo.generate_data`, tiny `model.size=test` models, 24 optimizer
steps, a checkpoint every 3, one tokenizer trained once and shared, one thread). Then, per verb,
`--trials` fresh runs of the same command are started with the real CLI in a subprocess and hit,
once training has begun, at a moment drawn uniformly over the reference run's time from the start of
training to its `end` event (steps and checkpoint writes), by
one of SIGKILL (the OOM killer, a lost machine), SIGTERM (a scheduler's stop) and SIGINT (Ctrl-C),
in turn. The run is then resumed with `honelm VERB --resume RUN` until it exits 0 (at most three
times), and its final checkpoint's weights are compared with the uninterrupted run's.

Outcome per trial:

- identical: the resumed run's final weights equal the uninterrupted run's, bit for bit;
- different: it finished with other weights (a resume that is not exact);
- failed: a resume exited non-zero (or printed a traceback) three times.

A trial whose kill left a half-written checkpoint (a `.tmp-step-*` directory) counts as "during a
checkpoint write". A kill that lands after the last step (the process was already writing `best/`
or exiting) is still a trial: the resume must then say the run is finished and change nothing.
Hand-run, never by CI; about 10-15 minutes on 2 cores with the default 6 trials per verb.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, child_env  # noqa: E402

sys.path.insert(0, str(REPO))
from honelm.demo import generate_data  # noqa: E402

STEPS = 24
FAST = ["train.precision=fp32", "train.progress=false", "train.tensorboard=false", "train.threads=1",
        f"train.max_steps={STEPS}", "train.save_every=3", "train.eval_every=6", "train.log_every=1",
        "train.keep_checkpoints=10", "run.out_dir=runs"]
SIGNALS = (("SIGKILL", signal.SIGKILL), ("SIGTERM", signal.SIGTERM), ("SIGINT", signal.SIGINT))
FINAL = f"checkpoints/step-{STEPS:08d}/model.safetensors"


def verbs() -> dict[str, list[str]]:
    """Verb -> its arguments (relative to the project directory; `refs/` holds the runs others start from)."""
    tok = "model.tokenizer=tok"
    return {
        "pretrain": ["pretrain", "data.train=data/corpus.txt", "model.size=test", tok, "data.block_size=32",
                     "train.batch_size=4"],
        "classify": ["classify", "data.train=data/reviews.jsonl", "model.init_from=refs/pretrain", "data.max_length=32",
                     "train.batch_size=8"],
        "sft": ["sft", "data.train=data/instructions.jsonl", "model.init_from=refs/pretrain", "data.max_length=64",
                "train.batch_size=4", "samples.n=0"],
        "dpo": ["dpo", "data.train=data/preferences.jsonl", "model.init_from=refs/pretrain", "data.max_length=64",
                "train.batch_size=4"],
        "grpo": ["grpo", "data.train=data/arithmetic_prompts.jsonl", "model.init_from=refs/pretrain",
                 "reward.function=numeric", "grpo.group_size=4", "grpo.prompts_per_rollout=2",
                 "grpo.response_length=6", "train.batch_size=8", "train.grad_accum=1", "train.eval_batch_size=16"],
        "distill": ["distill", "data.train=data/reviews.jsonl", "teacher.model=refs/classify",
                    "model.init_from=refs/pretrain", "data.max_length=32", "train.batch_size=8"],
    }


def honelm(args: list[str], cwd: Path) -> subprocess.Popen:
    env = child_env(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "honelm", *args], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def finish(args: list[str], cwd: Path) -> tuple[int, str]:
    proc = honelm(args, cwd)
    _, err = proc.communicate()
    return proc.returncode, err


def project(out: Path) -> Path:
    """OUT/project: the demo data and one shared byte-level BPE tokenizer (a tokenizer trained per run would differ)."""
    where = out / "project"
    if not (where / "tok" / "tokenizer.json").is_file():
        shutil.rmtree(where, ignore_errors=True)
        generate_data(where / "data", n_corpus=400, n_labelled=160, seed=1, n_instructions=160, n_preferences=160)
        code, err = finish(["tokenizer", "data.train=data/corpus.txt", "tokenizer.vocab_size=300",
                            "run.out_dir=.", "run.name=tok"], where)
        if code != 0:
            raise SystemExit(err[-3000:])
    return where


def reference(where: Path, verb: str, args: list[str]) -> tuple[dict[str, torch.Tensor], float]:
    """The uninterrupted run refs/VERB (kept and reused): its final weights, and the seconds from the start of its
    training to its `end` event (the window the kill moments are drawn from: every step and checkpoint write; a
    slower trial run may still be hit after its last step, which is a trial too)."""
    run = where / "refs" / verb
    window_file = run / "kill_window.json"
    if not (run / FINAL).is_file() or not window_file.is_file():
        shutil.rmtree(run, ignore_errors=True)
        proc = honelm([*args, *FAST, "run.out_dir=refs", f"run.name={verb}"], where)
        began = _wait_for_training(run, proc)
        while proc.poll() is None and " end reason=" not in _log(run):
            time.sleep(0.01)
        ended = time.perf_counter()
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"{verb}: the reference run failed:\n{err[-3000:]}")
        window_file.write_text(json.dumps({"seconds": ended - began}), encoding="utf-8")
    seconds = float(json.loads(window_file.read_text())["seconds"])
    return {k: v.clone() for k, v in load_file(run / FINAL).items()}, seconds


def _wait_for_training(run: Path, proc: subprocess.Popen) -> float:
    """Poll until the run's log says training began (or the process ended); the perf_counter() of that moment."""
    start = time.perf_counter()
    while not _training(run) and proc.poll() is None and time.perf_counter() - start < 300:
        time.sleep(0.01)
    return time.perf_counter()


def _log(run: Path) -> str:
    log = run / "log.txt"
    return log.read_text(encoding="utf-8", errors="replace") if log.is_file() else ""


def _training(run: Path) -> bool:
    return "training " in _log(run)


def hit(where: Path, args: list[str], name: str, sig: signal.Signals, delay: float) -> tuple[bool, bool, bool]:
    """Start the run, wait for training to begin, send `sig` after `delay` s; (the process was still running,
    a checkpoint was half-written, the last step's checkpoint was already complete)."""
    run = where / "runs" / name
    proc = honelm([*args, *FAST, f"run.name={name}"], where)
    _wait_for_training(run, proc)
    time.sleep(delay)
    alive = proc.poll() is None
    if alive:
        proc.send_signal(sig)
    proc.communicate()
    during_write = any((run / "checkpoints").glob(".tmp-*")) if (run / "checkpoints").is_dir() else False
    return alive, during_write, (run / FINAL).is_file()


def trial(where: Path, verb: str, args: list[str], ref: dict[str, torch.Tensor], seconds: float, index: int,
          rng: random.Random) -> dict[str, Any]:
    sig_name, sig = SIGNALS[index % len(SIGNALS)]
    name = f"{verb}-{index}"
    shutil.rmtree(where / "runs" / name, ignore_errors=True)
    delay = rng.uniform(0.0, seconds)
    alive, during_write, done = hit(where, args, name, sig, delay)
    resumes, code, err = 0, 1, ""
    while code != 0 and resumes < 3:
        code, err = finish([args[0], "--resume", f"runs/{name}"], where)
        resumes += 1
    final = where / "runs" / name / FINAL
    if code != 0 or "Traceback" in err or not final.is_file():
        got = "failed"
    else:
        weights = load_file(final)
        same = weights.keys() == ref.keys() and all(torch.equal(weights[k], ref[k]) for k in weights)
        got = "identical" if same else "different"
    last = (err.strip().splitlines() or [""])[-1]
    moment = ("during a checkpoint write" if during_write else "after the process ended" if not alive
              else "after the last step" if done else "mid-run")
    return {"verb": verb, "signal": sig_name, "delay_s": round(delay, 2), "moment": moment,
            "during_write": during_write, "resumes": resumes, "outcome": got, "last_line": last[:200]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/bench-kill", help="working directory (default: %(default)s)")
    p.add_argument("--trials", type=int, default=6, help="killed runs per verb")
    p.add_argument("--verbs", default=",".join(verbs()), help="comma-separated subset")
    p.add_argument("--seed", type=int, default=0, help="draws the kill moments")
    p.add_argument("--json", default="", help="also write the results as JSON here")
    args = p.parse_args()
    where = project(Path(args.out).resolve())
    rng = random.Random(args.seed)
    rows: list[dict[str, Any]] = []
    table = verbs()
    chosen = [v.strip() for v in args.verbs.split(",") if v.strip()]
    for needed in ("pretrain", "classify"):  # the runs others start from (refs/pretrain) or learn from (refs/classify)
        if any(f"refs/{needed}" in a for v in chosen for a in table[v]):
            reference(where, needed, table[needed])
    for verb in chosen:
        ref, seconds = reference(where, verb, table[verb])
        for i in range(args.trials):
            row = trial(where, verb, table[verb], ref, seconds, i, rng)
            rows.append(row)
            print(f"{row['outcome']:<9} {verb:<8} {row['signal']:<7} at +{row['delay_s']:5.2f}s ({row['moment']}), "
                  f"{row['resumes']} resume(s)  {row['last_line'][:100]}", flush=True)
    identical = sum(r["outcome"] == "identical" for r in rows)
    mid = [r for r in rows if r["moment"] in ("mid-run", "during a checkpoint write")]
    print(f"\nidentical: {identical}/{len(rows)} trials ({sum(r['outcome'] == 'identical' for r in mid)}/{len(mid)} "
          f"hit before the last step, {sum(r['during_write'] for r in rows)} of them during a checkpoint write); "
          f"different: {sum(r['outcome'] == 'different' for r in rows)}; failed: "
          f"{sum(r['outcome'] == 'failed' for r in rows)}")
    for name, _ in SIGNALS:
        part = [r for r in rows if r["signal"] == name]
        print(f"  {name}: {sum(r['outcome'] == 'identical' for r in part)}/{len(part)}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
