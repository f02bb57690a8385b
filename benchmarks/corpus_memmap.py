#!/usr/bin/env python
"""Pre-training from a corpus larger than memory (data.memmap): peak RSS and tokens/s, in one run.

1. Generates a synthetic text corpus of `--gb` gigabytes (default 2.0) in a temporary folder: one
   document per line, each line a unique number followed by 10-40 fragments of 8 words drawn
   (Zipf-like) from 5,000 made-up words; no copied text. Its first `--small-mb` MB (default 20)
   are a second corpus that fits in memory.
2. Trains a byte-level BPE tokenizer (vocab 8,000) on the small corpus (`honelm tokenizer`).
3. Runs `honelm pretrain` (decoder preset `tiny`, blocks of 128, batch 8, `--steps` steps, one
   thread, fp32) as separate processes, each under a wrapper that reads the peak RSS of the
   process tree's largest process (getrusage RUSAGE_CHILDREN ru_maxrss); the small runs first
   (they fail fast), then the big ones:
     big/memmap (cold)   the big corpus through data.memmap=auto: scan, split, tokenise, train
     big/memmap (warm)   the same command again: everything reused from the cache
     small/in-RAM        the small corpus with data.memmap=off (today's path), and
     small/memmap        the same with data.memmap=on, alternating, --rounds times
   tokens/s is the median of the loop's `train` events (the first one left out: warm-up); the
   ratios compare the memmap runs with the in-RAM run of the same session. The two small runs must
   log identical losses (the same batches).
4. Deletes the temporary folder (unless --keep) and prints a table (and --json).

Run by hand (never by CI), e.g.:
  OMP_NUM_THREADS=1 python benchmarks/corpus_memmap.py --dir /work/exp/corpus_bench --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WRAPPER = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
           "code = subprocess.call(sys.argv[1:]); "
           "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
           "'WALL_S', time.perf_counter() - t, 'RC', code)")


def make_corpus(path: Path, gigabytes: float, seed: int = 0) -> int:
    """Write the synthetic corpus; return its size in bytes."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, size=rng.integers(2, 11))) for _ in range(5000)]
    zipf = 1.0 / np.arange(1, len(words) + 1)
    zipf /= zipf.sum()
    drawn = rng.choice(len(words), size=(200000, 8), p=zipf)
    fragments = [" ".join(words[i] for i in row) for row in drawn.tolist()]
    target, written, doc = int(gigabytes * 1e9), 0, 0
    with open(path, "w", encoding="utf-8") as out:
        while written < target:
            counts = rng.integers(10, 41, size=10000)
            picks = rng.integers(0, len(fragments), size=int(counts.sum()))
            lines, at = [], 0
            for n in counts.tolist():
                lines.append(f"{doc} " + " ".join(fragments[j] for j in picks[at:at + n].tolist()))
                at, doc = at + n, doc + 1
            block = "\n".join(lines) + "\n"
            out.write(block)
            written += len(block)
    return path.stat().st_size


def head(src: Path, dst: Path, megabytes: float) -> None:
    with open(src, "rb") as f:
        data = f.read(int(megabytes * 1e6))
    dst.write_bytes(data[: data.rfind(b"\n") + 1])


