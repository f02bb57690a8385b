"""FSDP pieces in one process (a one-rank gloo group): sharded checkpoints round-trip under the manifest, refuse
the wrong layout and a metadata pickle that names code, and `gathered` gives rank 0 a plain model to save.

The two-process equivalences (FSDP ≡ DDP, kill and resume bit for bit) are in tests/stages/test_fsdp.py (slow)."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

from honelm import sharding
from honelm.checkpoint import (SHARDED, CheckpointError, load_training_checkpoint, save_sharded_checkpoint,
                               save_training_checkpoint, verify_checkpoint, write_manifest)
from honelm.config import ConfigError, build
from honelm.errors import HonelmError
from honelm.stages.pretrain import PretrainConfig
from honelm.runtime import Runtime, rng_state

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
ONE = Runtime(device=torch.device("cpu"), rank=0, world_size=1)


@pytest.fixture
def group():
    """A one-process gloo group for the duration of a test."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _trained(model: nn.Module) -> torch.optim.Optimizer:
    """One AdamW step on `model` (so the optimizer has state to save)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.tensor([[2, 3, 4, 5]]), use_cache=False).logits.sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    return optimizer


def _full(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in model.state_dict().items()}


def test_a_sharded_checkpoint_round_trips_under_its_manifest(group, tiny_llama, tmp_path):
    (tmp_path / "run").mkdir()
    root = tmp_path / "run" / "checkpoints"
    model = tiny_llama()
    assert "2 blocks" in sharding.shard(model, ONE, "fp32") and sharding.is_sharded(model)
    optimizer = _trained(model)
    path = save_sharded_checkpoint(root, 1, model, optimizer, {"step": 1, "position": 4}, rng_state(), 2, ONE)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["layout"] == SHARDED and {".metadata", "__0_0.distcp", "rng.pt"} <= set(manifest["files"])
    assert verify_checkpoint(path) and not list(root.glob(".tmp-*"))

    fresh = tiny_llama(seed=1)
    sharding.shard(fresh, ONE, "fp32")
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    state, _ = load_training_checkpoint(path, fresh, fresh_opt)
    assert state["step"] == 1
    want, got = _full(model), _full(fresh)
    assert all(torch.equal(want[k], got[k]) for k in want)
    moments = [(optimizer.state[p]["exp_avg"], fresh_opt.state[q]["exp_avg"])
               for p, q in zip(model.parameters(), fresh.parameters())]
    assert all(torch.equal(a.full_tensor(), b.full_tensor()) for a, b in moments)


def test_the_wrong_layout_and_a_metadata_pickle_naming_code_are_refused(group, tiny_llama, tmp_path):
    (tmp_path / "run").mkdir()
    root = tmp_path / "run" / "checkpoints"
    model = tiny_llama()
    sharding.shard(model, ONE, "fp32")
    path = save_sharded_checkpoint(root, 1, model, _trained(model), {"step": 1}, rng_state(), 2, ONE)
    plain = tiny_llama()
    with pytest.raises(HonelmError, match="written by a sharded .FSDP. run.*train.distributed it was written with"):
        load_training_checkpoint(path, plain, torch.optim.AdamW(plain.parameters()))
    dense = save_training_checkpoint(root, 2, plain, _trained(plain), {"step": 2}, rng_state(), 5)
    with pytest.raises(HonelmError, match="written by an unsharded run"):
        load_training_checkpoint(dense, model, torch.optim.AdamW(model.parameters()))

    class Code:  # what a tampered .metadata could carry: a call made while unpickling
        def __reduce__(self):
            return (os.getcwd, ())

    (path / ".metadata").write_bytes(pickle.dumps(Code()))
    write_manifest(path, SHARDED)  # whoever changed it rewrote the manifest too: only the unpickler stands
    with pytest.raises(CheckpointError, match="unreadable sharded checkpoint.*getcwd is not part of a checkpoint"):
        load_training_checkpoint(path, model, torch.optim.AdamW(model.parameters()))
    (path / "__0_0.distcp").unlink()
    write_manifest(path, SHARDED)
    with pytest.raises(CheckpointError, match="lists no shard"):
        verify_checkpoint(path)


def test_gathered_gives_rank_0_a_plain_model_to_save_and_puts_the_shards_back(group, tiny_llama, tmp_path):
    model = tiny_llama()
    want = _full(model)
    sharding.shard(model, ONE, "fp32")
    with sharding.gathered(model, ONE) as holder:
        assert holder and not any(isinstance(p, DTensor) for p in model.parameters())
        assert model.lm_head.weight is model.model.embed_tokens.weight  # ties survive
        model.save_pretrained(tmp_path / "best")
    assert all(isinstance(p, DTensor) for p in model.parameters())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "best")
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items())


def test_the_config_and_what_fsdp_refuses():
    assert build(PretrainConfig).train.distributed == "ddp"
    assert build(PretrainConfig, overrides=["train.distributed=fsdp"]).train.distributed == "fsdp"
    with pytest.raises(ConfigError, match="train.distributed"):
        build(PretrainConfig, overrides=["train.distributed=zero3"])
    assert not sharding.wanted("fsdp", ONE)  # one process: nothing to shard across
    assert sharding.wanted("fsdp", Runtime(device=torch.device("cpu"), rank=0, world_size=2))

    class Rollouts:
        def probe_batch(self) -> dict:
            return {}

    with pytest.raises(ConfigError, match="rollout"):
        sharding.refuse_unsupported(Rollouts(), False)
    with pytest.raises(ConfigError, match="train.compile"):
        sharding.refuse_unsupported(object(), True)
    sharding.refuse_unsupported(object(), False)
