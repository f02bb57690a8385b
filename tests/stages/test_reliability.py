"""The attacks of issue 23, through the real CLI: each test is the attack that once broke a run.

A garbled checkpoint trained on silently; changed data on resume trained on the new data; two
resumes of one run both wrote it; two `honelm test` both counted as look 1, and a test killed after
writing its results left no look; a deleted run directory ended with exit 0; a full disk was a
C++ traceback. All share one finished 4-step pretrain run (checkpoints at steps 2 and 4) that read
its corpus by a relative path; each test works on its own copy.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

import honelm.checkpoint as ck
import honelm.protocol.test as test_verb
import honelm.registry as registry
from honelm.cli import main
from honelm.loop import Callback, TrainState
from honelm.protocol.ledger import ledger_path, read_ledger
from tests.stages.conftest import FAST, cli, events

STEP2, STEP4 = "checkpoints/step-00000002", "checkpoints/step-00000004"


@pytest.fixture(scope="module")
def project(data_dir: Path, tmp_path_factory) -> Path:
    """A project directory holding corpus.txt and runs/base, a finished 4-step run that read it as `corpus.txt`."""
    where = tmp_path_factory.mktemp("project")
    lines = (data_dir / "corpus.txt").read_text(encoding="utf-8").splitlines()[:400]
    (where / "corpus.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    cwd = os.getcwd()
    os.chdir(where)
    try:
        cli("pretrain", "data.train=corpus.txt", "model.size=test", "model.vocab_size=300", "data.block_size=32",
            "train.max_steps=4", "train.eval_every=2", "train.save_every=2", "train.batch_size=4", "train.log_every=1",
            "run.out_dir=runs", "run.name=base", "train.threads=1", *FAST)
    finally:
        os.chdir(cwd)
    return where


def _copy(project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unfinished: bool = False) -> Path:
    """A copy of the project to attack, entered (cwd); returns its run. `unfinished`: step 4 removed, so a resume
    trains steps 3 and 4 again."""
    mine = tmp_path / "project"
    shutil.copytree(project, mine, symlinks=True)
    monkeypatch.chdir(mine)
    run = mine / "runs" / "base"
    if unfinished:
        shutil.rmtree(run / STEP4)
    return run


def _garble(path: Path) -> None:
    """XOR 64 bytes inside the tensor data, the safetensors header intact: the file still loads."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little") + 16
    data[start:start + 64] = bytes(b ^ 0xA5 for b in data[start:start + 64])
    path.write_bytes(bytes(data))


def _error_line(capsys: pytest.CaptureFixture) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(lines)
    return lines[-1]


