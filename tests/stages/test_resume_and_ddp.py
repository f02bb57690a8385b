"""Process-level guarantees: SIGKILL + --resume ≡ uninterrupted (bit for bit on CPU), Ctrl-C leaves a
resumable checkpoint, and two DDP processes (gloo) match one process at the same global batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.stages.conftest import FAST, cli_subprocess, events


def _pretrain_args(data_dir: Path, out: Path, name: str, steps: int = 12, extra: tuple[str, ...] = ()) -> list[str]:
    return ["pretrain", f"data.train={data_dir / 'corpus.txt'}", "model.size=test", "model.vocab_size=400",
            "model.dropout=0.1", "data.block_size=32", f"train.max_steps={steps}", "train.eval_every=4",
            "train.save_every=4", "train.batch_size=4", "train.grad_accum=2", "train.log_every=2",
            f"run.out_dir={out}", f"run.name={name}", "train.threads=1", *FAST, *extra]


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    last = sorted((run / "checkpoints").iterdir())[-1]
    return load_file(last / "model.safetensors")


@pytest.mark.slow  # CI runs it in its own step (.ci/run); kept out of the 3-minute default suite
def test_sigkill_then_resume_is_bit_identical(data_dir, tmp_path):
    tok = tmp_path / "tok"
    cli_subprocess("tokenizer", f"data.train={data_dir / 'corpus.txt'}", "tokenizer.vocab_size=400",
                   f"run.out_dir={tmp_path}", "run.name=tok")
    extra = (f"model.tokenizer={tok}",)
    cli_subprocess(*_pretrain_args(data_dir, tmp_path, "full", extra=extra))
    killed = cli_subprocess(*_pretrain_args(data_dir, tmp_path, "cut", extra=extra), kill_at=7, check=False)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "cut" / "checkpoints" / "step-00000012").exists()
    cli_subprocess("pretrain", "--resume", str(tmp_path / "cut"))
    a, b = _final_weights(tmp_path / "full"), _final_weights(tmp_path / "cut")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (tmp_path / "cut" / "best" / "best.json").read_text() == (tmp_path / "full" / "best" / "best.json").read_text()


@pytest.mark.slow  # CI runs it in its own step (.ci/run); kept out of the 3-minute default suite
def test_ctrl_c_leaves_a_resumable_checkpoint(data_dir, tmp_path):
    args = _pretrain_args(data_dir, tmp_path, "int", steps=100000, extra=("train.save_every=0",))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "honelm", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "int" / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (metrics.exists() and '"event": "train"' in metrics.read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "resume with `--resume`" in err
    ckpts = list((tmp_path / "int" / "checkpoints").iterdir())
    assert len(ckpts) == 1
    state = json.loads((ckpts[0] / "trainer_state.json").read_text())
    assert state["step"] > 0 and not state["finished"]
    assert events(tmp_path / "int", "end")[-1]["reason"] == "interrupted"


def test_ctrl_c_during_the_final_checkpoint_keeps_the_finished_run_and_exits_130(data_dir, tmp_path,
                                                                                  capsys, stop_during_checkpoint):
    """Too late to interrupt: the run ends finished and saved, but the command still exits 130 so that a
    shell script or a pipeline does not go on to its next stage."""
    from honelm.cli import main

    stop_during_checkpoint(4)
    assert main(_pretrain_args(data_dir, tmp_path, "late", steps=4)) == 130
    assert "honelm pretrain: stopped (the run had finished when the stop came)" in capsys.readouterr().err
    run = tmp_path / "late"
    assert events(run, "end")[-1]["reason"] == "max_steps" and (run / "best" / "best.json").is_file()
    stop_during_checkpoint.disarm()
    assert main(["pretrain", "--resume", str(run)]) == 0  # finished: nothing to resume, and no stale 130
    assert "run already finished" in capsys.readouterr().err


@pytest.mark.slow  # CI runs it in its own step (.ci/run); kept out of the 3-minute default suite
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
def test_two_processes_match_one(data_dir, tmp_path):
    tok = tmp_path / "tok"
    cli_subprocess("tokenizer", f"data.train={data_dir / 'corpus.txt'}", "tokenizer.vocab_size=400",
                   f"run.out_dir={tmp_path}", "run.name=tok")
    common = ["pretrain", f"data.train={data_dir / 'corpus.txt'}", "model.size=test", f"model.tokenizer={tok}",
              "data.block_size=32", "train.max_steps=6", "train.eval_every=3", "train.save_every=0",
              "train.batch_size=4", "train.threads=1", "train.lr=3e-3", *FAST]
    cli_subprocess(*common, "train.grad_accum=2", f"run.out_dir={tmp_path}", "run.name=one")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "honelm", *common, "train.grad_accum=1", f"run.out_dir={tmp_path}", "run.name=two"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = _final_weights(tmp_path / "one"), _final_weights(tmp_path / "two")
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5)
    # rank 0 alone wrote the log: one end event, and the same validation losses
    assert len(events(tmp_path / "two", "end")) == 1
    for e1, e2 in zip(events(tmp_path / "one", "eval"), events(tmp_path / "two", "eval")):
        assert abs(e1["val_loss"] - e2["val_loss"]) < 1e-4
