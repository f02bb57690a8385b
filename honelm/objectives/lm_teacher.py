"""The teacher's side of token-level KD for causal LMs (`honelm.objectives.token_kd`): its top-k
next-token log-probs at the target positions of SFT examples, computed once, saved, and batched
with the examples; and on-policy batches (GKD), sampled from the student and scored by the
teacher on the spot.

- `check_shared_vocab`: token-level KD compares distributions over token ids, so the teacher must
  have the student's vocabulary (every token at the same id); anything else is refused (sequence-
  level KD, `honelm generate` -> `honelm sft`, works across tokenizers).
- `compute_teacher_topk`: the teacher runs on encoded SFT examples (`honelm.data.sft.SFTExamples`,
  one example per row, right-padded, never packed) and keeps, per example, (n_i, k) top-k token
  ids (int32) and log-probs (float16, log_softmax of its logits at temperature 1 over the shared
  vocabulary), n_i the example's target positions in order (position t whose next label
  labels[t+1] is not -100).
- `TeacherTopK.save` / `load_teacher_topk`: one safetensors file (written to a temporary name, then
  renamed: a reader never sees half a cache) with a fingerprint of the examples it belongs to, so
  a resumed or searched student reuses it and a cache of other examples is refused.
- `WithTeacher`: items (unpacked `SFTExamples` or packed `PackedExamples`) whose `collate` adds
  batch["teacher_ids"] (N, k) and batch["teacher_logprobs"] (N, k), N the batch's target positions
  in row-major order (token_kd's flat layout). A packed row is its examples concatenated, and each
  example's first label is -100 (nothing is predicted across a boundary), so concatenating each
  example's teacher rows in the row's order lines up with the packed labels.
- `on_policy_batch`: the student samples responses to prompts (`honelm.generate.sample_ids`, the
  exact sampled tokens), the labels are those tokens (EOS included) and -100 on the prompt, and the
  teacher's top-k is computed for them (Agarwal et al. 2024, GKD).

Storage per target token: k x 6 bytes (k = 32: 192 bytes). float16 keeps a log-prob to about 3
significant digits (steps of 1/64 between -16 and -32), far below what distillation can use.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from honelm.data.chat import IGNORE
from honelm.data.sft import PackedExamples, SFTExamples
from honelm.errors import ConfigError, HonelmError
from honelm.generate import SamplingConfig, sample_ids
from honelm.objectives.logprobs import CHUNK_ELEMENTS, final_hidden

FORMAT = "honelm-teacher-topk/1"
Autocast = Callable[[], ContextManager[Any]]


def target_counts(labels: Sequence[Sequence[int]]) -> list[int]:
    """Target positions of each example: labels[1:] that are not -100 (position t predicts labels[t+1])."""
    return [sum(1 for y in lab[1:] if y != IGNORE) for lab in labels]


def examples_fingerprint(examples: SFTExamples) -> str:
    """sha256 of every example's ids and labels: which examples a cache was computed for."""
    h = hashlib.sha256()
    for ids, labels in zip(examples.ids, examples.labels):
        h.update(len(ids).to_bytes(8, "little"))
        h.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
        h.update(torch.tensor(labels, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


@dataclass
class TeacherTopK:
    """The teacher's top-k at every target position: ids (N, k) int32 and logprobs (N, k) float16,
    example i's rows at [offsets[i], offsets[i + 1]) in its target order."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    counts: list[int]
    fingerprint: str
    meta: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.offsets = [0]
        for n in self.counts:
            self.offsets.append(self.offsets[-1] + n)
        if self.ids.shape != self.logprobs.shape or self.ids.dim() != 2 or self.ids.size(0) != self.offsets[-1]:
            raise HonelmError(f"teacher top-k: ids {tuple(self.ids.shape)} and logprobs {tuple(self.logprobs.shape)} "
                              f"do not hold {self.offsets[-1]} rows of k")

    @property
    def k(self) -> int:
        return int(self.ids.size(1))

    def rows(self, examples: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher rows of these examples, concatenated in the order given."""
        parts = [slice(self.offsets[i], self.offsets[i + 1]) for i in examples]
        return torch.cat([self.ids[s] for s in parts]), torch.cat([self.logprobs[s] for s in parts])

    def save(self, path: str | Path) -> None:
        """One safetensors file, written under a temporary name and renamed into place."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
        tensors = {"ids": self.ids.contiguous(), "logprobs": self.logprobs.contiguous(),
                   "counts": torch.tensor(self.counts, dtype=torch.int64)}
        save_file(tensors, str(tmp), metadata={**self.meta, "format": FORMAT, "fingerprint": self.fingerprint})
        os.replace(tmp, path)


def load_teacher_topk(path: str | Path, examples: SFTExamples | None = None) -> TeacherTopK:
    """A saved cache; with `examples`, refused unless it was computed for exactly those examples."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    except (OSError, SafetensorError) as exc:
        raise HonelmError(f"{path}: cannot read the teacher top-k cache ({exc})") from exc
    if meta.get("format") != FORMAT or set(tensors) != {"ids", "logprobs", "counts"} or "fingerprint" not in meta:
        raise HonelmError(f"{path}: not a teacher top-k cache of format {FORMAT}")
    fingerprint = meta.pop("fingerprint")
    meta.pop("format")
    cache = TeacherTopK(tensors["ids"], tensors["logprobs"], tensors["counts"].tolist(), fingerprint, meta)
    if examples is not None and cache.fingerprint != examples_fingerprint(examples):
        raise HonelmError(f"{path}: this teacher cache was computed for other examples (other data, tokenizer or "
                          "max_length); delete it to compute the teacher again")
    return cache


# --------------------------------------------------------------------------------------------
# the teacher's vocabulary and its top-k


def check_shared_vocab(teacher_tokenizer: Any, student_tokenizer: Any, teacher: nn.Module | None = None,
                       student: nn.Module | None = None) -> int:
    """The vocabulary size teacher and student share (`len` of the tokenizer); ConfigError unless every
    token has the same id in both, EOS included, and both models' output layers cover it."""
    theirs, ours = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    across = "sequence-level KD (honelm generate, then honelm sft on its output) works across tokenizers"
    if len(theirs) != len(ours):
        raise ConfigError(f"token-level KD needs one vocabulary: the teacher's tokenizer has {len(theirs):,} tokens, "
                          f"the student's {len(ours):,}; {across}")
    moved = sorted(t for t, i in ours.items() if theirs.get(t) != i)
    if moved:
        shown = ", ".join(f"{t!r} (student {ours[t]}, teacher {theirs.get(t)})" for t in moved[:3])
        raise ConfigError(f"token-level KD needs one vocabulary: {len(moved):,} tokens have other ids in the teacher's "
                          f"tokenizer, e.g. {shown}; {across}")
    if teacher_tokenizer.eos_token_id != student_tokenizer.eos_token_id:
        raise ConfigError(f"token-level KD: the teacher ends turns with token {teacher_tokenizer.eos_token_id} (EOS), "
                          f"the student with {student_tokenizer.eos_token_id}; {across}")
    for name, model in (("teacher", teacher), ("student", student)):
        rows = _output_rows(model) if model is not None else len(ours)
        if rows < len(ours):
            raise ConfigError(f"token-level KD: the {name} model scores {rows:,} tokens, fewer than the "
                              f"{len(ours):,} of its tokenizer")
    return len(ours)


def _output_rows(model: nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and hasattr(head, "weight"):
        return int(head.weight.size(0))
    return int(model.config.vocab_size)


def _batch_topk(teacher: nn.Module, batch: dict[str, torch.Tensor], k: int, vocab_size: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, k) top-k ids and log-probs at the batch's target positions (row-major) and (B,) targets per row."""
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask") if key in batch}
    inputs["use_cache"] = False
    target = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE) != IGNORE  # position t predicts labels[t+1]
    found = final_hidden(teacher, inputs)
    if found is None:  # a head that is not a plain Linear: full logits
        rows, w, dtype = teacher(**inputs).logits[target], None, None
    else:  # the target positions' hidden states, projected a chunk at a time below
        hidden, head, dtype = found
        rows, w = hidden[target], head.weight.to(dtype)
    chunk = max(1, CHUNK_ELEMENTS // vocab_size)
    ids, lps = [], []
    for s in range(0, rows.size(0), chunk):
        z = rows[s:s + chunk] if w is None else rows[s:s + chunk].to(dtype) @ w.t()
        logp = torch.log_softmax(z.float()[:, :vocab_size], dim=-1)
        top = logp.topk(k, dim=-1)
        ids.append(top.indices.to(torch.int32).cpu())
        lps.append(top.values.to(torch.float16).cpu())
    empty = torch.zeros((0, k))
    return (torch.cat(ids) if ids else empty.int(), torch.cat(lps) if lps else empty.half(), target.sum(1).cpu())


@torch.no_grad()
def compute_teacher_topk(teacher: nn.Module, examples: SFTExamples, k: int, vocab_size: int, batch_size: int = 8,
                         autocast: Autocast | None = None, meta: dict[str, str] | None = None) -> TeacherTopK:
    """Run the teacher on every example (one per row, right-padded; rows batched by length) and keep
    its top-k log-probs at each target position (see the module docstring). `vocab_size`: the
    shared vocabulary (`check_shared_vocab`); logits beyond it (a padded output layer) are left out
    before the softmax. The teacher's training mode is restored; no gradient is kept."""
    if not 1 <= k <= vocab_size:
        raise ConfigError(f"token-level KD: top-k must be in [1, {vocab_size}] (the vocabulary), got {k}")
    device = next(teacher.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: (len(examples.ids[i]), i))
    counts = target_counts(examples.labels)
    per_example: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    was_training = teacher.training
    teacher.eval()
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            batch = {key: v.to(device) for key, v in examples.collate(idx).items()}
            with (autocast or contextlib.nullcontext)():
                ids, lps, per_row = _batch_topk(teacher, batch, k, vocab_size)
            at = 0
            for i, n in zip(idx, per_row.tolist()):
                per_example[i] = (ids[at:at + n], lps[at:at + n])
                at += n
    finally:
        teacher.train(was_training)
    if any(per_example[i][0].size(0) != counts[i] for i in per_example):
        raise HonelmError("teacher top-k: the rows computed do not match the examples' target positions")
    empty = (torch.zeros((0, k), dtype=torch.int32), torch.zeros((0, k), dtype=torch.float16))
    parts = [per_example[i] for i in range(len(examples))] or [empty]
    return TeacherTopK(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), counts,
                       examples_fingerprint(examples), {"k": str(k), "vocab_size": str(vocab_size), **(meta or {})})


# --------------------------------------------------------------------------------------------
# batches with the teacher's rows


class WithTeacher:
    """Training items (`SFTExamples` or `PackedExamples`) whose batches carry the teacher's top-k rows
    of their target positions (token_kd's flat layout), for `RunContext.stream` like the items."""

    def __init__(self, items: SFTExamples | PackedExamples, teacher: TeacherTopK):
        examples = items.examples if isinstance(items, PackedExamples) else items
        if teacher.counts != target_counts(examples.labels):
            raise HonelmError("teacher top-k: the cache's target positions per example differ from the examples' "
                              "(computed for other examples)")
        if isinstance(items, PackedExamples) and any(lab and lab[0] != IGNORE for lab in examples.labels):
            # in a packed row the first label would be predicted from the previous example's last token
            raise HonelmError("teacher top-k: packed examples must start with label -100 (encode_conversations does)")
        self.items, self.teacher, self.packed = items, teacher, isinstance(items, PackedExamples)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def lengths(self) -> list[int]:
        return self.items.lengths

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        batch = self.items.collate(idx)
        order = [i for r in idx for i in self.items.rows[r]] if self.packed else idx  # type: ignore[union-attr]
        batch["teacher_ids"], batch["teacher_logprobs"] = self.teacher.rows(order)
        return batch


def on_policy_batch(student: nn.Module, teacher: nn.Module, tokenizer: Any, prompts: list[list[int]],
                    sampling: SamplingConfig, k: int, vocab_size: int, batch_size: int = 8,
                    autocast: Autocast | None = None) -> dict[str, torch.Tensor]:
    """A GKD on-policy batch: the student's sampled responses to `prompts` (token ids, e.g.
    `honelm.data.chat.prompt_ids`), right-padded as `SFTExamples.collate` pads, labels on the sampled
    tokens only (EOS included; -100 on the prompt and padding), and the teacher's top-k at those
    positions (`teacher_ids`, `teacher_logprobs`). Seeded by `sampling.seed` (give each step its own,
    derived from the run seed and the step, for a resumable stream); the global RNG is untouched.
    Train it with alpha = 0: CE on the student's own samples would reinforce them."""
    responses = sample_ids(student, tokenizer, prompts, sampling, batch_size)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    examples = SFTExamples([list(p) + r for p, r in zip(prompts, responses)],
                           [[IGNORE] * len(p) + r for p, r in zip(prompts, responses)], pad if pad is not None else 0)
    topk = compute_teacher_topk(teacher, examples, k, vocab_size, batch_size, autocast)
    return WithTeacher(examples, topk).collate(list(range(len(examples))))
