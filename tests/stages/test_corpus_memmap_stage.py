"""`honelm pretrain` and `adapt` with data.memmap=on through the real CLI: the same run as in memory, resumable."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from safetensors.torch import load_file

from tests.stages.conftest import FAST, cli, cli_subprocess, events


def _args(data_dir, out, name, memmap, steps=4, verb="pretrain", extra=()) -> list[str]:
    return [verb, f"data.train={data_dir / 'corpus.txt'}", "model.size=test", "model.vocab_size=400",
            "data.block_size=32", f"train.max_steps={steps}", "train.eval_every=2", "train.batch_size=4",
            # eval_max_batches=0: a streamed validation split is scored whole every time, so the in-memory one is too
            "train.log_every=1", "train.threads=1", "train.eval_max_batches=0", f"data.memmap={memmap}", f"data.cache_dir={out / 'cache'}",
            f"run.out_dir={out}", f"run.name={name}", *FAST, *extra]


@pytest.fixture(scope="module")
def tokenizer(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    cli("tokenizer", f"data.train={data_dir / 'corpus.txt'}", "tokenizer.vocab_size=400", f"run.out_dir={out}",
        "run.name=tok")
    return out / "tok" / "tokenizer"


def test_pretrain_on_the_memmap_path_equals_the_in_memory_run(data_dir, tmp_path, tokenizer):
    tok = (f"model.tokenizer={tokenizer}",)
    cli(*_args(data_dir, tmp_path, "ram", "off", extra=tok))
    cli(*_args(data_dir, tmp_path, "mm", "on", extra=tok))
    for kind in ("train", "eval"):
        a, b = events(tmp_path / "ram", kind), events(tmp_path / "mm", kind)
        keep = ("step", "loss", "val_loss", "val_bpb", "grad_norm")
        assert [{k: e.get(k) for k in keep} for e in a] == [{k: e.get(k) for k in keep} for e in b]
    log = (tmp_path / "mm" / "log.txt").read_text()
    assert "tokenising (data.memmap)" in log and "near duplicates searched in every document" in log
    ram, mm = (json.loads((tmp_path / n / "split_manifest.json").read_text()) for n in ("ram", "mm"))
    assert ram["hashes"] == mm["hashes"] and mm["memmap"]["documents"] == sum(ram["counts"].values())
    cli("test", str(tmp_path / "mm"))
    cli("test", str(tmp_path / "ram"))
    a, b = (json.loads((tmp_path / n / "test_metrics.json").read_text()) for n in ("ram", "mm"))
    assert a["test_loss"] == b["test_loss"] and a["test_bpb"] == b["test_bpb"]


@pytest.mark.slow  # two more runs; the pretrain equality above covers the shared path in the default suite
def test_adapt_a_decoder_on_the_memmap_path_equals_the_in_memory_run(data_dir, tmp_path, tokenizer):
    tok = (f"model.tokenizer={tokenizer}",)
    cli(*_args(data_dir, tmp_path, "ram", "off", verb="adapt", extra=tok))
    cli(*_args(data_dir, tmp_path, "mm", "on", verb="adapt", extra=tok))
    keep = ("step", "loss", "val_loss")
    a, b = events(tmp_path / "ram", "eval"), events(tmp_path / "mm", "eval")
    assert a and [{k: e.get(k) for k in keep} for e in a] == [{k: e.get(k) for k in keep} for e in b]
    record = json.loads((tmp_path / "mm" / "adapt_corpus.json").read_text())
    assert record["train"] == json.loads((tmp_path / "ram" / "adapt_corpus.json").read_text())["train"]


@pytest.mark.slow  # three fresh processes; the in-process equality above runs in the default suite
def test_sigkill_then_resume_on_the_memmap_path_is_bit_identical(data_dir, tmp_path, tokenizer):
    extra = (f"model.tokenizer={tokenizer}", "train.save_every=3", "model.dropout=0.1")
    cli_subprocess(*_args(data_dir, tmp_path, "full", "on", steps=9, extra=extra))
    killed = cli_subprocess(*_args(data_dir, tmp_path, "cut", "on", steps=9, extra=extra), kill_at=5, check=False)
    assert killed.returncode == -signal.SIGKILL
    cli_subprocess("pretrain", "--resume", str(tmp_path / "cut"))
    last = [sorted((tmp_path / n / "checkpoints").iterdir())[-1] / "model.safetensors" for n in ("full", "cut")]
    a, b = load_file(last[0]), load_file(last[1])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "reused from" in (tmp_path / "cut" / "log.txt").read_text()
