"""Tiny models for the `honelm serve` tests, built in-process and saved as honelm saves them.

`causal_lm(dir)`: a 2-layer decoder over a byte-level BPE, trained for 100 full-batch steps (about
2 s on one core) to answer three questions through honelm's default chat template (CHATS; the
second also after the first, in one conversation), so a
greedy chat answer is known text and the browser test's screenshot shows a real reply. Saved as a
run directory (RUN/best, run.json, report.md), so the page's report link has something to show.
`classifier(dir)`: a 2-layer WordPiece encoder classifier (random weights) with labels negative /
positive, saved as a checkpoint directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from honelm.data.chat import encode_chat, ensure_template
from honelm.models import build_model
from honelm.tokenizer import train_tokenizer

CHATS = [("how was the film ?", "the film was wonderful and the cast was superb ."),
         ("tell me a proverb", "a stitch in time saves nine ."),
         ("what is the question ?", "to be or not to be .")]
CORPUS = ["the story was dull and far too long", "the music was beautiful", "honesty is the best policy",
          *(f"{q} {a}" for q, a in CHATS)] * 10


def causal_lm(root: Path, context: int = 128, steps: int = 100) -> Path:
    """A run directory holding a tiny chat model in best/ (returns the run directory)."""
    tok = train_tokenizer(CORPUS, kind="bpe", vocab_size=300, min_frequency=1, model_max_length=context)
    ensure_template(tok)
    model = build_model("decoder", "test", len(tok), task="lm", seed=3, max_positions=context,
                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        hidden_size=64, intermediate_size=128)
    turns = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in CHATS]
    # each question alone, and the first two as one conversation (the page's second message follows the first)
    rows = [encode_chat(tok, messages, context) for messages in [*turns, turns[0] + turns[1]]]
    width = max(len(r.ids) for r in rows)
    ids = torch.tensor([r.ids + [tok.pad_token_id] * (width - len(r.ids)) for r in rows])
    labels = torch.tensor([r.labels + [-100] * (width - len(r.ids)) for r in rows])
    mask = torch.tensor([[1] * len(r.ids) + [0] * (width - len(r.ids)) for r in rows])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for _ in range(steps):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    best = root / "best"
    model.save_pretrained(best)
    tok.save_pretrained(best)
    (root / "run.json").write_text(json.dumps({"stage": "sft"}), encoding="utf-8")
    (root / "report.md").write_text("# run report\n\nval_loss 0.01\n", encoding="utf-8")
    return root


def classifier(root: Path) -> Path:
    """A checkpoint directory holding a tiny encoder classifier (negative, positive)."""
    tok = train_tokenizer(CORPUS, kind="wordpiece", vocab_size=200, min_frequency=1, model_max_length=64)
    model = build_model("encoder", "test", len(tok), task="classify", num_labels=2, seed=4, max_positions=64,
                        id2label={0: "negative", 1: "positive"})
    model.save_pretrained(root)
    tok.save_pretrained(root)
    return root
