"""`honelm distill`: a teacher classifier teaches a student on one task (knowledge distillation).

The student is anything `classify` trains (a from-scratch preset whose tokenizer is trained on the
transfer text, a `pretrain`/`adapt` run, a smaller checkpoint; LoRA composes); the teacher is any
classifier on the same label set, with its own tokenizer and architecture (`honelm.teacher`).
The student learns from the transfer set (`honelm.data.transfer`: the train split, optional
unlabelled text, optional augmented copies, leak-guarded against validation and test) with
α·CE(gold) + (1 − α)·T²·KL(teacher_T ‖ student_T), or the logit MSE
(`honelm.objectives.distill`). The teacher's outputs are computed once and cached in
RUN/teacher/. Validation, early stopping, best/, `honelm test` and the predictions files are
exactly `classify`'s, on the same split for the same data settings, so a classify run, a distill
run and the teacher's own run are tested on the same sealed test split (`honelm compare`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

from honelm import teacher as T
from honelm.boosters import StageConfig
from honelm.boosters.adversarial import AdversarialConfig
from honelm.boosters.lora import LoraConfig
from honelm.checkpoint import resolve_model_dir
from honelm.config import ModelConfig, RunConfig, TrainConfig, section
from honelm.data.batches import encode_examples
from honelm.data.sections import LabelledDataConfig
from honelm.data.transfer import (AugmentConfig, TransferExamples, build_transfer_set, read_unlabelled,
                                  with_placeholder_labels)
from honelm.errors import ConfigError
from honelm.metrics import classification_scores
from honelm.objectives.base import Objective
from honelm.objectives.distill import Distill
from honelm.stages.classify import Classification, _classify_train_defaults
from honelm.stages.contract import Plan, RunContext
from honelm.tokenizer import load_tokenizer


@dataclass
class DistillDataConfig(LabelledDataConfig):
    """The task's labelled data (split exactly as `classify` splits it) and extra unlabelled transfer text."""

    unlabelled: str = ""
    """Unlabelled text for the transfer set (files/globs, comma-separated; read with data.text_field / data.pair_field, no label): a domain corpus or more task-like text. Texts equal to a task validation/test text are dropped and counted."""


@dataclass
class DistillOptions:
    """How the teacher's outputs and the gold labels are mixed in the student's loss."""

    alpha: float = 0.5
    """Weight of the gold-label term: loss = alpha*CE(gold) + (1-alpha)*KD; rows without a gold label carry KD only. 0 = teacher only."""
    temperature: float = 2.0
    """Softmax temperature T of the KL term (multiplied by T^2, Hinton et al. 2015); classification with loss=kl only."""
    loss: Literal["kl", "mse"] = "kl"
    """KD term: kl (T^2 * KL(teacher_T || student_T)) or mse (squared distance of the logits, Tang et al. 2019). Regression always uses the squared error to the teacher's prediction."""

    def validate(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"distill.alpha={self.alpha} must be in [0, 1]")
        if self.temperature <= 0:
            raise ConfigError(f"distill.temperature={self.temperature} must be > 0")


@dataclass
class DistillConfig(StageConfig):
    """Distil a teacher classifier or regressor into a student on one task."""

    verb = "distill"

    run: RunConfig = section(RunConfig)
    data: DistillDataConfig = section(DistillDataConfig)
    model: ModelConfig = section(ModelConfig)
    teacher: T.TeacherConfig = section(T.TeacherConfig)
    distill: DistillOptions = section(DistillOptions)
    augment: AugmentConfig = section(AugmentConfig)
    train: TrainConfig = section(_classify_train_defaults)  # type: ignore[arg-type]
    lora: LoraConfig = section(LoraConfig)
    adversarial: AdversarialConfig = section(AdversarialConfig)


class Distillation(Classification):
    """`classify` with a teacher: the transfer set trains, the teacher's cached outputs in every batch."""

    name = "distill"
    config = DistillConfig

    def read(self, ctx: RunContext) -> None:
        super().read(ctx)
        cfg = ctx.cfg
        unlabelled = read_unlabelled(cfg.data.unlabelled, cfg.data.text_field, cfg.data.pair_field)
        mask = self.mask_text(cfg, ctx.say) if cfg.augment.copies > 0 and cfg.augment.p_mask > 0 else ""
        transfer = build_transfer_set(ctx.splits, unlabelled, cfg.augment, cfg.run.seed, mask, ctx.say)
        ctx.extra["transfer"] = transfer
        ctx.write_json("transfer_set.json", transfer.record)

    def tokenizer_texts(self, ctx: RunContext) -> list[str]:
        rows = ctx.extra["transfer"].rows
        return [e.text for e in rows] + [e.text_pair for e in rows if e.text_pair]

    def training_items(self, ctx: RunContext) -> TransferExamples:
        cfg, rows = ctx.cfg, ctx.extra["transfer"].rows
        label2id, id2label = self.labels(ctx)
        outputs = T.cached(ctx.run_dir, cfg.teacher, rows, ctx.splits.val, id2label, cfg.data.max_length,
                           ctx.runtime, ctx.say)
        self.say_teacher_validation(ctx, outputs)
        placeholder = 0.0 if label2id is None else next(iter(label2id))
        filled, has_label = with_placeholder_labels(rows, placeholder)
        encoded = encode_examples(ctx.tokenizer, filled, label2id, cfg.data.max_length, ctx.extra["is_decoder"])
        return TransferExamples(encoded, outputs.transfer, has_label)

    def objective(self, ctx: RunContext) -> Objective:
        d = ctx.cfg.distill
        return Distill(d.alpha, d.temperature, d.loss, regression=ctx.cfg.data.task == "regression")

    def finish(self, ctx: RunContext, plan: Plan, result: Any) -> dict[str, Any]:
        return dict(ctx.extra.get("teacher_val", {}))

    def say_teacher_validation(self, ctx: RunContext, outputs: T.TeacherOutputs) -> None:
        """The teacher's validation scores (the level the student is measured against), in the log and the summary."""
        if outputs.val is None or not ctx.splits.val:
            return
        val = self.encode(ctx, ctx.splits.val, "val")
        regression = ctx.cfg.data.task == "regression"
        scores = classification_scores(outputs.val, val.labels, regression, self.model_spec(ctx).num_labels or 1,
                                       "teacher_val")
        ctx.extra["teacher_val"] = scores
        ctx.write_json("teacher_scores.json", scores)
        ctx.say("teacher on validation: " + ", ".join(f"{k}={v:.4f}" for k, v in scores.items()))

    @staticmethod
    def mask_text(cfg: DistillConfig, say: Callable[[str], None]) -> str:
        """The word augmentation masks with: augment.mask, else the teacher tokenizer's mask token, else its
        unknown token, else "[MASK]" as plain text (said in the log)."""
        if cfg.augment.mask:
            return cfg.augment.mask
        tokenizer = load_tokenizer(resolve_model_dir(cfg.teacher.tokenizer or cfg.teacher.model))
        token = tokenizer.mask_token or tokenizer.unk_token
        if not token:
            say("augment: the teacher's tokenizer has neither a mask nor an unknown token; masked words become "
                "'[MASK]' as plain text (set augment.mask to choose)")
        return str(token or "[MASK]")
