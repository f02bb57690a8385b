"""Reliability attacks against `honelm pretrain --resume`: every way issue 23 broke a run, counted.

    python benchmarks/reliability_attacks.py [--out runs/bench-reliability] [--json results.json]

One tiny pretrain run (model.size=test, 8 steps, checkpoints at 4 and 8, the corpus read by a
relative path) is trained once, uninterrupted. Each attack works on a fresh copy of it, damages
it, and runs the real CLI in a subprocess (`python -m honelm pretrain --resume`), as a user would:
a resume that refuses the damaged step 8 falls back to step 4 and trains steps 5..8 again. The outcome is one of

- recovered: exit 0, and the final weights equal the uninterrupted run's bit for bit;
- refused: exit 1 with a one-line `honelm ...: error:` message and no traceback;
- silent: exit 0 with other weights, or a refusal that was due and did not come;
- traceback: a Python traceback on stderr.

The script prints one row per attack and the totals (refused or recovered / total, tracebacks);
numbers for docs/benchmarks.md ("Reliability"). A checkpoint written before manifests existed
(its manifest removed) with bytes changed inside a tensor is listed, expected "silent": a checksum
that was never written cannot be checked. Hand-run, never by CI; about 2-4 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO  # noqa: E402

sys.path.insert(0, str(REPO))
from honelm.demo import generate_data  # noqa: E402

FAST = ["train.precision=fp32", "train.progress=false", "train.tensorboard=false", "train.threads=1"]
ARGS = ["data.train=corpus.txt", "model.size=test", "model.vocab_size=300", "data.block_size=32",
        "train.max_steps=8", "train.eval_every=4", "train.save_every=4", "train.batch_size=4", "train.log_every=1",
        "run.out_dir=runs", *FAST]
S4, S8 = "checkpoints/step-00000004", "checkpoints/step-00000008"


def honelm(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "honelm", *args], cwd=cwd, env=env, capture_output=True, text=True)


def corpus(out: Path) -> str:
    """The demo corpus, 400 documents (honelm.demo.generate_data, seed 1)."""
    data = out / "data"
    if not (data / "corpus.txt").is_file():
        generate_data(data, n_corpus=400, n_labelled=40, seed=1)
    return (data / "corpus.txt").read_text(encoding="utf-8")


def garble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little") + 16
    data[start:start + 64] = bytes(b ^ 0xA5 for b in data[start:start + 64])
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def unmanifest(run: Path) -> None:
    for ckpt in (run / "checkpoints").glob("step-*"):
        (ckpt / "manifest.json").unlink()


# name -> (damage(run, project), the outcome due); a damage may return the directory to resume from, or a lock
def _attacks() -> dict[str, tuple[Callable[[Path, Path], Any], str]]:
    return {
        "garbled tensor bytes (newest)": (lambda r, p: garble(r / S8 / "model.safetensors"), "recovered"),
        "truncated model.safetensors": (lambda r, p: truncate(r / S8 / "model.safetensors"), "recovered"),
        "empty model.safetensors": (lambda r, p: (r / S8 / "model.safetensors").write_bytes(b""), "recovered"),
        "empty optimizer.pt": (lambda r, p: (r / S8 / "optimizer.pt").write_bytes(b""), "recovered"),
        "truncated optimizer.pt": (lambda r, p: truncate(r / S8 / "optimizer.pt"), "recovered"),
        "garbled rng.pt": (lambda r, p: garble_bytes(r / S8 / "rng.pt"), "recovered"),
        "rng.pt deleted": (lambda r, p: (r / S8 / "rng.pt").unlink(), "recovered"),
        "bad JSON in trainer_state.json": (lambda r, p: (r / S8 / "trainer_state.json").write_text('{"step": 8,'),
                                           "recovered"),
        "edited trainer_state.json": (lambda r, p: edit_state(r / S8 / "trainer_state.json"), "recovered"),
        "legacy: truncated model.safetensors": (lambda r, p: (unmanifest(r), truncate(r / S8 / "model.safetensors")),
                                                "recovered"),
        "legacy: bad JSON in trainer_state.json": (
            lambda r, p: (unmanifest(r), (r / S8 / "trainer_state.json").write_text("{")), "recovered"),
        "legacy: empty optimizer.pt": (lambda r, p: (unmanifest(r), (r / S8 / "optimizer.pt").write_bytes(b"")),
                                       "recovered"),
        "every checkpoint damaged": (lambda r, p: ((r / S8 / "optimizer.pt").write_bytes(b""),
                                                   truncate(r / S4 / "model.safetensors")), "refused"),
        "stale .tmp-step dir from a kill": (lambda r, p: (r / "checkpoints" / ".tmp-step-00000012-1").mkdir(),
                                            "recovered"),
        "changed data, resumed from elsewhere": (changed_data, "refused"),
        "second writer holds the run": (hold_lock, "refused"),
        "legacy: garbled tensor bytes (no manifest)": (
            lambda r, p: (unmanifest(r), garble(r / S8 / "model.safetensors")), "silent"),
    }


def garble_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(b ^ 0xA5 for b in data[mid:mid + 64])
    path.write_bytes(bytes(data))


def edit_state(path: Path) -> None:
    state = json.loads(path.read_text())
    state["position"] += 4
    path.write_text(json.dumps(state, indent=2))


def changed_data(run: Path, project: Path) -> Path:
    elsewhere = project / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "corpus.txt").write_text("a different corpus\n" * 100, encoding="utf-8")
    return elsewhere


def hold_lock(run: Path, project: Path) -> Any:
    handle = open(run / ".lock", "a+")
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


def outcome(proc: subprocess.CompletedProcess, run: Path, reference: dict[str, torch.Tensor]) -> str:
    if "Traceback" in proc.stderr:
        return "traceback"
    if proc.returncode == 1:
        last = proc.stderr.strip().splitlines()[-1]
        return "refused" if last.startswith("honelm pretrain: error:") else "traceback"
    if proc.returncode != 0:
        return f"exit {proc.returncode}"
    final = load_file(run / S8 / "model.safetensors")
    same = final.keys() == reference.keys() and all(torch.equal(final[k], reference[k]) for k in final)
    return "recovered" if same else "silent"


def attack(name: str, damage: Callable[[Path, Path], Any], base: Path, out: Path,
           reference: dict[str, torch.Tensor]) -> dict[str, Any]:
    project = out / "attacks" / hashlib.sha256(name.encode()).hexdigest()[:10]
    if project.exists():
        shutil.rmtree(project)
    shutil.copytree(base, project, symlinks=True)
    run = project / "runs" / "base"
    kept = damage(run, project)
    cwd = kept if isinstance(kept, Path) else project
    started = time.perf_counter()
    proc = honelm("pretrain", "--resume", str(run), cwd=cwd)
    got = outcome(proc, run, reference)
    if hasattr(kept, "close"):
        kept.close()
    last = (proc.stderr.strip().splitlines() or [""])[-1]
    return {"attack": name, "outcome": got, "seconds": round(time.perf_counter() - started, 1), "last_line": last[:300]}


def base_run(out: Path) -> Path:
    """The uninterrupted run: the attacks' starting point (kept in OUT/base and reused)."""
    base = out / "base"
    if not (base / "runs" / "base" / S8).is_dir():
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        (base / "corpus.txt").write_text(corpus(out), encoding="utf-8")
        proc = honelm("pretrain", *ARGS, "run.name=base", cwd=base)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
    return base


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/bench-reliability", help="working directory (default: %(default)s)")
    p.add_argument("--json", default="", help="also write the results as JSON here")
    args = p.parse_args()
    out = Path(args.out).resolve()
    base = base_run(out)
    reference = load_file(base / "runs" / "base" / S8 / "model.safetensors")
    reference = {k: v.clone() for k, v in reference.items()}
    rows = []
    for name, (damage, expected) in _attacks().items():
        row = attack(name, damage, base, out, reference)
        row["expected"] = expected
        rows.append(row)
        print(f"{row['outcome']:<10} (expected {expected:<9}) {row['seconds']:>5}s  {name}: {row['last_line'][:140]}",
              flush=True)
    due = [r for r in rows if r["expected"] != "silent"]
    handled = sum(r["outcome"] in ("refused", "recovered") for r in due)
    tracebacks = sum(r["outcome"] == "traceback" for r in rows)
    print(f"\nrefused or recovered: {handled}/{len(due)} attacks a check can see; tracebacks: {tracebacks}; "
          f"as expected: {sum(r['outcome'] == r['expected'] for r in rows)}/{len(rows)}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
