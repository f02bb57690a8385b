"""SFT examples: conversations as split rows, tokenised with completion-only labels, and their batches.

This module owns:
- `ChatDocument`: a conversation carried through `make_splits` (its `text`, a plain rendering of
  the roles and contents, is the row's identity for hashing and duplicate search);
- `split_conversations`: the chat files of a data config read and split into ChatDocuments;
- `encode_conversations`: `honelm.data.chat.encode_chat` over a split, counting the rows that
  were truncated and listing (file, line) of the rows dropped because truncation left them no
  target token (a row with no target would add 0/0 to the loss; it is never trained silently);
- `SFTExamples.collate`: right-padded rows with an attention mask; labels are -100 on padding by
  POSITION, never by comparing ids with the pad id, so EOS is trained even when pad == eos;
- `pack_examples` / `PackedExamples.collate`: several examples per row, chosen by best-fit
  decreasing; `position_ids` restart at 0 for every example and no attention mask is passed, so
  transformers' mask builder (`find_packed_sequence_indices`) makes a block-diagonal causal mask:
  no token attends to another example; `check_packing` proves that on the loaded model.

In both layouts the first token of every example has label -100: it would be predicted from the
previous example's last token in a packed row, and is never predicted in a padded row, so the
summed loss of an example is the same packed or not.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from honelm.data.chat import IGNORE, Conversation, Messages, encode_chat, read_conversations
from honelm.data.readers import BadRows, Document
from honelm.data.sources import read_test_later, skipping
from honelm.data.splits import Splits, make_splits, parse_ratios
from honelm.errors import ConfigError


@dataclass(frozen=True)
class ChatDocument(Document):
    """A conversation as a split row; `messages` holds (role, content) pairs (hashable, as Document is frozen)."""

    messages: tuple[tuple[str, str], ...] = ()

    @property
    def conversation(self) -> Messages:
        return [{"role": r, "content": c} for r, c in self.messages]


def identity_text(messages: Messages) -> str:
    """The text a conversation is hashed and compared by: `role: content` lines."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def as_document(conv: Conversation) -> ChatDocument:
    return ChatDocument(identity_text(conv.messages), conv.source, conv.line,
                        tuple((m["role"], m["content"]) for m in conv.messages))


def template_texts(messages_list: Sequence[Messages]) -> list[str]:
    """Each conversation as honelm's default template renders it (without EOS), for training a tokenizer.

    The role headers then become ordinary merges of the new vocabulary.
    """
    return ["".join(f"<|{m['role']}|>\n{m['content']}" for m in msgs) for msgs in messages_list]


def split_conversations(data: Any, say: Callable[[str], None], leak_texts: list[str] | None = None,
                        bad: BadRows | None = None) -> Splits:
    """Conversations split like documents (by content, seeded); each row a ChatDocument.

    `data` is a chat data config (`SplitDataConfig` fields and `format`); `leak_texts` (a user
    test file's identity texts) is passed only by `honelm test`. The train and val files' bad rows
    go to `bad` (raised together unless it skips them); a test file's skipped rows are said through `say`.
    """
    if not data.train:
        raise ConfigError("data.train is empty: give a JSONL/JSON/CSV/TSV/Parquet file of conversations "
                          "(alpaca, prompt_completion, messages or sharegpt rows)")

    bad = skipping(data) if bad is None else bad

    def read(spec: str, bad: BadRows) -> list[ChatDocument]:
        return [as_document(c) for c in read_conversations(spec.split(","), data.format, bad)]

    train = read(data.train, bad)
    val = read(data.val, bad) if data.val else None
    bad.check()
    return make_splits(train, ratios=parse_ratios(data.split), seed=data.seed, stratify=False, val=val,
                       load_test=read_test_later(lambda b: read(data.test, b), data, say) if data.test else None,
                       test_path=data.test.split(",") if data.test else None, dedup=data.dedup,
                       near_dup_threshold=data.near_dup_threshold, test_texts_for_leak_check=leak_texts)


# --------------------------------------------------------------------------------------------
# encoding


