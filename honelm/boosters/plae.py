"""Pseudo-labelled adversarial embedding augmentation (Kim and Kang, IEEE Access 10:8363, 2022).

The paper's abstract gives the idea: generate an adversarial embedding for each training text by
PGD-based adversarial training, give it the original text's label (a pseudo-label), and retrain a
separate language model on those (embedding, label) pairs. What honelm infers, because only the
abstract was available (docs/adversarial.md says the same):

1. Teacher: fine-tune from the starting checkpoint (with PGD adversarial training by default,
   `adversarial.teacher=plain` for plain fine-tuning), keeping the validation-best model.
2. Generation: for every training example, `adversarial.copies` perturbations δ by PGD against
   the teacher in eval mode (radius ε, K steps of α; each copy from its own random start when
   init_mag > 0). δ is stored, not e + δ: the student adds it to its *own* word-embedding output,
   which is the same space (same starting checkpoint) and stays so when embeddings train.
3. Student: a fresh model from the same checkpoint and seed trains on each clean example plus one
   of its stored adversarial embeddings (a copy drawn at random each time), labelled with the
   original label: loss = L(e) + λ·L(e + δ_stored).

The teacher lives in RUN/plae_teacher/ (a normal run directory); the perturbations in
RUN/plae_teacher/adversarial_embeddings.safetensors (fp16, real positions only), so a resumed
run reuses both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from honelm.boosters.adversarial import Adversarial, AdversarialConfig
from honelm.errors import HonelmError

TEACHER_DIR = "plae_teacher"
DELTAS_FILE = "adversarial_embeddings.safetensors"


def teacher_config(cfg: AdversarialConfig) -> AdversarialConfig:
    """The adversarial section the teacher trains with: PGD with plae's ε, α, K, init, norm (or none)."""
    r = cfg.resolved()
    if r.teacher == "plain":
        return AdversarialConfig(method="none")
    return AdversarialConfig(method="pgd", epsilon=r.epsilon, steps=r.steps, step_size=r.step_size,
                             init_mag=r.init_mag, norm=r.norm, perturb_special=r.perturb_special)


def generate(teacher: nn.Module, inner: Any, cfg: AdversarialConfig, special_ids: list[int], n_examples: int,
             collate: Callable[[list[int]], dict[str, torch.Tensor]], batch_size: int, device: torch.device,
             autocast: Any, progress: Callable[[int], None] | None = None) -> dict[str, torch.Tensor]:
    """{"<example>/<copy>": δ rows (real positions of that example, d) in fp16} for every training example."""
    gen = Adversarial(inner, AdversarialConfig(method="pgd", epsilon=cfg.epsilon, steps=cfg.steps,
                                               step_size=cfg.step_size, init_mag=cfg.init_mag, norm=cfg.norm,
                                               perturb_special=cfg.perturb_special), special_ids)
    teacher.eval()  # the attack targets the teacher's function, not one dropout sample of it
    out: dict[str, torch.Tensor] = {}
    for copy in range(cfg.copies):
        for start in range(0, n_examples, batch_size):
            idx = list(range(start, min(start + batch_size, n_examples)))
            batch = {k: v.to(device) for k, v in collate(idx).items()}
            delta = gen.generate(teacher, batch, autocast).detach()
            real = batch["attention_mask"].bool()
            for row, i in enumerate(idx):
                out[f"{i}/{copy}"] = delta[row][real[row]].to(torch.float16).cpu().contiguous()
            if progress is not None:
                progress(len(idx))
    return out


def save(deltas: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    save_file(deltas, str(tmp))
    tmp.replace(path)


def load(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def stored_lookup(deltas: dict[str, torch.Tensor], copies: int) -> Callable[[dict[str, Any], torch.Tensor], torch.Tensor]:
    """The `stored(batch, like)` callback of `Adversarial`: one stored copy per example, drawn at random."""
    def lookup(batch: dict[str, Any], like: torch.Tensor) -> torch.Tensor:
        if "index" not in batch:
            raise HonelmError("adversarial.method=plae: the batch has no example 'index' to find its stored embeddings")
        full = torch.zeros_like(like, dtype=torch.float32)
        real = batch["attention_mask"].bool()
        picks = torch.randint(copies, (len(batch["index"]),)).tolist()
        for row, (i, c) in enumerate(zip(batch["index"].tolist(), picks)):
            rows = deltas[f"{i}/{c}"]
            full[row][real[row]] = rows.to(full.device, torch.float32)
        return full
    return lookup
