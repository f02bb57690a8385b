"""Preference pairs for `reward` and `dpo`: reading (with an optional margin), splitting, encoding, batching.

This module owns:

* `read_pairs`: preference rows (`honelm.data.chat.preference_of` formats) as `PairRow`s, with a
  per-pair `margin` read from a field when the data has one (every row, or none: a row without it
  is an error naming file, line and field).
* `split_pairs`: train/val/test by `honelm.data.splits.make_splits`, where a pair's identity is
  its PROMPT, so every pair of one prompt lands in the same split (a reward model that saw a
  prompt's other pairs in training would be scored optimistically on it). The manifest also holds
  hashes of the full pair contents per split (`hashes.train_pairs`, ...), so `honelm test`
  notices an edited reply, not only an edited prompt.
* `encode_pairs` / `EncodedPairs`: prompt + chosen and prompt + rejected, each tokenised through
  the chat template with labels on the reply only (`encode_prompt_reply`). When a reply does not
  fit in `max_length`, the prompt's oldest user/assistant exchanges are dropped first (the system
  message and the last user turn stay; counted); pairs whose reply is still cut away are dropped
  and counted (never silently), cut replies are counted.
* `EncodedPairs.collate`: P pairs → one batch of 2P rows, chosen first then rejected, right-padded
  with the pad id:

      input_ids, attention_mask, labels   (2P, T)   rows [c_1 .. c_P, r_1 .. r_P]
      index                               (P,)      which pairs (for stored reference log-probs)
      margin                              (P,)      when the data has margins
      ref_logps                           (2P,)     when reference log-probs were precomputed
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import torch

from honelm.data.chat import IGNORE, Preference, encode_prompt_reply, preference_of
from honelm.data.readers import BadRows, Document, Row, convert_rows, read_rows
from honelm.data.sources import check_not_empty, read_test_later, report_skipped, say_split, skipping
from honelm.data.splits import content_hash, make_splits, parse_ratios
from honelm.errors import ConfigError, DataError, HonelmError


@dataclass(frozen=True, eq=False)
class PairRow(Document):
    """A preference pair as a split item: `text` is the prompt (the pair's identity for splits and duplicates)."""

    pair: Preference | None = None
    margin: float | None = None

    @property
    def full_hash(self) -> str:
        """sha256 of everything the pair trains on: prompt, both replies, margin."""
        p = self.pair
        payload = [p.prompt, p.chosen, p.rejected, self.margin] if p is not None else [self.text]
        return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode("utf-8")).hexdigest()