def test_garbled_checkpoint_is_refused_and_the_resume_stays_bit_identical(project, tmp_path, monkeypatch,
                                                                         capsys) -> None:
    run = _copy(project, tmp_path, monkeypatch)
    # cloned: load_file's tensors may view the file, which the attack rewrites in place
    uninterrupted = {k: v.clone() for k, v in load_file(run / STEP4 / "model.safetensors").items()}
    best = (run / "best" / "best.json").read_text()
    _garble(run / STEP4 / "model.safetensors")
    (run / "checkpoints" / ".tmp-step-00000006-4242").mkdir()  # what a kill during a write leaves
    assert main(["pretrain", "--resume", str(run)]) == 0
    err = capsys.readouterr().err
    assert "checkpoint step-00000004 refused" in err and "model.safetensors: sha256" in err
    assert "falling back to step-00000002" in err and "(left by an interrupted write)" in err
    assert not (run / "checkpoints" / ".tmp-step-00000006-4242").exists()
    assert (run / "checkpoints" / "refused-step-00000004").is_dir()
    resumed = load_file(run / STEP4 / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        assert torch.equal(resumed[key], uninterrupted[key]), key
    assert (run / "best" / "best.json").read_text() == best
    # metrics.jsonl: the replayed steps 3 and 4 once each, not twice
    assert [e["step"] for e in events(run, "train")] == [1, 2, 3, 4]
    assert [e["step"] for e in events(run, "eval")] == [2, 4] and len(events(run, "end")) == 1


def test_a_run_killed_before_its_first_checkpoint_resumes_from_step_0(project, tmp_path, monkeypatch,
                                                                      capsys) -> None:
    """Killed while writing its first checkpoint (found by benchmarks/kill_trials.py: `--resume` then said "nothing
    to resume" and the run was stuck): the resume trains from step 0 in the same directory and ends bit-identical."""
    run = _copy(project, tmp_path, monkeypatch)
    uninterrupted = {k: v.clone() for k, v in load_file(run / STEP4 / "model.safetensors").items()}
    for step in (run / "checkpoints").iterdir():
        shutil.rmtree(step)
    shutil.rmtree(run / "best")
    (run / "checkpoints" / ".tmp-step-00000002-4242").mkdir()  # the half-written first checkpoint
    assert main(["pretrain", "--resume", str(run)]) == 0
    assert "no checkpoint of this run to resume from (it stopped before its first one): training from step 0" in \
        capsys.readouterr().err
    resumed = load_file(run / STEP4 / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        assert torch.equal(resumed[key], uninterrupted[key]), key
    assert [e["step"] for e in events(run, "train")] == [1, 2, 3, 4]  # the stopped attempt's events went
    assert (run / "best" / "config.json").is_file()


def test_unreadable_checkpoints_end_in_one_line(project, tmp_path, monkeypatch, capsys) -> None:
    run = _copy(project, tmp_path, monkeypatch)
    (run / STEP4 / "trainer_state.json").write_text('{"step": 4,', encoding="utf-8")  # cut mid-write
    (run / STEP2 / "model.safetensors").write_bytes(b"")
    assert main(["pretrain", "--resume", str(run)]) == 1
    line = _error_line(capsys)
    assert line.startswith("honelm pretrain: error: no checkpoint under") and "trainer_state.json" in line
    assert (run / STEP4).is_dir() and (run / STEP2).is_dir()  # nothing set aside when nothing could replace them


def test_resume_refuses_changed_data_unless_allowed(project, tmp_path, monkeypatch, capsys) -> None:
    """The issue's attack: resumed from another directory whose corpus.txt differs."""
    run = _copy(project, tmp_path, monkeypatch)
    manifest = (run / "split_manifest.json").read_bytes()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "corpus.txt").write_text("".join(f"another corpus altogether, line {i}\n" for i in range(50)),
                                          encoding="utf-8")
    monkeypatch.chdir(elsewhere)
    assert main(["pretrain", "--resume", str(run)]) == 1
    line = _error_line(capsys)
    old = hashlib.sha256((run.parent.parent / "corpus.txt").read_bytes()).hexdigest()
    new = hashlib.sha256((elsewhere / "corpus.txt").read_bytes()).hexdigest()
    assert f"data.train: {elsewhere / 'corpus.txt'} has sha256 {new[:16]}" in line and old[:16] in line
    assert "--allow-changed-data" in line and (run / "split_manifest.json").read_bytes() == manifest
    assert main(["pretrain", "--resume", str(run), "--allow-changed-data"]) == 0
    assert "continuing on it (--allow-changed-data)" in capsys.readouterr().err
    pins = json.loads((run / "inputs.json").read_text())
    assert pins["inputs"]["data.train"]["files"][0]["sha256"] == new and len(pins["changes"]) == 1


def _hold_lock(run: Path) -> subprocess.Popen:
    """Another process holding RUN's lock, as a running honelm would."""
    code = ("import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); f.seek(0); "
            "f.truncate(); f.write('pid 4242: honelm pretrain --resume'); f.flush(); print('held', flush=True); "
            "time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run / ".lock")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_writer_is_refused_resume_and_test_alike(project, tmp_path, monkeypatch, capsys) -> None:
    run = _copy(project, tmp_path, monkeypatch)
    holder = _hold_lock(run)
    try:
        assert main(["pretrain", "--resume", str(run)]) == 1
        assert "is in use by another honelm process (pid 4242: honelm pretrain --resume)" in _error_line(capsys)
        assert main(["test", str(run)]) == 1
        assert "is in use by another honelm process" in _error_line(capsys)
    finally:
        holder.kill()
        holder.wait()
    assert not (run / "test_looks.jsonl").exists()
    # the holder died without letting go: the kernel released its lock, so nothing is left stale
    assert main(["test", str(run)]) == 0
    assert main(["test", str(run)]) == 1
    assert "already evaluated (1 look(s)" in _error_line(capsys)


def test_a_look_cut_short_after_scoring_still_counts(project, tmp_path, monkeypatch, capsys) -> None:
    """Killed right after scoring, before test_metrics.json: the look is recorded already, so the next test needs
    --force."""
    run = _copy(project, tmp_path, monkeypatch)

    def killed(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(test_verb, "_write_results", killed)
    assert main(["test", str(run)]) == 130
    assert not (run / "test_metrics.json").exists()
    assert len(test_verb.looks(run)) == 1 and len(read_ledger(ledger_path(run))) == 1
    monkeypatch.undo()
    monkeypatch.chdir(run.parent.parent)
    assert main(["test", str(run)]) == 1
    assert "already evaluated" in _error_line(capsys)
    assert main(["test", str(run), "--force"]) == 0
    assert json.loads((run / "test_metrics.json").read_text())["look"] == 2


class _DeleteRun(Callback):
    """rm -rf of the run directory while it trains."""

    def after_step(self, state: TrainState) -> None:
        if state.step == 3:
            shutil.rmtree(state.run_dir)


def test_a_run_directory_deleted_mid_run_fails_the_run(project, tmp_path, monkeypatch, capsys) -> None:
    run = _copy(project, tmp_path, monkeypatch, unfinished=True)
    assert main(["pretrain", "--resume", str(run)], callbacks=[_DeleteRun()]) == 1
    assert "was deleted while the run was writing it" in _error_line(capsys)
    assert not run.exists()


def test_a_full_disk_is_one_line_and_keeps_earlier_checkpoints(project, tmp_path, monkeypatch, capsys) -> None:
    """ENOSPC as safetensors raises it, while the resumed run writes its final checkpoint."""
    run = _copy(project, tmp_path, monkeypatch, unfinished=True)

    def full(*args: object, **kwargs: object) -> None:
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(ck, "save_model", full)
    assert main(["pretrain", "--resume", str(run)]) == 1
    line = _error_line(capsys)
    assert "no space left on the device while writing a training checkpoint" in line and "--resume" in line
    assert [p.name for p in ck.list_checkpoints(run / "checkpoints")] == ["step-00000002"]
    assert ck.verify_checkpoint(run / STEP2)
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-")]


def test_a_full_disk_outside_the_checkpoints_is_one_line_too(monkeypatch, capsys) -> None:
    """A log line or a report that hits ENOSPC: the CLI says so in one line instead of a traceback."""
    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "runs/x/metrics.jsonl")

    monkeypatch.setattr(registry, "run_verb", full)
    assert main(["pretrain", "data.train=corpus.txt"]) == 1
    assert _error_line(capsys) == ("honelm pretrain: error: no space left on the device (runs/x/metrics.jsonl): free "
                                   "disk space and run again (a training run continues with --resume)")