@dataclass
class SFTExamples:
    """Tokenised examples of one split: ids and labels (unpadded), and what encoding cut or dropped."""

    ids: list[list[int]]
    labels: list[list[int]]
    pad_id: int
    rows: int = 0  # conversations given
    truncated: int = 0  # kept, but cut at max_length
    dropped: list[tuple[str, int]] = field(default_factory=list)  # (file, line): no target left after truncation
    kept: list[int] = field(default_factory=list)  # index into the given conversations of each example

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> list[int]:
        return [len(x) for x in self.ids]

    @property
    def n_tokens(self) -> int:
        return sum(len(x) for x in self.ids)

    @property
    def n_targets(self) -> int:
        return sum(sum(1 for y in lab if y != IGNORE) for lab in self.labels)

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        """Right-padded (B, T) input_ids, attention_mask and labels (-100 on padding positions)."""
        width = max(len(self.ids[i]) for i in idx)
        input_ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(idx), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            n = len(self.ids[i])
            input_ids[row, :n] = torch.tensor(self.ids[i])
            labels[row, :n] = torch.tensor(self.labels[i])
            mask[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    def describe(self, name: str) -> str:
        """One log line: what was kept, truncated and dropped (with where the first dropped rows are)."""
        line = (f"{name}: {self.rows} conversations → {len(self)} examples, {self.n_tokens:,} tokens "
                f"({self.n_targets:,} trained)")
        if self.truncated:
            line += f"; {self.truncated} truncated at data.max_length"
        if self.dropped:
            where = ", ".join(f"{src}:{ln}" for src, ln in self.dropped[:5])
            more = f" and {len(self.dropped) - 5} more" if len(self.dropped) > 5 else ""
            line += (f"; DROPPED {len(self.dropped)} whose reply starts after data.max_length (no target token "
                     f"left): {where}{more}")
        return line


def encode_conversations(tokenizer: Any, conversations: Sequence[Messages], max_length: int, train_on: str,
                         where: Sequence[tuple[str, int]] | None = None) -> SFTExamples:
    """`encode_chat` every conversation; count truncations, list (file, line) of dropped rows.

    Label 0 of each example is set to -100 (see the module docstring); `train_on=all` would
    otherwise make it a target that only a packed row could (wrongly) predict.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = SFTExamples([], [], pad if pad is not None else 0, rows=len(conversations))
    for i, messages in enumerate(conversations):
        enc = encode_chat(tokenizer, messages, max_length, train_on)
        if enc is None:
            out.dropped.append(where[i] if where is not None else ("<conversation>", i + 1))
            continue
        out.truncated += int(enc.truncated)
        out.ids.append(enc.ids)
        out.labels.append([IGNORE] + enc.labels[1:])
        out.kept.append(i)
    return out


# --------------------------------------------------------------------------------------------
# packing


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of item indices, each holding at most `capacity` tokens: longest item first, into the
    fullest bin that still has room (best fit), else a new bin. Deterministic (ties: lower index).

    Best-fit decreasing uses at most 11/9·OPT + 6/9 bins; on real SFT data rows end ~95% full.
    """
    if any(n > capacity for n in lengths):
        raise ValueError(f"an item is longer than the packing capacity {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))  # the smallest room that still fits n
        if k < len(free):
            room, b = free.pop(k)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, b))
    return bins


@dataclass
class PackedExamples:
    """Rows of several examples each (see `best_fit_decreasing`); `collate` builds packed batches."""

    examples: SFTExamples
    rows: list[list[int]]
    capacity: int

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def lengths(self) -> list[int]:
        return [sum(len(self.examples.ids[i]) for i in row) for row in self.rows]

    @property
    def fill(self) -> float:
        """Real tokens / (rows x capacity)."""
        return self.examples.n_tokens / max(len(self.rows) * self.capacity, 1)

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        """(B, T) input_ids, position_ids (0.. per example) and labels; NO attention_mask.

        A row shorter than the batch's longest ends with padding whose positions also restart at
        0: the mask builder sees it as one more sequence, so no real token attends to it, and its
        labels are -100.
        """
        ex = self.examples
        width = max(sum(len(ex.ids[i]) for i in self.rows[r]) for r in idx)
        input_ids = torch.full((len(idx), width), ex.pad_id, dtype=torch.long)
        labels = torch.full((len(idx), width), IGNORE, dtype=torch.long)
        positions = torch.zeros((len(idx), width), dtype=torch.long)
        for row, r in enumerate(idx):
            at = 0
            for i in self.rows[r]:
                n = len(ex.ids[i])
                input_ids[row, at:at + n] = torch.tensor(ex.ids[i])
                labels[row, at:at + n] = torch.tensor(ex.labels[i])  # label 0 is already -100
                positions[row, at:at + n] = torch.arange(n)
                at += n
            positions[row, at:] = torch.arange(width - at)
        return {"input_ids": input_ids, "position_ids": positions, "labels": labels}


def pack_examples(examples: SFTExamples, capacity: int) -> PackedExamples:
    return PackedExamples(examples, best_fit_decreasing(examples.lengths, capacity), capacity)


def check_packing(model: torch.nn.Module, examples: SFTExamples) -> None:
    """Refuse packing for a model whose attention crosses packed examples.

    Boundaries reach the attention only through position_ids (transformers builds the block-
    diagonal mask from them when no attention mask is given); an architecture that builds its
    mask otherwise (custom code, linear attention) would silently mix examples. Two training
    examples are run alone and packed; the second one's logits must not change.
    """
    if len(examples) < 2:
        return
    a, b = examples.ids[0][:16], examples.ids[1][:16]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([b], device=device), use_cache=False).logits[0]
            positions = torch.tensor([list(range(len(a))) + list(range(len(b)))], device=device)
            packed = model(input_ids=torch.tensor([a + b], device=device), position_ids=positions,
                           use_cache=False).logits[0, len(a):]
    finally:
        model.train(was_training)
    if not torch.allclose(packed.float(), alone.float(), rtol=1e-3, atol=1e-3):
        raise ConfigError(f"data.packing: {type(model).__name__} attends across packed examples (its attention "
                          "does not build the mask from position_ids); set data.packing=false")
