"""`train.distributed=fsdp` on two gloo processes (CPU): the sharded run trains what the DDP run trains (the same
losses at every logged step, the same weights), a SIGKILL and `--resume` from a sharded checkpoint ends bit for bit
where the uninterrupted sharded run does, best/ is a plain model directory gathered from the shards, and LoRA with
gradient checkpointing under FSDP writes the adapter DDP writes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from transformers import AutoModelForCausalLM

from tests.stages.conftest import FAST, cli_subprocess, events

pytestmark = [pytest.mark.slow,  # CI runs this file in its own step (.ci/run): every run is two processes
              pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")]


def torchrun(*args: str, kill_at: int = 0) -> subprocess.CompletedProcess:
    """`honelm ARGS` on two processes (torch.distributed.run, gloo on CPU); `kill_at=N`: each SIGKILLed after step N."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    entry = ["-m", "tests.killrun", str(kill_at)] if kill_at else ["-m", "honelm"]
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *entry,
                           *args], env=env, capture_output=True, text=True, timeout=600)


def pretrain_args(data_dir: Path, out: Path, tok: Path, name: str, *extra: str) -> list[str]:
    return ["pretrain", f"data.train={data_dir / 'corpus.txt'}", "model.size=test", f"model.tokenizer={tok}",
            "model.dropout=0.1", "data.block_size=32", "train.max_steps=8", "train.eval_every=4", "train.save_every=4",
            "train.keep_checkpoints=5", "train.batch_size=4", "train.grad_accum=2", "train.log_every=1",
            "train.threads=1", "train.eval_max_batches=0", "train.lr=3e-3", f"run.out_dir={out}", f"run.name={name}",
            *FAST, *extra]  # eval_max_batches=0: a sharded run validates on all of it, so the DDP one does too


def sharded_state(checkpoint: Path, scratch: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded checkpoint (model and AdamW state), gathered in this one process, flat by name."""
    dcp_to_torch_save(checkpoint, scratch)
    flat: dict[str, torch.Tensor] = {}

    def walk(value: object, prefix: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{prefix}{k}.")
        elif isinstance(value, torch.Tensor):
            flat[prefix[:-1]] = value
    walk(torch.load(scratch, weights_only=True), "")
    return flat


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory) -> Path:
    """One tokenizer; a DDP run, an FSDP run, and an FSDP run SIGKILLed after step 6 then resumed (from step 4)."""
    out = tmp_path_factory.mktemp("fsdp")
    cli_subprocess("tokenizer", f"data.train={data_dir / 'corpus.txt'}", "tokenizer.vocab_size=400",
                   f"run.out_dir={out}", "run.name=tok")
    tok = out / "tok"
    for name, mode in (("ddp", "ddp"), ("fsdp", "fsdp")):
        proc = torchrun(*pretrain_args(data_dir, out, tok, name, f"train.distributed={mode}"))
        assert proc.returncode == 0, proc.stderr[-3000:]
    killed = torchrun(*pretrain_args(data_dir, out, tok, "cut", "train.distributed=fsdp"), kill_at=6)
    assert killed.returncode != 0 and not (out / "cut" / "checkpoints" / "step-00000008").exists()
    resumed = torchrun("pretrain", "--resume", str(out / "cut"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step-00000004" in resumed.stderr
    return out


def test_fsdp_matches_ddp_step_by_step_and_exports_a_plain_model(runs):
    ddp, fsdp = runs / "ddp", runs / "fsdp"
    log = (fsdp / "log.txt").read_text()
    assert "FSDP: parameters, gradients and optimizer state sharded over 2 processes" in log
    steps = [(a, b) for a, b in zip(events(ddp, "train"), events(fsdp, "train"), strict=True)]
    assert len(steps) == 8
    for a, b in steps:
        assert a["step"] == b["step"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4, abs=1e-6)
    for a, b in zip(events(ddp, "eval"), events(fsdp, "eval"), strict=True):
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5, abs=1e-6)
    # the final weights: DDP's dense checkpoint against the FSDP run's shards gathered here
    dense = load_file(ddp / "checkpoints" / "step-00000008" / "model.safetensors")
    sharded = sharded_state(fsdp / "checkpoints" / "step-00000008", runs / "fsdp-final.pt")
    for k, v in dense.items():
        torch.testing.assert_close(sharded[f"model.{k}"], v, rtol=1e-5, atol=1e-6)
    # best/: a plain Hugging Face directory that loads without honelm, with the weights DDP's best/ has
    model = AutoModelForCausalLM.from_pretrained(fsdp / "best")
    assert type(model).__name__ == "LlamaForCausalLM"
    ddp_best, fsdp_best = load_file(ddp / "best" / "model.safetensors"), load_file(fsdp / "best" / "model.safetensors")
    assert ddp_best.keys() == fsdp_best.keys()
    for k in ddp_best:
        torch.testing.assert_close(fsdp_best[k], ddp_best[k], rtol=1e-5, atol=1e-6)
    assert len(events(fsdp, "end")) == 1  # rank 0 alone writes the log


def test_resume_from_a_sharded_checkpoint_is_bit_identical(runs):
    cut = runs / "cut"
    manifest = (cut / "checkpoints" / "step-00000004" / "manifest.json").read_text()
    assert '"layout": "sharded"' in manifest and "__1_0.distcp" in manifest
    full = sharded_state(runs / "fsdp" / "checkpoints" / "step-00000008", runs / "full.pt")
    resumed = sharded_state(cut / "checkpoints" / "step-00000008", runs / "resumed.pt")
    assert full.keys() == resumed.keys() and any(k.startswith("optimizer.state.") for k in full)
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    assert [e["loss"] for e in events(cut, "train")] == [e["loss"] for e in events(runs / "fsdp", "train")]
    assert (cut / "best" / "best.json").read_text() == (runs / "fsdp" / "best" / "best.json").read_text()


def test_lora_with_gradient_checkpointing_under_fsdp_writes_the_adapter_ddp_writes(runs, data_dir):
    args = ["pretrain", f"data.train={data_dir / 'corpus.txt'}", f"model.init_from={runs / 'ddp'}",
            "data.block_size=32", "train.max_steps=4", "train.eval_every=2", "train.save_every=0",
            "train.batch_size=4", "train.grad_accum=2", "train.threads=1", "train.eval_max_batches=0", "train.lr=1e-2",
            "lora.enabled=true",
            "lora.dropout=0.0", "lora.r=4", "train.gradient_checkpointing=true", f"run.out_dir={runs}", *FAST]
    for mode in ("ddp", "fsdp"):
        proc = torchrun(*args, f"run.name=lora-{mode}", f"train.distributed={mode}")
        assert proc.returncode == 0, proc.stderr[-3000:]
    log = (runs / "lora-fsdp" / "log.txt").read_text()
    assert "FSDP: parameters" in log and "gradient checkpointing: on" in log
    a = load_file(runs / "lora-ddp" / "best" / "adapter_model.safetensors")
    b = load_file(runs / "lora-fsdp" / "best" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any("lora_A" in k for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    for x, y in zip(events(runs / "lora-ddp", "eval"), events(runs / "lora-fsdp", "eval"), strict=True):
        assert y["val_loss"] == pytest.approx(x["val_loss"], rel=1e-5, abs=1e-6)
