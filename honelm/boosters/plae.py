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
run reuses both. `prepare` is the booster's step before the main run (`honelm.boosters.prepare`):
teacher and generation, with the stage's own plan (stream, validation, best/) for the teacher.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from honelm.boosters.adversarial import Adversarial, AdversarialConfig, describe
from honelm.errors import HonelmError
from honelm.models import LoadedModel, load_model

Lookup = Callable[[dict[str, Any], torch.Tensor], torch.Tensor]

TEACHER_DIR = "plae_teacher"
DELTAS_FILE = "adversarial_embeddings.safetensors"


def teacher_config(cfg: AdversarialConfig) -> AdversarialConfig:
    """The adversarial section the teacher trains with: PGD with plae's ε, α, K, init, norm (or none)."""
    r = cfg.resolved()
    if r.teacher == "plain":
        return AdversarialConfig(method="none")
    return AdversarialConfig(method="pgd", epsilon=r.epsilon, steps=r.steps, step_size=r.step_size,
                             init_mag=r.init_mag, norm=r.norm, perturb_special=r.perturb_special)


def teacher_objective(inner: Any, cfg: AdversarialConfig, special_ids: list[int], say: Callable[[str], None]) -> Any:
    """What the teacher trains with: `inner` wrapped by PGD with plae's settings, or `inner` itself (teacher=plain)."""
    teacher = teacher_config(cfg)
    if teacher.method == "none":
        return inner
    wrapped = Adversarial(inner, teacher, special_ids=special_ids)
    say(describe(wrapped.cfg))
    return wrapped


def prepare(ctx: Any, spec: Any, model: nn.Module, plan: Any, train: Callable[[Any, nn.Module, Any, bool], Any]
            ) -> Lookup | None:
    """The teacher run and the generation; returns the student's lookup (None when the teacher stopped).

    Both are kept under RUN/plae_teacher/, so `--resume` continues an interrupted teacher and
    never regenerates stored embeddings. `spec` is the stage's model spec (task, labels) the
    teacher's best/ loads with; `train(sub, model, objective, resume)` fits with the stage's plan.
    """
    adv = ctx.cfg.adversarial.resolved()
    deltas_path = ctx.run_dir / TEACHER_DIR / DELTAS_FILE
    if not deltas_path.is_file() and not _teach_and_generate(ctx, spec, model, plan, train, adv, deltas_path):
        return None
    deltas = load(deltas_path)
    size = sum(t.numel() * t.element_size() for t in deltas.values())
    ctx.say(f"plae 3/3: a fresh student from the same start trains on clean + stored adversarial embeddings "
            f"({len(deltas)} stored, {size / 2**20:.1f} MiB; weight {adv.weight})")
    return stored_lookup(deltas, adv.copies)


def _teach_and_generate(ctx: Any, spec: Any, model: nn.Module, plan: Any, train: Callable[..., Any],
                        adv: AdversarialConfig, deltas_path: Path) -> bool:
    """Fine-tune the teacher (or continue it), then store its adversarial embeddings; False when it stopped."""
    teacher_dir = deltas_path.parent
    (teacher_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    started = any((teacher_dir / "checkpoints").iterdir())
    ctx.say(f"plae 1/3: teacher fine-tuning ({adv.teacher}) in {teacher_dir}")
    sub = ctx.sub_run(TEACHER_DIR)
    special_ids = list(getattr(ctx.tokenizer, "all_special_ids", []) or [])
    result = train(sub, model, teacher_objective(plan.objective, adv, special_ids, sub.say), started)
    sub.tracker.close()
    if result.reason == "interrupted":
        return False  # the teacher's checkpoint is saved; `--resume` continues it
    if result.stop_requested:  # the teacher finished as the stop came: `--resume` goes on with generation
        return False
    runtime = ctx.runtime
    teacher = load_model(teacher_dir / "best", spec.task, num_labels=spec.num_labels,
                         id2label=spec.id2label).to(runtime.device)
    ctx.say(f"plae 2/3: {adv.copies} adversarial embedding(s) per training example by PGD against the "
            f"teacher (epsilon={adv.epsilon}, steps={adv.steps}, step_size={adv.step_size}, norm={adv.norm})")
    started_at = time.perf_counter()
    deltas = _generate_with_progress(ctx, teacher, plan, adv)
    if runtime.is_main:
        save(deltas, deltas_path)
        sub.write_json("plae.json", {"teacher_train_time_s": round(result.train_time_s, 2),
                                     "generation_time_s": round(time.perf_counter() - started_at, 2),
                                     "copies": adv.copies, "stored": len(deltas)})
    runtime.barrier()
    return True


def _generate_with_progress(ctx: Any, teacher: nn.Module, plan: Any, adv: AdversarialConfig) -> dict[str, torch.Tensor]:
    """`generate` over the plan's training examples (its stream's collate), with a progress bar on the run's tracker."""
    stream, tracker, runtime = plan.stream, ctx.tracker, ctx.runtime
    tracker.start_progress(stream.n * adv.copies)
    done = [0]

    def advance(n: int) -> None:
        done[0] += n
        tracker.progress(done[0], "generating adversarial embeddings")

    deltas = generate(teacher, plan.objective, adv, list(ctx.tokenizer.all_special_ids or []), stream.n,
                      stream.collate, ctx.cfg.train.eval_batch_size, runtime.device, runtime.autocast, advance)
    tracker.stop_progress()
    return deltas


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


def stored_lookup(deltas: dict[str, torch.Tensor], copies: int) -> Lookup:
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


@dataclass
class Prepared:
    """What a booster's own run before the main one leaves for it (plae: the stored adversarial embeddings)."""

    stored: Lookup | None = None
    """The `stored(batch, like)` lookup the adversarial wrapper reads."""
    loaded: LoadedModel | None = None
    """The model the main run trains instead of the first one (which the booster's run trained)."""
    interrupted: bool = False
    """The booster's run stopped (Ctrl-C, or a stop that came as it finished): the main run must not start."""


def prepare_hook(ctx: Any, stage: Any, loaded: LoadedModel, plan: Any, train: Callable[[Any, nn.Module, Any, bool], Any],
                 reload: Callable[[], LoadedModel]) -> Prepared | None:
    """The adversarial booster's run before the main one: plae's teacher and generation (None for other methods).

    `train(sub, model, objective, resume)` fits `model` with the plan's stream, validation and best/
    into the sub-run `sub` (`ctx.sub_run(name)`); `reload()` gives a fresh model the way the runner
    loaded the first (the seed reset first). The teacher trains the loaded model, so the main run
    (the student) trains a fresh one from the same start.
    """
    adv_cfg = ctx.cfg.adversarial
    if adv_cfg.method != "plae" or not adv_cfg.resolved().active:
        return None
    stored = prepare(ctx, stage.model_spec(ctx), loaded.model, plan, train)
    if stored is None:
        return Prepared(interrupted=True)
    return Prepared(stored=stored, loaded=reload())
