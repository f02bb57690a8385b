"""MLM masking statistics and determinism, MLM rows (packed / per document), and the MLM loss by hand."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from honelm.data.masking import IGNORE, MLMRows, documents_mlm, mask_tokens, pack_mlm, special_positions
from honelm.objectives.mlm import MaskedLM, masked_token_nll

SPECIAL = (0, 1, 2, 3, 4)  # pad, unk, cls, sep, mask (honelm's WordPiece order)
MASK = 4


def _batch(b: int = 64, t: int = 512, vocab: int = 1000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random real tokens framed [CLS] ... [SEP], each row padded after a random length."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (b, t), generator=g)
    lengths = torch.randint(t // 4, t + 1, (b,), generator=g)
    attention = (torch.arange(t)[None, :] < lengths[:, None]).long()
    ids[:, 0] = 2
    ids[torch.arange(b), lengths - 1] = 3
    ids = ids.masked_fill(attention == 0, 0)
    return ids, attention


def test_selection_rate_and_80_10_10_split():
    ids, attention = _batch()
    special = special_positions(ids, attention, SPECIAL)
    out, labels = mask_tokens(ids, special, MASK, 1000, torch.Generator().manual_seed(1), special_ids=SPECIAL)
    selected = labels != IGNORE
    n_real, n_sel = int((~special).sum()), int(selected.sum())
    sd = math.sqrt(n_real * 0.15 * 0.85)
    assert abs(n_sel - 0.15 * n_real) < 4 * sd, (n_sel, n_real)
    masked = selected & (out == MASK)
    kept = selected & (out == ids)
    randomised = selected & (out != MASK) & (out != ids)
    for part, share in ((masked, 0.8), (randomised, 0.1), (kept, 0.1)):
        # a random replacement equal to the original (p = 1/995) counts as kept: far inside the tolerance
        assert abs(int(part.sum()) / n_sel - share) < 0.01, (share, int(part.sum()) / n_sel)
    assert torch.equal(labels[selected], ids[selected])  # labels hold the originals
    assert torch.equal(out[~selected], ids[~selected])  # nothing else changes


def test_special_tokens_and_padding_are_never_selected():
    ids, attention = _batch(b=32, t=64)
    special = special_positions(ids, attention, SPECIAL)
    for seed in range(20):
        out, labels = mask_tokens(ids, special, MASK, 1000, torch.Generator().manual_seed(seed), prob=0.9,
                                  special_ids=SPECIAL)
        assert (labels[special] == IGNORE).all()
        assert torch.equal(out[special], ids[special])


def test_random_replacements_are_never_special_tokens():
    # vocabulary of 8 of which 5 are special: a sampler over the whole vocabulary would hit them often
    ids = torch.full((64, 64), 6)
    special = torch.zeros_like(ids, dtype=torch.bool)
    out, labels = mask_tokens(ids, special, MASK, 8, torch.Generator().manual_seed(0), prob=0.5,
                              mask_ratio=0.0, random_ratio=1.0, special_ids=SPECIAL)
    replaced = out[labels != IGNORE]
    assert replaced.numel() > 1000
    assert set(replaced.tolist()) <= {5, 6, 7} and {5, 7} <= set(replaced.tolist())


def test_same_seed_same_mask_and_masks_differ_between_calls():
    ids, attention = _batch(b=4, t=128)
    special = special_positions(ids, attention, SPECIAL)
    a = mask_tokens(ids, special, MASK, 1000, torch.Generator().manual_seed(3), special_ids=SPECIAL)
    b = mask_tokens(ids, special, MASK, 1000, torch.Generator().manual_seed(3), special_ids=SPECIAL)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    torch.manual_seed(0)  # generator None: torch's global RNG, which the loop saves and restores
    c = mask_tokens(ids, special, MASK, 1000, special_ids=SPECIAL)
    d = mask_tokens(ids, special, MASK, 1000, special_ids=SPECIAL)
    assert not torch.equal(c[1], d[1])
    torch.manual_seed(0)
    assert torch.equal(mask_tokens(ids, special, MASK, 1000, special_ids=SPECIAL)[1], c[1])


def _rows(n: int = 20, t: int = 40) -> MLMRows:
    g = torch.Generator().manual_seed(0)
    rows = [[2, *torch.randint(5, 100, (int(torch.randint(3, t, (1,), generator=g)),), generator=g).tolist(), 3]
            for _ in range(n)]
    flat = torch.tensor([x for r in rows for x in r], dtype=torch.int32)
    offsets = torch.cumsum(torch.tensor([0] + [len(r) for r in rows]), 0)
    return MLMRows(flat, offsets, pad_id=0, mask_id=MASK, vocab_size=100, special_ids=SPECIAL, prob=0.3)


def test_collate_re_masks_every_epoch_and_resumes_from_the_global_rng():
    rows = _rows()
    idx = list(range(8))
    torch.manual_seed(5)
    first = rows.collate(idx)
    state = torch.get_rng_state()
    second = rows.collate(idx)  # the same rows seen again (next epoch): a new mask
    assert not torch.equal(first["labels"], second["labels"])
    assert torch.equal(first["attention_mask"], second["attention_mask"])
    torch.set_rng_state(state)  # what --resume does
    assert torch.equal(rows.collate(idx)["labels"], second["labels"])
    rows.rank = 1  # another process with the same global state masks other positions
    torch.set_rng_state(state)
    assert not torch.equal(rows.collate(idx)["labels"], second["labels"])


def test_validation_masks_are_fixed():
    rows = _rows()
    a = [b["labels"] for b in rows.fixed_batches(6, seed=11)]
    torch.manual_seed(123)  # the global RNG plays no part
    b = [b["labels"] for b in rows.fixed_batches(6, seed=11)]
    assert len(a) == 4 and all(torch.equal(x, y) for x, y in zip(a, b))
    assert sum(int((x != IGNORE).sum()) for x in a) > 0


@pytest.fixture(scope="module")
def wordpiece():
    from honelm.tokenizer import train_tokenizer

    texts = ["the cat sat on the mat", "a dog barked at the cat", "birds sing in the morning"] * 20
    return train_tokenizer(texts, kind="wordpiece", vocab_size=120)


def test_pack_mlm_frames_blocks_and_keeps_every_token(wordpiece):
    texts = ["the cat sat on the mat", "a dog barked", "birds sing in the morning"] * 5
    rows = pack_mlm(wordpiece, texts, block_size=10)
    cls, sep = wordpiece.cls_token_id, wordpiece.sep_token_id
    body: list[int] = []
    for i in range(len(rows)):
        row = rows.ids[rows.offsets[i]:rows.offsets[i + 1]].tolist()
        assert row[0] == cls and row[-1] == sep and len(row) <= 10
        assert all(n == 10 for n in rows.lengths[:-1])  # only the last block is short
        body += row[1:-1]
    words = wordpiece(texts, add_special_tokens=False)["input_ids"]
    assert body == [t for w in words for t in (*w, sep)]  # documents in order, SEP between them


def test_documents_mlm_one_row_per_document_and_counts_truncation(wordpiece):
    texts = ["the cat sat on the mat " * 5, "a dog barked"]
    rows = documents_mlm(wordpiece, texts, block_size=12)
    assert len(rows) == 2 and rows.truncated == 1
    first = rows.ids[: rows.offsets[1]].tolist()
    assert len(first) == 12 and first[0] == wordpiece.cls_token_id and first[-1] == wordpiece.sep_token_id
    batch = rows.collate([0, 1])
    assert batch["input_ids"].shape == (2, 12) and int(batch["attention_mask"][1].sum()) == rows.lengths[1]


class FixedLogits(torch.nn.Module):
    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, **kwargs):
        assert "labels" not in kwargs  # the objective computes the loss itself
        return SimpleNamespace(logits=self.logits)


def test_mlm_loss_by_hand():
    # V = 4. Position 1: logits (2, 0, 0, 0), target 0 -> -log(e^2 / (e^2 + 3)); position 3:
    # uniform, target 1 -> log 4. Positions 0 and 2 are not masked and add nothing.
    logits = torch.zeros(1, 4, 4)
    logits[0, 1, 0] = 2.0
    logits[0, 0] = torch.tensor([9.0, -9.0, 0.0, 0.0])  # would dominate if unmasked positions counted
    labels = torch.tensor([[-100, 0, -100, 1]])
    loss = MaskedLM()(FixedLogits(logits), {"input_ids": torch.zeros(1, 4, dtype=torch.long), "labels": labels})
    expected = -math.log(math.exp(2) / (math.exp(2) + 3)) + math.log(4)
    assert float(loss.value) == pytest.approx(expected, abs=1e-6)
    assert int(loss.units) == 2 and MaskedLM().units({"labels": labels}) == 2
    assert float(loss.metrics["accuracy"]) == 1.0  # position 1 argmax is right; position 3 is a tie -> index 0


def test_mlm_loss_sums_so_accumulation_is_exact():
    torch.manual_seed(0)
    logits = torch.randn(4, 6, 10)
    labels = torch.full((4, 6), -100)
    labels[0, 1], labels[1, 2], labels[1, 4], labels[3, 0], labels[3, 5] = 1, 2, 3, 4, 5
    whole, units, _, _ = masked_token_nll(logits, labels)
    parts = [masked_token_nll(logits[i:i + 2], labels[i:i + 2]) for i in (0, 2)]
    assert float(sum(p[0] for p in parts)) == pytest.approx(float(whole), abs=1e-5)
    assert int(units) == 5
    empty, n, _, _ = masked_token_nll(logits, torch.full((4, 6), -100))  # nothing masked: zero, not NaN
    assert float(empty) == 0.0 and int(n) == 0


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("lora", [False, True])
def test_mlm_head_on_masked_rows_only_equals_full_logits(monkeypatch, autocast, lora):
    import contextlib

    from honelm.models import build_model
    from honelm.objectives import mlm

    model = build_model("encoder", "test", vocab_size=96, task="mlm", seed=0)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)
    assert mlm.masked_head(model) is not None
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 96, (3, 10), generator=g)
    labels = torch.full_like(ids, -100)
    labels[0, [1, 4]], labels[1, 7], labels[2, [0, 2, 9]] = ids[0, [1, 4]], ids[1, 7], ids[2, [0, 2, 9]]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    results = []
    for fast in (True, False):
        with monkeypatch.context() as m:
            if not fast:
                m.setattr(mlm, "masked_head", lambda model: None)
            model.zero_grad()
            torch.manual_seed(1)  # the same dropout masks in both passes
            with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
                loss, rows = MaskedLM().outputs(model, batch)
            (loss.value * 0.5).backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            results.append((loss, rows.detach(), grads))
    (a, ra, ga), (b, rb, gb) = results
    assert int(a.units) == int(b.units) == 6 and ra.shape == rb.shape == (6, 96)
    assert float(a.metrics["accuracy"]) == float(b.metrics["accuracy"])
    assert ga.keys() == gb.keys() and (all("lora_" in n for n in ga) if lora else len(ga) > 10)
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-5)
    assert torch.allclose(a.value, b.value, **tol) and torch.allclose(ra, rb, **tol)
    for n in ga:
        assert (ga[n] - gb[n]).norm() <= (1e-2 if autocast else 1e-5) * gb[n].norm() + 1e-7, n
