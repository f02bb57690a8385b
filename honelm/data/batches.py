"""Tokenised labelled examples and their padded batches (classification, pairs, regression).

Examples are tokenised once, unpadded; `collate` pads a micro-batch to its own longest row
(right padding), and the loop's length grouping keeps that padding small. Truncation to
`max_length` is counted and reported, never silent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from honelm.data.readers import Example
from honelm.errors import ConfigError


@dataclass
class EncodedExamples:
    """Token ids (unpadded) and label tensors for one split."""

    ids: list[list[int]]
    type_ids: list[list[int]] | None
    labels: torch.Tensor  # (N,) int64 or float32
    pad_id: int
    truncated: int

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> list[int]:
        return [len(x) for x in self.ids]

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        width = max(len(self.ids[i]) for i in idx)
        input_ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        types = torch.zeros((len(idx), width), dtype=torch.long) if self.type_ids is not None else None
        for row, i in enumerate(idx):
            n = len(self.ids[i])
            input_ids[row, :n] = torch.tensor(self.ids[i])
            mask[row, :n] = 1
            if types is not None:
                types[row, :n] = torch.tensor(self.type_ids[i])  # type: ignore[index]
        batch = {"input_ids": input_ids, "attention_mask": mask, "labels": self.labels[torch.tensor(idx)],
                 "index": torch.tensor(idx)}  # which examples: a booster may look up what it stored per example
        if types is not None:
            batch["token_type_ids"] = types
        return batch


def encode_examples(tokenizer: Any, examples: Sequence[Example], label2id: dict | None, max_length: int,
                    is_decoder: bool) -> EncodedExamples:
    """Tokenise texts (and pairs). Encoders use the tokenizer's own template ([CLS] a [SEP] b [SEP]);
    decoders get `a EOS b EOS`, so the last token, which a decoder classifier reads, is always EOS.
    """
    texts = [e.text for e in examples]
    pairs = [e.text_pair for e in examples]
    has_pairs = any(p is not None for p in pairs)
    check_room(tokenizer, max_length, has_pairs, is_decoder)
    ids: list[list[int]] = []
    type_ids: list[list[int]] | None = None
    truncated = 0
    if is_decoder:
        eos = tokenizer.eos_token_id
        # verbose=False: transformers would warn that a text longer than the tokenizer's model_max_length "will result
        # in indexing errors", but every row is cut to max_length below (and counted)
        a = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        b = (tokenizer([p or "" for p in pairs], add_special_tokens=False, verbose=False)["input_ids"] if has_pairs
             else None)
        for i, first in enumerate(a):
            row = first + [eos] + (b[i] + [eos] if b is not None else [])
            if len(row) > max_length:
                truncated += 1
                row = row[: max_length - 1] + [eos]
            ids.append(row)
    else:
        enc = tokenizer(texts, pairs if has_pairs else None, truncation=True, max_length=max_length,
                        return_token_type_ids=True)
        full = tokenizer(texts, pairs if has_pairs else None, truncation=False, return_length=True, verbose=False)
        truncated = sum(1 for n in full["length"] if n > max_length)
        ids = enc["input_ids"]
        type_ids = enc.get("token_type_ids")
    if label2id is None:  # regression
        labels = torch.tensor([float(e.label) for e in examples], dtype=torch.float32)
    else:
        labels = torch.tensor([label2id[e.label] for e in examples], dtype=torch.long)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return EncodedExamples(ids, type_ids, labels, pad, truncated)


def check_room(tokenizer: Any, max_length: int, pairs: bool, is_decoder: bool, key: str = "data.max_length") -> None:
    """Refuse a max_length that leaves no token of a text (or of each text of a pair) after the special tokens."""
    special = (2 if pairs else 1) if is_decoder else tokenizer.num_special_tokens_to_add(pair=pairs)
    needed = special + (2 if pairs else 1)
    if max_length < needed:
        raise ConfigError(f"{key}={max_length}: leaves no room for the text{'s of a pair' if pairs else ''} after "
                          f"{special} special token{'s' if special != 1 else ''}; must be at least {needed}")


def label_maps(train: Sequence[Example], task: str) -> tuple[dict | None, dict[int, str] | None]:
    """label → id over the TRAIN labels, sorted (numbers numerically, names alphabetically), and id → name."""
    if task == "regression":
        return None, None
    labels = sorted({e.label for e in train}, key=lambda x: (isinstance(x, str), x))
    label2id = {label: i for i, label in enumerate(labels)}
    return label2id, {i: str(label) for label, i in label2id.items()}
