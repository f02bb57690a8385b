"""Masked-LM data: BERT/RoBERTa masking as a pure function, and the rows it is applied to.

This module owns:

* `mask_tokens`: select ~`prob` of the maskable positions (never special tokens, never
  padding); of the selected, 80% become the mask token, 10% a random NON-special token, 10%
  stay unchanged; labels hold the original id at selected positions and -100 elsewhere
  (Devlin et al. 2019; the DSP reference's `mask_tokens`, METHODS.md section 2.1).
* `MLMRows`: tokenised rows (packed blocks or one document per row) stored as one flat tensor
  plus offsets (a Python list of lists costs ~30x the memory), whose `collate` pads a
  micro-batch and masks it afresh every time it is called: dynamic masking, so 100 TAPT epochs
  see 100 different masks (METHODS.md 2.4, failure mode 1).
* `pack_mlm` / `documents_mlm`: the two ways text becomes rows (see their docstrings);
  `lm_rows` picks one of them, or packed causal-LM blocks for a decoder.

Randomness: `collate` draws one seed per micro-batch from torch's GLOBAL generator and masks
with a private generator seeded by (that draw, rank). The loop seeds the global generator and
saves/restores it in checkpoints, so masks are deterministic for a run seed, differ between
epochs, and `--resume` reproduces them exactly; adding the rank keeps processes that share the
global state from masking their different rows at the same positions. Validation passes an
explicit generator with a fixed seed instead, so every evaluation sees the same masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from honelm.data.packing import PackedBlocks, pack, token_stream
from honelm.errors import ConfigError

IGNORE = -100


def mask_tokens(input_ids: torch.Tensor, special_mask: torch.Tensor, mask_id: int, vocab_size: int,
                generator: torch.Generator | None = None, prob: float = 0.15, mask_ratio: float = 0.8,
                random_ratio: float = 0.1, special_ids: Sequence[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (masked input_ids, labels) for MLM; `input_ids` is left untouched.

    input_ids (B, T) int64; special_mask (B, T) bool, True where a position may never be
    selected (special tokens and padding). Each other position is selected with probability
    `prob` (independently, as in BERT/RoBERTa); a selected position becomes `mask_id` with
    probability `mask_ratio`, a token drawn uniformly from [0, vocab_size) minus `special_ids`
    with probability `random_ratio`, and stays as it is otherwise. `generator` None = torch's
    global generator.
    """
    if not 0.0 < prob < 1.0:
        raise ValueError(f"mask probability must be in (0, 1), got {prob}")
    if mask_ratio < 0 or random_ratio < 0 or mask_ratio + random_ratio > 1:
        raise ValueError(f"mask_ratio={mask_ratio} and random_ratio={random_ratio} must be >= 0 and sum to <= 1")
    selected = (torch.rand(input_ids.shape, generator=generator) < prob) & ~special_mask  # (B, T)
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE))
    # One uniform draw per position splits the selected ones 80/10/10 (fewer draws than two
    # Bernoulli passes, same distribution).
    u = torch.rand(input_ids.shape, generator=generator)
    to_mask = selected & (u < mask_ratio)
    to_random = selected & (u >= mask_ratio) & (u < mask_ratio + random_ratio)
    out = input_ids.masked_fill(to_mask, mask_id)
    n_random = int(to_random.sum())
    if n_random:
        allowed = replacement_ids(vocab_size, special_ids)
        pick = torch.randint(len(allowed), (n_random,), generator=generator)
        out[to_random] = allowed[pick]
    return out, labels


def replacement_ids(vocab_size: int, special_ids: Sequence[int]) -> torch.Tensor:
    """Ids a random replacement may take: the vocabulary without its special tokens."""
    keep = torch.ones(vocab_size, dtype=torch.bool)
    special = [i for i in special_ids if 0 <= i < vocab_size]
    if special:
        keep[torch.tensor(special, dtype=torch.long)] = False
    allowed = keep.nonzero().squeeze(-1)
    if allowed.numel() == 0:
        raise ValueError("every vocabulary id is special: nothing to replace masked tokens with")
    return allowed


def special_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      special_ids: Sequence[int]) -> torch.Tensor:
    """(B, T) bool: special tokens and padding, the positions masking never selects."""
    special = torch.isin(input_ids, torch.tensor(sorted(set(special_ids)), dtype=input_ids.dtype))
    return special | (attention_mask == 0)


