"""Packing documents into fixed-length blocks for causal language modelling.

The token stream is  EOS d1 EOS d2 EOS ... dn EOS  (documents separated by EOS; the leading EOS
lets the first real token be predicted). Blocks of T tokens start every T-1 tokens, so block i
shares its first token with the last token of block i-1: every token after the first is a
target exactly once, which makes validation loss and bits-per-byte exact over the whole split.
The last block is padded (labels -100, attention 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

IGNORE = -100


@dataclass
class PackedBlocks:
    """(N, T) token blocks with labels and attention masks, plus what bits-per-byte needs."""

    input_ids: torch.Tensor  # (N, T) int64
    labels: torch.Tensor  # (N, T) int64, -100 on padding
    attention_mask: torch.Tensor  # (N, T) int64
    n_bytes: int  # UTF-8 bytes of the documents + one per document boundary (the newline EOS stands for)
    n_documents: int

    def __len__(self) -> int:
        return self.input_ids.size(0)

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        index = torch.tensor(idx, dtype=torch.long)
        return {"input_ids": self.input_ids[index], "labels": self.labels[index],
                "attention_mask": self.attention_mask[index]}


def token_stream(tokenizer, texts: Sequence[str], batch: int = 1000) -> list[int]:
    """EOS-separated ids of all documents (no other special tokens)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        eos = tokenizer.sep_token_id
    if eos is None:
        raise ValueError("the tokenizer has neither an EOS nor a SEP token to separate documents")
    stream = [eos]
    for start in range(0, len(texts), batch):
        for ids in tokenizer(list(texts[start:start + batch]), add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
            stream.append(eos)
    return stream


def pack(tokenizer, texts: Sequence[str], block_size: int) -> PackedBlocks:
    """Tokenize `texts` and cut the stream into overlapping-by-one blocks of `block_size`."""
    if block_size < 2:
        raise ValueError("block_size must be at least 2")
    stream = torch.tensor(token_stream(tokenizer, texts), dtype=torch.long)
    stride = block_size - 1
    n_blocks = max(1, math.ceil((stream.numel() - 1) / stride))
    padded_len = n_blocks * stride + 1
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    full = torch.full((padded_len,), pad_id, dtype=torch.long)
    full[: stream.numel()] = stream
    valid = torch.zeros(padded_len, dtype=torch.long)
    valid[: stream.numel()] = 1
    ids = full.unfold(0, block_size, stride)  # (N, T) views, overlapping by one token
    mask = valid.unfold(0, block_size, stride)
    labels = ids.masked_fill(mask == 0, IGNORE)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts) + len(texts)
    return PackedBlocks(ids.contiguous(), labels.contiguous(), mask.contiguous(), n_bytes, len(texts))


def bits_per_byte(total_nll_nats: float, n_bytes: int) -> float:
    """Cross-entropy in bits per UTF-8 byte: comparable across tokenizers."""
    return total_nll_nats / (math.log(2) * max(n_bytes, 1))
