"""Tiny models for the `honelm serve` tests, built in-process and saved as honelm saves them.

`causal_lm(dir)`: a 2-layer decoder over a byte-level BPE trained on a few sentences, its LM head
sharpened so greedy argmax is never decided by float noise (batched == unbatched is then a real
check), saved as a run directory (RUN/best, run.json, report.md) so the page's report link has
something to show. `classifier(dir)`: a 2-layer WordPiece encoder classifier with labels
negative/positive, saved as a checkpoint directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from honelm.models import build_model
from honelm.tokenizer import train_tokenizer

CORPUS = ["the film was wonderful and the cast was superb", "the story was dull and far too long",
          "a stitch in time saves nine", "to be or not to be that is the question",
          "the music was beautiful", "honesty is the best policy"] * 10


def causal_lm(root: Path, context: int = 64) -> Path:
    """A run directory holding a tiny causal LM in best/ (returns the run directory)."""
    tok = train_tokenizer(CORPUS, kind="bpe", vocab_size=300, min_frequency=1, model_max_length=context)
    model = build_model("decoder", "test", len(tok), task="lm", seed=3, max_positions=context,
                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    with torch.no_grad():  # scale the final norm: logits 40x apart, whether the head is tied or not
        model.model.norm.weight.mul_(40)
    best = root / "best"
    model.save_pretrained(best)
    tok.save_pretrained(best)
    (root / "run.json").write_text(json.dumps({"stage": "sft"}), encoding="utf-8")
    (root / "report.md").write_text("# run report\n\nval_loss 1.23\n", encoding="utf-8")
    return root


def classifier(root: Path) -> Path:
    """A checkpoint directory holding a tiny encoder classifier (negative, positive)."""
    tok = train_tokenizer(CORPUS, kind="wordpiece", vocab_size=200, min_frequency=1, model_max_length=64)
    model = build_model("encoder", "test", len(tok), task="classify", num_labels=2, seed=4, max_positions=64,
                        id2label={0: "negative", 1: "positive"})
    model.save_pretrained(root)
    tok.save_pretrained(root)
    return root