@dataclass
class MLMRows:
    """Unpadded token rows for masked LM; `collate` pads and masks a micro-batch.

    ids is every row concatenated (int32 keeps a large corpus at 4 bytes per token);
    row i is ids[offsets[i]:offsets[i+1]].
    """

    ids: torch.Tensor  # (total tokens,) int32
    offsets: torch.Tensor  # (N + 1,) int64
    pad_id: int
    mask_id: int
    vocab_size: int  # random replacements come from [0, vocab_size) minus special_ids
    special_ids: tuple[int, ...]
    prob: float = 0.15
    rank: int = 0
    truncated: int = 0  # documents cut at the row length (documents mode)
    n_documents: int = 0

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    @property
    def lengths(self) -> list[int]:
        return (self.offsets[1:] - self.offsets[:-1]).tolist()

    def padded(self, idx: list[int]) -> dict[str, torch.Tensor]:
        """input_ids and attention_mask of rows `idx`, right-padded to the longest (no masking)."""
        starts, ends = self.offsets[idx].tolist(), self.offsets[[i + 1 for i in idx]].tolist()
        width = max(e - s for s, e in zip(starts, ends))
        input_ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(idx), width), dtype=torch.long)
        for row, (s, e) in enumerate(zip(starts, ends)):
            input_ids[row, : e - s] = self.ids[s:e]
            attention[row, : e - s] = 1
        return {"input_ids": input_ids, "attention_mask": attention}

    def collate(self, idx: list[int], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """A padded micro-batch with a fresh mask: input_ids, attention_mask, labels."""
        batch = self.padded(idx)
        if generator is None:
            seed = int(torch.randint(0, 2**62, (1,)))  # from the global RNG: saved and restored by the loop
            generator = torch.Generator().manual_seed(seed + self.rank)
        special = special_positions(batch["input_ids"], batch["attention_mask"], self.special_ids)
        batch["input_ids"], batch["labels"] = mask_tokens(batch["input_ids"], special, self.mask_id, self.vocab_size,
                                                          generator, self.prob, special_ids=self.special_ids)
        return batch

    def fixed_batches(self, batch_size: int, seed: int) -> Any:
        """Yield the rows in order, masked by a generator seeded with `seed`: the same masks on every call."""
        generator = torch.Generator().manual_seed(seed)
        for start in range(0, len(self), batch_size):
            yield self.collate(list(range(start, min(start + batch_size, len(self)))), generator)


def _mlm_specials(tokenizer: Any) -> dict[str, Any]:
    mask_id = tokenizer.mask_token_id
    if mask_id is None:
        raise ValueError("the tokenizer has no mask token: masked LM needs one (e.g. [MASK] or <mask>)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return {"pad_id": pad, "mask_id": mask_id, "vocab_size": len(tokenizer),
            "special_ids": tuple(sorted(set(tokenizer.all_special_ids)))}


def _rows(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([0] + [len(r) for r in rows], dtype=torch.long)
    flat = torch.tensor([t for r in rows for t in r], dtype=torch.int32)
    return flat, torch.cumsum(lengths, 0)


def pack_mlm(tokenizer: Any, texts: Sequence[str], block_size: int, prob: float = 0.15) -> MLMRows:
    """Pack documents into full rows: [CLS] d1 [SEP] d2 [SEP] ... [SEP] (RoBERTa's FULL-SENTENCES).

    The stream `d1 SEP d2 SEP ...` (documents separated by the tokenizer's SEP/EOS, as in
    `honelm.data.packing`) is cut into chunks of block_size - 2 tokens, and each chunk is
    framed as [CLS] chunk [SEP], so every row looks like a model input the encoder was trained
    on and no compute goes to padding; only the last row is shorter. Documents longer than a
    block continue in the next row; nothing is dropped.
    """
    if block_size < 3:
        raise ValueError("block_size must be at least 3 ([CLS] token [SEP])")
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    if cls is None or sep is None:
        raise ValueError("packing for masked LM needs a tokenizer with CLS and SEP tokens")
    stream = token_stream(tokenizer, texts)[1:]  # no leading separator: [CLS] already opens the row
    content = block_size - 2
    rows = [[cls, *stream[s:s + content], sep] for s in range(0, len(stream), content)] or [[cls, sep]]
    flat, offsets = _rows(rows)
    return MLMRows(flat, offsets, prob=prob, n_documents=len(texts), **_mlm_specials(tokenizer))


def documents_mlm(tokenizer: Any, texts: Sequence[str], block_size: int, prob: float = 0.15) -> MLMRows:
    """One document per row with the tokenizer's own template ([CLS] d [SEP]), truncated at block_size.

    This is the DSP reference's `--line_by_line` (METHODS.md 2.4, item 3): the rows look like
    the task's inputs, which matters for short-text tasks; truncation is counted, not silent.
    """
    rows: list[list[int]] = []
    truncated = 0
    specials = set(tokenizer.all_special_ids)
    for start in range(0, len(texts), 1000):
        chunk = list(texts[start:start + 1000])
        full = tokenizer(chunk, truncation=False)["input_ids"]
        for ids in full:
            if len(ids) > block_size:
                truncated += 1
                # keep the template's closing token ([SEP], </s>) so a cut row still ends like an input
                ids = ids[: block_size - 1] + ids[-1:] if ids[-1] in specials else ids[:block_size]
            rows.append(ids)
    if not rows:
        raise ValueError("no documents to build masked-LM rows from")
    flat, offsets = _rows(rows)
    return MLMRows(flat, offsets, prob=prob, truncated=truncated, n_documents=len(texts), **_mlm_specials(tokenizer))



def check_mlm_tokenizer(tokenizer: Any, vocab_size: int) -> None:
    """Refuse a tokenizer masked LM cannot use: no mask/CLS token, or more ids than the model's `vocab_size`."""
    if tokenizer.mask_token_id is None or tokenizer.cls_token_id is None:
        raise ConfigError("masked LM needs a tokenizer with mask, CLS and SEP tokens (a WordPiece/BERT-style "
                          "tokenizer); this one has none: use the checkpoint's own tokenizer")
    if len(tokenizer) > vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary only {vocab_size}: "
                          "use the checkpoint's own tokenizer")


def lm_rows(tokenizer: Any, texts: Sequence[str], block_size: int, kind: str, packed: bool, prob: float = 0.15,
            rank: int = 0) -> MLMRows | PackedBlocks:
    """The rows a language model of `kind` trains or is scored on.

    A decoder: packed causal-LM blocks (`honelm.data.packing.pack`). An encoder: MLM rows, packed
    (`pack_mlm`) or one document per row (`documents_mlm`), whose dynamic masks add `rank` to
    their seed (see the module docstring).
    """
    if kind == "decoder":
        return pack(tokenizer, texts, block_size)
    rows = (pack_mlm if packed else documents_mlm)(tokenizer, texts, block_size, prob)
    rows.rank = rank
    return rows