def prompt_identity(prompt: list[dict[str, str]]) -> str:
    """The text that identifies a prompt: its messages as `role: content` lines (a lone user turn: its content)."""
    if len(prompt) == 1:
        return prompt[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def read_pairs(spec: str | Sequence[str], margin_field: str = "", bad: BadRows | None = None) -> list[PairRow]:
    """Every preference row of the files, validated; margins from `margin_field` when the data has it.

    Bad rows are raised together, or collected in `bad` for its owner (`honelm.data.readers.BadRows`)."""
    given, bad = bad, BadRows() if bad is None else bad
    rows = read_rows(spec, bad)
    with_margin = bool(margin_field) and any(margin_field in r.data for r in rows)
    out = convert_rows(rows, lambda row: _pair_row(row, margin_field if with_margin else ""), bad)
    BadRows.finish(given, bad, out)
    return out


def _pair_row(row: Row, margin_field: str) -> PairRow:
    """One preference row, with its margin when `margin_field` is given (then every row needs it)."""
    pref = preference_of(row)
    margin = None
    if margin_field:
        if margin_field not in row.data:
            raise DataError(row.source, row.line, margin_field, "is missing, but other rows have it (a margin "
                            "must be given for every pair or none; set data.margin_field= to ignore it)")
        value = row.data[margin_field]
        if isinstance(value, str):  # CSV/TSV cells are strings
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise DataError(row.source, row.line, margin_field, f"must be a finite number, got {value!r}")
        margin = float(value)
    return PairRow(prompt_identity(pref.prompt), row.source, row.line, pair=pref, margin=margin)


def split_pairs(data: Any, say: Callable[[str], None], leak_texts: list[str] | None = None,
                read: Callable[[Any, str, BadRows], list[Any]] | None = None) -> Any:
    """Preference pairs split by `data.split` (or the given val/test files), grouped by prompt.

    `data` is a `honelm.stages.preference.PreferenceDataConfig` (margins are read when it has a
    non-empty `margin_field`). `leak_texts` (the prompts of a user test file) is passed only by
    `honelm test`, which has already opened that file. `read(files, split, bad)` reads rows of another
    kind grouped the same way (KTO's unpaired examples: `honelm.data.unpaired`); default `read_pairs`.
    """
    margin_field = getattr(data, "margin_field", "")
    read = read or (lambda spec, split, bad: read_pairs(spec, margin_field, bad))

    if not data.train:
        raise ConfigError("data.train is empty: give a JSONL/JSON file of preference pairs "
                          "({prompt, chosen, rejected} or ShareGPT {conversations, chosen, rejected})")
    bad = skipping(data)
    pairs = read(data.train, "train", bad)
    val = read(data.val, "val", bad) if data.val else None
    bad.check()
    load_test = read_test_later(lambda b: read(data.test, "test", b), data, say) if data.test else None
    splits = make_splits(pairs, ratios=parse_ratios(data.split), seed=data.seed, stratify=False, val=val,
                         load_test=load_test, test_path=data.test or None, dedup=data.dedup,
                         near_dup_threshold=data.near_dup_threshold, test_texts_for_leak_check=leak_texts)
    # full-content hashes: the split hashes above cover prompts only (they decide membership)
    hashes = splits.manifest["hashes"]
    hashes["train_pairs"] = _combined(r.full_hash for r in splits.train)
    hashes["val_pairs"] = _combined(r.full_hash for r in splits.val)
    test_prompts = set(splits.manifest.get("example_hashes", {}).get("test") or [])
    if test_prompts and not data.test:  # a ratio test share: the rows whose prompt hash is listed
        hashes["test_pairs"] = _combined(r.full_hash for r in pairs if content_hash(r) in test_prompts)
    report_skipped(bad, splits.manifest, say)
    say_split(splits.manifest, say)
    check_not_empty(splits.manifest, data)
    return splits


def _combined(hashes: Any) -> str:
    return hashlib.sha256("\n".join(sorted(hashes)).encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------
# encoding and batches


@dataclass
class EncodedPairs:
    """Token ids and completion labels of kept pairs; `rows[i]` is where pair i came from."""

    unit: ClassVar[str] = "pairs"

    chosen: list[list[int]]
    chosen_labels: list[list[int]]
    rejected: list[list[int]]
    rejected_labels: list[list[int]]
    margins: torch.Tensor | None  # (N,) float32
    pad_id: int
    rows: list[PairRow]
    truncated: int = 0  # kept pairs with a reply cut by max_length
    trimmed: int = 0  # kept pairs whose prompt lost its oldest exchanges to fit
    dropped: list[PairRow] = field(default_factory=list)  # pairs whose reply was cut away entirely
    ref_logps: torch.Tensor | None = None  # (N, 2) float32 [chosen, rejected], when precomputed

    def __len__(self) -> int:
        return len(self.chosen)

    @property
    def lengths(self) -> list[int]:
        """Padded width each pair needs (its longer sequence), for length-grouped batches."""
        return [max(len(c), len(r)) for c, r in zip(self.chosen, self.rejected)]

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        p = len(idx)
        width = max(self.lengths[i] for i in idx)
        input_ids = torch.full((2 * p, width), self.pad_id, dtype=torch.long)
        labels = torch.full((2 * p, width), IGNORE, dtype=torch.long)
        mask = torch.zeros((2 * p, width), dtype=torch.long)
        for row, i in enumerate(idx):
            for r, ids, lab in ((row, self.chosen[i], self.chosen_labels[i]),
                                (p + row, self.rejected[i], self.rejected_labels[i])):
                input_ids[r, :len(ids)] = torch.tensor(ids)
                labels[r, :len(lab)] = torch.tensor(lab)
                mask[r, :len(ids)] = 1
        index = torch.tensor(idx, dtype=torch.long)
        batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "index": index}
        if self.margins is not None:
            batch["margin"] = self.margins[index]
        if self.ref_logps is not None:
            batch["ref_logps"] = torch.cat([self.ref_logps[index, 0], self.ref_logps[index, 1]])  # (2P,)
        return batch


def older_turns_dropped(prompt: list[dict[str, str]]) -> list[dict[str, str]] | None:
    """The prompt without its oldest user/assistant exchange (a system message stays); None when only
    the last user turn is left."""
    head = prompt[:1] if prompt and prompt[0]["role"] == "system" else []
    rest = prompt[len(head):]
    return head + rest[2:] if len(rest) >= 3 else None


def encode_pairs(tokenizer: Any, rows: Sequence[PairRow], max_length: int, drop_truncated: bool = False,
                 trim_turns: bool = True) -> EncodedPairs:
    """Tokenise prompt + chosen and prompt + rejected through the chat template (labels on the reply).

    With `trim_turns`, a pair whose replies do not both fit within `max_length` loses the oldest
    exchanges of its prompt, one at a time, until they fit or only the last user turn is left
    (`trimmed` counts these pairs). A pair is then dropped (and listed in `dropped`) when truncation
    leaves either reply without a target token, or, with `drop_truncated`, when either is cut at all.
    """
    pad = tokenizer.pad_token_id
    if pad is None:
        raise HonelmError("the tokenizer has no pad token: preference batches are right-padded with it")
    out = EncodedPairs([], [], [], [], None, int(pad), [])
    margins: list[float] = []
    for row in rows:
        pref = row.pair
        assert pref is not None
        prompt: list[dict[str, str]] | None = pref.prompt
        trimmed = False
        while True:
            c = encode_prompt_reply(tokenizer, prompt, pref.chosen, max_length)
            r = encode_prompt_reply(tokenizer, prompt, pref.rejected, max_length)
            fits = c is not None and r is not None and not (c.truncated or r.truncated)
            shorter = older_turns_dropped(prompt) if trim_turns and not fits else None
            if shorter is None:
                break
            prompt, trimmed = shorter, True
        cut = c is not None and r is not None and (c.truncated or r.truncated)
        if c is None or r is None or (cut and drop_truncated):
            out.dropped.append(row)
            continue
        out.truncated += int(cut)
        out.trimmed += int(trimmed)
        out.chosen.append(c.ids)
        out.chosen_labels.append(c.labels)
        out.rejected.append(r.ids)
        out.rejected_labels.append(r.labels)
        out.rows.append(row)
        if row.margin is not None:
            margins.append(row.margin)
    if margins:
        out.margins = torch.tensor(margins, dtype=torch.float32)
    return out


def describe_encoding(enc: Any, name: str, max_length: int, drop_truncated: bool) -> str | None:
    """One log line about truncated and dropped pairs (or KTO examples: `enc.unit`) of a split (None when none)."""
    parts = []
    if enc.trimmed:
        parts.append(f"{enc.trimmed} of {len(enc) + len(enc.dropped)} {name} {enc.unit} lost their prompt's oldest "
                     f"exchanges to fit data.max_length={max_length} (data.trim_turns)")
    if enc.truncated:
        parts.append(f"{enc.truncated} of {len(enc) + len(enc.dropped)} {name} {enc.unit} have a reply cut at "
                     f"data.max_length={max_length} (kept; a cut reply changes its score)")
    if enc.dropped:
        where = ", ".join(f"{r.source}:{r.line}" for r in enc.dropped[:3]) + (" ..." if len(enc.dropped) > 3 else "")
        why = "a reply cut by" if drop_truncated else "no reply token left within"
        parts.append(f"{len(enc.dropped)} {name} {enc.unit} dropped ({why} data.max_length={max_length}): {where}")
    return "; ".join(parts) or None
