"""The transfer set of `honelm distill`: the texts the teacher soft-labels and the student learns from.

It is the task's train split, plus optional unlabelled text (`data.unlabelled`: a domain corpus or
more task-like text), plus optional augmented copies of the train texts as Tang et al. (2019,
"Distilling Task-Specific Knowledge from BERT into Simple Neural Networks", section 3.2) made them:
for every word, with probability p_mask it becomes the mask token, else with probability p_swap a
random word of the train texts (the paper swaps words of the same part of speech; honelm has no
tagger, so the replacement is drawn from all train words, without regard to class); then with
probability p_ngram the copy is cut to a random n-gram, n uniform in 1..max_ngram (single texts
only). Each train text gets `copies` attempts; copies equal to a text already in the set are
discarded, as in the paper.

The leak guard of `adapt` applies: no transfer text (unlabelled or augmented, either half of a
pair) may equal a task validation or test text; such texts are dropped and counted. Train rows
keep their gold label; every other row is unlabelled (label None), so only the teacher's soft
labels teach on it. Augmentation draws from its own `random.Random(seed)`, never torch's RNG, so
it repeats exactly and does not shift the training run's random stream.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Sequence

import torch

from honelm.bounds import PROBABILITY, at_least
from honelm.data.adapt_corpus import leak_guard, sha
from honelm.data.readers import Example, read_examples
from honelm.errors import ConfigError


@dataclass
class AugmentConfig:
    """Augmented copies of the train texts for the transfer set (Tang et al. 2019); copies=0 = none."""

    copies: Annotated[int, at_least(0)] = 0
    """Augmentation attempts per train example (the paper used 20); copies equal to a text already in the transfer set are discarded."""
    p_mask: Annotated[float, PROBABILITY] = 0.1
    """Probability that a word becomes the mask token (the teacher's mask token, else its unknown token)."""
    p_swap: Annotated[float, PROBABILITY] = 0.1
    """Probability that a word (not masked) is replaced by a random word of the train texts."""
    p_ngram: Annotated[float, PROBABILITY] = 0.25
    """Probability that a copy is cut to a random n-gram of its words (single-text tasks only)."""
    max_ngram: Annotated[int, at_least(1)] = 5
    """Longest n-gram kept by n-gram sampling (n is uniform in 1..max_ngram)."""
    mask: str = ""
    """What a masked word becomes; empty = the teacher tokenizer's mask token, else its unknown token, else "[MASK]"."""

    def validate(self) -> None:
        if self.copies < 0:
            raise ConfigError("distill.augment.copies must be >= 0")
        for name in ("p_mask", "p_swap", "p_ngram"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"distill.augment.{name}={value} must be a probability in [0, 1]")
        if self.p_mask + self.p_swap > 1.0:
            raise ConfigError("distill.augment.p_mask + p_swap must be at most 1 (they share one draw per word)")
        if self.max_ngram < 1:
            raise ConfigError("distill.augment.max_ngram must be >= 1")


@dataclass
class TransferSet:
    """The rows the student trains on (train rows first, in split order) and the record of how they were made."""

    rows: list[Example]
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def n_labelled(self) -> int:
        return sum(1 for r in self.rows if r.label is not None)


def augment_text(text: str, rng: random.Random, cfg: AugmentConfig, vocabulary: Sequence[str], mask: str,
                 ngram: bool) -> str:
    """One augmented copy of `text` (whitespace words): masking, random word swaps, then maybe an n-gram."""
    words = text.split()
    out = []
    for word in words:
        u = rng.random()
        if u < cfg.p_mask:
            out.append(mask)
        elif u < cfg.p_mask + cfg.p_swap and vocabulary:
            out.append(vocabulary[rng.randrange(len(vocabulary))])
        else:
            out.append(word)
    if ngram and len(out) > 1 and rng.random() < cfg.p_ngram:
        n = rng.randint(1, min(cfg.max_ngram, len(out)))
        start = rng.randrange(len(out) - n + 1)
        out = out[start:start + n]
    return " ".join(out)


def augmented(train: Sequence[Example], cfg: AugmentConfig, seed: int, mask: str) -> list[Example]:
    """`cfg.copies` augmentation attempts per train example (unlabelled rows that keep the example's source line)."""
    if cfg.copies <= 0:
        return []
    rng = random.Random(seed)
    vocabulary = sorted({w for e in train for w in (e.text + " " + (e.text_pair or "")).split()})
    rows = []
    for e in train:
        for _ in range(cfg.copies):
            text = augment_text(e.text, rng, cfg, vocabulary, mask, ngram=e.text_pair is None)
            pair = augment_text(e.text_pair, rng, cfg, vocabulary, mask, ngram=False) if e.text_pair else None
            rows.append(Example(text, pair, None, f"{e.source} (augmented)", e.line))
    return rows


def build_transfer_set(splits: Any, unlabelled: Sequence[Example], augment: AugmentConfig, seed: int, mask: str,
                       say: Callable[[str], None]) -> TransferSet:
    """Train rows + unlabelled rows + augmented copies, leak-guarded and without exact repeats of a row already in."""
    guard, guard_info = leak_guard(splits)
    train = list(splits.train)
    seen = {_key(e) for e in train}
    rows: list[Example] = list(train)
    record: dict[str, Any] = {"train": len(train), "leak_guard": guard_info}
    for name, candidates in (("unlabelled", list(unlabelled)), ("augmented", augmented(train, augment, seed, mask))):
        leaked = repeats = 0
        for e in candidates:
            if sha(e.text) in guard or (e.text_pair is not None and sha(e.text_pair) in guard):
                leaked += 1
                continue
            key = _key(e)
            if key in seen:
                repeats += 1
                continue
            seen.add(key)
            rows.append(e)
        kept = len(candidates) - leaked - repeats
        record[name] = {"candidates": len(candidates), "kept": kept, "excluded_as_task_val_test": leaked,
                        "repeats_dropped": repeats}
        if candidates:
            say(f"transfer set: {name} {kept} of {len(candidates)} kept ({leaked} equal a task validation/test "
                f"text: leak guard; {repeats} repeat a text already in the set)")
    record["total"] = len(rows)
    say(f"transfer set: {len(rows)} texts ({len(train)} labelled train, {len(rows) - len(train)} without a gold "
        "label); the teacher soft-labels all of them")
    return TransferSet(rows, record)


def read_unlabelled(spec: str, text_field: str, pair_field: str) -> list[Example]:
    """`data.unlabelled`: files/globs (comma-separated) read like the task's data, without labels."""
    if not spec:
        return []
    return read_examples(spec.split(","), text_field=text_field, pair_field=pair_field or None, label_field=None)


def _key(e: Example) -> tuple[str, str | None]:
    return (e.text, e.text_pair)


@dataclass
class TransferExamples:
    """The encoded transfer rows with the teacher's outputs and which rows have a gold label; batches carry both."""

    examples: Any
    """`honelm.data.batches.EncodedExamples` of the transfer rows (placeholder labels where there is no gold one)."""
    teacher: torch.Tensor
    """(N, C) teacher logits in the student's label order (C = 1 for regression)."""
    has_label: torch.Tensor
    """(N,) bool: the row is a train example with its gold label."""

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def lengths(self) -> list[int]:
        return self.examples.lengths

    @property
    def truncated(self) -> int:
        return self.examples.truncated

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        batch = self.examples.collate(idx)
        at = torch.tensor(idx)
        batch["teacher"] = self.teacher[at]
        batch["has_label"] = self.has_label[at]
        return batch


def with_placeholder_labels(rows: Sequence[Example], placeholder: Any) -> tuple[list[Example], torch.Tensor]:
    """Rows an encoder of labelled examples accepts (`placeholder` where there is no label) and the has-label mask."""
    has = torch.tensor([r.label is not None for r in rows], dtype=torch.bool)
    filled = [r if r.label is not None else Example(r.text, r.text_pair, placeholder, r.source, r.line) for r in rows]
    return filled, has
