"""Stage-test fixtures: generated data and a pre-trained tiny run shared by the module's tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from honelm.cli import main
from honelm.demo import generate_data

FAST = ["train.precision=fp32", "train.progress=false", "train.tensorboard=false"]
KOREAN = ["오늘 영화는 정말 재미있었다", "배우들의 연기가 훌륭했다", "이야기가 지루하고 길었다", "음악이 아름다웠다"]
# distinct Korean documents built from the same words, so every word reaches the train split
KOREAN_CORPUS = [f"{a} {b} {c}" for a in ("오늘", "어제", "주말에") for b in ("영화는", "연극은", "이야기가")
                 for c in ("정말 재미있었다", "지루하고 길었다", "훌륭했다", "아름다웠다")] + KOREAN


def cli(*args: str) -> None:
    """Run the real CLI in-process; fail the test with the exit code otherwise."""
    code = main(list(args))
    assert code == 0, f"honelm {' '.join(args)} exited with {code}"


def cli_subprocess(*args: str, env: dict | None = None, cwd: Path | None = None, check: bool = True,
                   kill_at: int = 0) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh process; `kill_at=N`: SIGKILL it after optimizer step N (tests/killrun.py)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    entry = ["-m", "tests.killrun", str(kill_at)] if kill_at else ["-m", "honelm"]
    proc = subprocess.run([sys.executable, *entry, *args], env=full_env, cwd=cwd, capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data")
    generate_data(out, n_corpus=1500, n_labelled=400, seed=1)
    with open(out / "corpus.txt", "a", encoding="utf-8") as handle:  # some Korean documents too
        handle.write("\n".join(KOREAN_CORPUS) + "\n")
    pairs = out / "pairs.jsonl"
    regression = out / "scores.jsonl"
    rows = [json.loads(x) for x in (out / "reviews.jsonl").read_text().splitlines()]
    with open(pairs, "w") as p, open(regression, "w") as r:
        for i, row in enumerate(rows):
            other = rows[(i + 1) % len(rows)]
            p.write(json.dumps({"a": row["text"], "b": other["text"], "same": "same" if row["label"] == other["label"] else "different"}) + "\n")
            r.write(json.dumps({"text": row["text"], "score": 4.0 if row["label"] == "positive" else 1.0}) + "\n")
    return out


def events(run_dir: Path, kind: str) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["event"] == kind]


@pytest.fixture(scope="session")
def pretrained(data_dir, tmp_path_factory) -> Path:
    """A tiny decoder pre-trained on the generated corpus (shared by classify tests)."""
    out = tmp_path_factory.mktemp("runs")
    cli("pretrain", f"data.train={data_dir / 'corpus.txt'}", "model.size=test", "model.vocab_size=600",
        "data.block_size=32", "train.max_steps=40", "train.eval_every=20", "train.lr=3e-3", "train.batch_size=8",
        f"run.out_dir={out}", "run.name=pre", *FAST)
    return out / "pre"