def honelm(args: list[str], env: dict[str, str]) -> dict[str, float]:
    """Run `honelm ARGS` under the RSS wrapper; its peak RSS (GB) and wall time (s)."""
    cmd = [sys.executable, "-c", WRAPPER, sys.executable, "-m", "honelm", *args]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    tail = proc.stdout.strip().splitlines()[-1].split()
    if tail[-1] != "0":
        raise SystemExit(f"honelm {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return {"peak_rss_gb": int(tail[1]) / 1e6, "wall_s": float(tail[3]), "log": proc.stderr}


def train_events(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["event"] == "train"]


def pretrain(corpus: Path, run: str, out: Path, tok: Path, steps: int, split: str, env: dict[str, str],
             *extra: str) -> dict:
    args = ["pretrain", f"data.train={corpus}", "model.size=tiny", f"model.tokenizer={tok}", "data.block_size=128",
            "train.batch_size=8", f"train.max_steps={steps}", "train.eval_every=0", "train.log_every=10",
            "train.threads=1", "train.precision=fp32", "train.progress=false", "train.tensorboard=false",
            f"data.split={split}", f"data.cache_dir={out / 'cache'}", f"run.out_dir={out / 'runs'}",
            f"run.name={run}", *extra]
    result = honelm(args, env)
    events = train_events(out / "runs" / run)
    result.update(tokens_per_s=statistics.median(e["tokens_per_s"] for e in events[1:]),
                  losses=[e["loss"] for e in events])
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default="/tmp/honelm_corpus_bench", help="temporary folder (deleted at the end)")
    p.add_argument("--gb", type=float, default=2.0)
    p.add_argument("--small-mb", type=float, default=20.0)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--split", default="99998:1:1", help="the big corpus's data.split (a small validation share)")
    p.add_argument("--small-split", default="98:1:1", help="the small corpus's data.split")
    p.add_argument("--rounds", type=int, default=3, help="alternating in-RAM / memmap runs on the small corpus")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--json", default="")
    a = p.parse_args()
    out = Path(a.dir)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.setdefault("OMP_NUM_THREADS", "1")
    results: dict = {"load_before": os.getloadavg(), "cpus": os.cpu_count()}
    try:
        t = time.perf_counter()
        results["big_bytes"] = make_corpus(out / "big.txt", a.gb)
        results["generate_s"] = time.perf_counter() - t
        head(out / "big.txt", out / "small.txt", a.small_mb)
        results["small_bytes"] = (out / "small.txt").stat().st_size
        honelm(["tokenizer", f"data.train={out / 'small.txt'}", "tokenizer.vocab_size=8000",
                f"run.out_dir={out}", "run.name=tok"], env)
        tok = out / "tok" / "tokenizer"
        plan = [(f"small_{name}_{k}", "small.txt", f"{name}{k}", a.small_split, (f"data.memmap={mode}",))
                for k in range(a.rounds) for name, mode in (("in_ram", "off"), ("memmap", "on"))]
        plan += [("big_memmap_cold", "big.txt", "big1", a.split, ()), ("big_memmap_warm", "big.txt", "big2", a.split, ())]
        runs = {}
        for name, corpus, run, split, extra in plan:  # the small runs first: they fail fast
            runs[name] = pretrain(out / corpus, run, out, tok, a.steps, split, env, *extra)
            if a.json:  # so far, in case a later run fails
                Path(a.json).write_text(json.dumps({**results, "partial": {k: {x: y for x, y in v.items() if x != "log"}
                                                                         for k, v in runs.items()}}, indent=1))
        results["cache_bytes"] = sum(f.stat().st_size for f in (out / "cache").rglob("*") if f.is_file())
    finally:
        if not a.keep:
            shutil.rmtree(out, ignore_errors=True)
    results["load_after"] = os.getloadavg()
    ram = statistics.median(runs[f"small_in_ram_{k}"]["tokens_per_s"] for k in range(a.rounds))
    results["same_losses_small"] = all(runs[f"small_in_ram_{k}"]["losses"] == runs[f"small_memmap_{k}"]["losses"]
                                       for k in range(a.rounds))
    results["small_memmap_vs_in_ram_median_of_rounds"] = statistics.median(
        runs[f"small_memmap_{k}"]["tokens_per_s"] / runs[f"small_in_ram_{k}"]["tokens_per_s"] for k in range(a.rounds))
    for name, r in runs.items():
        r["tokens_per_s_vs_in_ram"] = r["tokens_per_s"] / ram  # against the median of the in-RAM rounds
        r["log_lines"] = [x for x in r.pop("log").splitlines() if "data.memmap" in x or "reused" in x]
        r.pop("losses")
    results["runs"] = runs
    print(f"corpus {results['big_bytes'] / 1e9:.2f} GB (generated in {results['generate_s']:.0f} s), small "
          f"{results['small_bytes'] / 1e6:.1f} MB; cache {results['cache_bytes'] / 1e9:.2f} GB; load before "
          f"{results['load_before'][0]:.2f}, after {results['load_after'][0]:.2f} on {results['cpus']} CPUs")
    print(f"{'run':<18} {'peak RSS GB':>11} {'wall s':>8} {'tokens/s':>9} {'vs in-RAM':>9}")
    for name, r in runs.items():
        print(f"{name:<18} {r['peak_rss_gb']:>11.2f} {r['wall_s']:>8.0f} {r['tokens_per_s']:>9.0f} "
              f"{r['tokens_per_s_vs_in_ram']:>9.3f}")
    print(f"identical losses, small corpus in RAM vs memmap: {results['same_losses_small']}; memmap/in-RAM tokens/s "
          f"(median of per-round ratios): {results['small_memmap_vs_in_ram_median_of_rounds']:.3f}")
    for name, r in runs.items():
        for line in r["log_lines"]:
            print(f"  [{name}] {line}")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
