"""Shared fixtures: offline, one torch thread per worker, tiny in-process models and tokenizers."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# one thread (train.threads=auto takes OMP_NUM_THREADS as asked for: no thread probe in the suite), and a
# probe cache of the session's own, never the user's
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HONELM_CACHE_DIR", tempfile.mkdtemp(prefix="honelm-cache-"))
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def tiny_llama():
    """A 2-layer Llama with a 64-token vocabulary, built from a fixed seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def make(seed: int = 0, dropout: float = 0.0) -> LlamaForCausalLM:
        cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                          attention_dropout=dropout, tie_word_embeddings=True, pad_token_id=0, eos_token_id=1)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return LlamaForCausalLM(cfg)

    return make


@pytest.fixture
def stop_during_checkpoint(monkeypatch):
    """`arm(step, under="")`: send this process SIGINT right after the loop writes the checkpoint of
    `step` (in a run directory whose path contains `under`), as a Ctrl-C landing during that save
    would; `disarm()` puts the real save back."""
    import signal

    import honelm.loop as loop

    save = loop.save_training_checkpoint

    def arm(step: int, under: str = "") -> None:
        def save_then_stop(root, at, *args, **kwargs):
            path = save(root, at, *args, **kwargs)
            if at == step and under in str(root):
                os.kill(os.getpid(), signal.SIGINT)
            return path

        monkeypatch.setattr(loop, "save_training_checkpoint", save_then_stop)

    def disarm() -> None:
        monkeypatch.setattr(loop, "save_training_checkpoint", save)

    arm.disarm = disarm  # type: ignore[attr-defined]
    return arm
