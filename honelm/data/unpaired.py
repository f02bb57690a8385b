"""Unpaired preference examples for KTO: reading, the both-kinds check, encoding with mismatched KL rows, batching.

This module owns:

* `read_examples`: rows as `ExampleRow`s, each one prompt, one completion and whether it is
  desirable. KTO's own format `{prompt, completion, label}` (`honelm.data.chat.judged_of`) is read
  directly; a preference row (any `honelm.data.chat.preference_of` format) gives two examples, its
  chosen reply desirable and its rejected one undesirable (as TRL unpairs paired data for KTO).
  Splits group examples by prompt, as pairs are (`honelm.data.preferences.split_pairs`).
* `split_examples`: train/val/test as for pairs; `require_both`: KTO needs desirable and undesirable examples; training data with only one kind
  is an error naming the files.
* `encode_examples` / `EncodedExamples`: prompt + completion through the chat template, labels on
  the completion, trimmed, truncated and dropped as pairs are (counted, never silent). Each kept
  example i also gets a KL row: its prompt with the completion of another example (the next one,
  in split order, whose prompt differs), the mismatched pair KTO's reference point z0 is estimated
  from (Ethayarajh et al. 2024): example i's tokens up to its reply joined to the partner's reply tokens. The partner is fixed when encoding, so the KL rows' reference
  log-probs can be precomputed like every other row's.
* `EncodedExamples.collate`: B examples → 2B rows, the examples first then their KL rows, right-padded:

      input_ids, attention_mask, labels   (2B, T)   rows [x_1 .. x_B, kl_1 .. kl_B]
      index                               (B,)      which examples (for stored reference log-probs)
      desirable                           (B,)      bool
      ref_logps                           (2B,)     when reference log-probs were precomputed

  the same layout as a batch of pairs ([chosen; rejected]), so the reference machinery serves both.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import torch

from honelm.data.chat import IGNORE, Encoded, Judged, encode_prompt_reply, judged_of, preference_of
from honelm.data.preferences import older_turns_dropped, prompt_identity, split_pairs
from honelm.data.readers import BadRows, Document, Row, convert_rows, read_rows
from honelm.errors import DataError, HonelmError


@dataclass(frozen=True, eq=False)
class ExampleRow(Document):
    """An unpaired example as a split item: `text` is the prompt (its identity for splits and duplicates)."""

    example: Judged | None = None

    @property
    def full_hash(self) -> str:
        """sha256 of everything the example trains on: prompt, completion, label."""
        e = self.example
        payload = [e.prompt, e.completion, e.desirable] if e is not None else [self.text]
        return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode("utf-8")).hexdigest()


def read_examples(spec: str | Sequence[str], bad: BadRows | None = None) -> list[ExampleRow]:
    """Every row of the files as unpaired examples: {prompt, completion, label} as one, a preference row as two.

    Bad rows are raised together, or collected in `bad` for its owner (`honelm.data.readers.BadRows`)."""
    given, bad = bad, BadRows() if bad is None else bad
    per_row = convert_rows(read_rows(spec, bad), _judged_rows, bad)
    out = [r for rows in per_row for r in rows]
    BadRows.finish(given, bad, out)
    return out


def _judged_rows(row: Row) -> list[ExampleRow]:
    if "label" in row.data or "completion" in row.data:
        judged = [judged_of(row)]
    else:
        p = preference_of(row)
        judged = [Judged(p.prompt, p.chosen, True, row.source, row.line),
                  Judged(p.prompt, p.rejected, False, row.source, row.line)]
    return [ExampleRow(prompt_identity(j.prompt), row.source, row.line, example=j) for j in judged]


def require_both(rows: Sequence[ExampleRow], spec: str | Sequence[str]) -> None:
    """KTO learns from the contrast of desirable and undesirable examples: training data needs both kinds."""
    desirable = sum(1 for r in rows if r.example is not None and r.example.desirable)
    if desirable in (0, len(rows)):
        files = spec if isinstance(spec, str) else ", ".join(spec)
        kind = "desirable (label true)" if desirable else "undesirable (label false)"
        raise DataError(files, None, "label", f"all {len(rows)} examples are {kind}: KTO needs both desirable and "
                        "undesirable examples (thumbs up and down)")


def split_examples(data: Any, say: Callable[[str], None], leak_texts: list[str] | None = None) -> Any:
    """Unpaired examples split as pairs are (grouped by prompt; `split_pairs`), the training files checked for both kinds."""
    def read(spec: Any, split: str, bad: BadRows) -> list[ExampleRow]:
        rows = read_examples(spec, bad)
        if split == "train":
            require_both(rows, spec)
        return rows

    return split_pairs(data, say, leak_texts, read)


@dataclass
class EncodedExamples:
    """Token ids and completion labels of kept examples and of their KL rows; `rows[i]` is where example i came from."""

    unit: ClassVar[str] = "examples"

    ids: list[list[int]]
    labels: list[list[int]]
    kl_ids: list[list[int]]
    kl_labels: list[list[int]]
    desirable: torch.Tensor  # (N,) bool
    pad_id: int
    rows: list[ExampleRow]
    truncated: int = 0  # kept examples with a completion cut by max_length
    trimmed: int = 0  # kept examples whose prompt lost its oldest exchanges to fit
    dropped: list[ExampleRow] = field(default_factory=list)  # examples whose completion was cut away entirely
    ref_logps: torch.Tensor | None = None  # (N, 2) float32 [example, KL row], when precomputed

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> list[int]:
        """Padded width each example needs (its longer row), for length-grouped batches."""
        return [max(len(a), len(b)) for a, b in zip(self.ids, self.kl_ids)]

    @property
    def counts(self) -> tuple[int, int]:
        """(desirable, undesirable) examples."""
        n = int(self.desirable.sum())
        return n, len(self) - n

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        b = len(idx)
        width = max(self.lengths[i] for i in idx)
        input_ids = torch.full((2 * b, width), self.pad_id, dtype=torch.long)
        labels = torch.full((2 * b, width), IGNORE, dtype=torch.long)
        mask = torch.zeros((2 * b, width), dtype=torch.long)
        for row, i in enumerate(idx):
            for r, ids, lab in ((row, self.ids[i], self.labels[i]), (b + row, self.kl_ids[i], self.kl_labels[i])):
                input_ids[r, :len(ids)] = torch.tensor(ids)
                labels[r, :len(lab)] = torch.tensor(lab)
                mask[r, :len(ids)] = 1
        index = torch.tensor(idx, dtype=torch.long)
        batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "index": index,
                 "desirable": self.desirable[index]}
        if self.ref_logps is not None:
            batch["ref_logps"] = torch.cat([self.ref_logps[index, 0], self.ref_logps[index, 1]])  # (2B,)
        return batch


def kl_partners(prompts: Sequence[str]) -> list[int]:
    """For each example, the first example of the next run of another prompt (in order, cyclically): its
    completion makes the mismatched KL row. With one prompt only, the next example."""
    n = len(prompts)
    starts = [i for i in range(n) if i == 0 or prompts[i] != prompts[i - 1]]  # where each run of one prompt begins
    if len(starts) < 2:
        return [(i + 1) % n for i in range(n)]
    partner, run = [], 0
    for i in range(n):
        if run + 1 < len(starts) and starts[run + 1] == i:
            run += 1
        nxt = starts[(run + 1) % len(starts)]
        partner.append(nxt if prompts[nxt] != prompts[i] else starts[1])  # the last run may wrap onto its own prompt
    return partner


def _fitted(tokenizer: object, example: Judged, max_length: int,
            trim_turns: bool) -> tuple[list[dict[str, str]], Encoded | None, bool]:
    """(prompt used, encoding, whether the prompt lost old exchanges) with the oldest exchanges dropped until it fits."""
    prompt, trimmed = example.prompt, False
    while True:
        enc = encode_prompt_reply(tokenizer, prompt, example.completion, max_length)
        shorter = older_turns_dropped(prompt) if trim_turns and (enc is None or enc.truncated) else None
        if shorter is None:
            return prompt, enc, trimmed
        prompt, trimmed = shorter, True


def encode_examples(tokenizer: object, rows: Sequence[ExampleRow], max_length: int, drop_truncated: bool = False,
                    trim_turns: bool = True) -> EncodedExamples:
    """Tokenise prompt + completion through the chat template (labels on the completion), then each kept
    example's KL row: its tokens up to the reply, then its partner's reply tokens (`kl_partners`), cut at
    `max_length` (a KL row cut before any reply token has no target: log-probs 0 for policy and reference)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        raise HonelmError("the tokenizer has no pad token: KTO batches are right-padded with it")
    out = EncodedExamples([], [], [], [], torch.zeros(0, dtype=torch.bool), int(pad), [])
    prompts, desirable = [], []
    for row in rows:
        assert row.example is not None
        prompt, enc, trimmed = _fitted(tokenizer, row.example, max_length, trim_turns)
        if enc is None or (enc.truncated and drop_truncated):
            out.dropped.append(row)
            continue
        out.truncated += int(enc.truncated)
        out.trimmed += int(trimmed)
        out.ids.append(enc.ids)
        out.labels.append(enc.labels)
        out.rows.append(row)
        prompts.append(prompt)
        desirable.append(row.example.desirable)
    out.desirable = torch.tensor(desirable, dtype=torch.bool)
    starts = [next(t for t, lab in enumerate(labels) if lab != IGNORE) for labels in out.labels]  # where replies begin
    for i, j in enumerate(kl_partners([prompt_identity(p) for p in prompts])):
        # example i's tokens up to its reply, then example j's reply tokens (as TRL joins prompt and KL completion ids)
        out.kl_ids.append((out.ids[i][:starts[i]] + out.ids[j][starts[j]:])[:max_length])
        out.kl_labels.append(([IGNORE] * starts[i] + out.labels[j][starts[j]:])[:max_length])
    return out
