"""`honelm distill`: a teacher teaches a smaller student one task (knowledge distillation; docs/distill.md).

Classification and regression (`ClassifierDistillation`): `classify` with a teacher (`honelm.teacher`,
outputs cached in RUN/teacher/), a transfer set (`honelm.data.transfer`) and the KD loss
(`honelm.objectives.distill`); validation, best/, `honelm test` and the split are `classify`'s, so
teacher, student and a control share one sealed test split (`honelm compare`). Generation
(`data.task=generation`): `honelm.stages.distill_lm`. `Distillation`, the verb's stage, hands every
hook to one of the two by the run's config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from honelm import teacher as T
from honelm.boosters import StageConfig
from honelm.boosters.adversarial import AdversarialConfig
from honelm.boosters.lora import LoraConfig
from honelm.config import ModelConfig, RunConfig, TrainConfig, section
from honelm.data.answers import SamplesConfig
from honelm.data.batches import encode_examples
from honelm.data.sections import DistillDataConfig
from honelm.data.transfer import (AugmentConfig, TransferExamples, build_transfer_set, read_unlabelled,
                                  with_placeholder_labels)
from honelm.generate import SamplingConfig
from honelm.objectives.base import Objective
from honelm.objectives.distill import Distill, DistillOptions
from honelm.stages.classify import Classification, _classify_train_defaults
from honelm.stages.contract import Plan, RunContext, Stage
from honelm.stages.distill_lm import LMDistillation, check_generation


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
    sampling: SamplingConfig = section(SamplingConfig)
    samples: SamplesConfig = section(SamplesConfig)
    train: TrainConfig = section(_classify_train_defaults)  # type: ignore[arg-type]
    lora: LoraConfig = section(LoraConfig)
    adversarial: AdversarialConfig = section(AdversarialConfig)

    def validate(self) -> None:
        super().validate()
        if self.data.task == "generation":
            check_generation(self)


class ClassifierDistillation(Classification):
    """`classify` with a teacher: the transfer set trains, the teacher's cached outputs in every batch."""

    name = "distill"

    def read(self, ctx: RunContext) -> None:
        super().read(ctx)
        cfg, data = ctx.cfg, ctx.cfg.data
        unlabelled = read_unlabelled(data.unlabelled, data.text_field, data.pair_field)
        transfer = build_transfer_set(ctx.splits, unlabelled, cfg.augment, cfg.run.seed,
                                      T.mask_text(cfg.teacher, cfg.augment, ctx.say), ctx.say)
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
        if outputs.val is not None:  # the level the student is measured against, in the log and the summary
            labels = self.encode(ctx, ctx.splits.val, "val").labels
            ctx.extra["teacher_val"] = T.validation_scores(outputs.val, labels, label2id is None, ctx.say)
            ctx.write_json("teacher_scores.json", ctx.extra["teacher_val"])
        placeholder = 0.0 if label2id is None else next(iter(label2id))
        filled, has_label = with_placeholder_labels(rows, placeholder)
        encoded = encode_examples(ctx.tokenizer, filled, label2id, cfg.data.max_length, ctx.extra["is_decoder"])
        return TransferExamples(encoded, outputs.transfer, has_label)

    def objective(self, ctx: RunContext) -> Objective:
        d = ctx.cfg.distill
        return Distill(d.alpha, d.temperature, d.loss, regression=ctx.cfg.data.task == "regression")

    def finish(self, ctx: RunContext, plan: Plan, result: Any) -> dict[str, Any]:
        return dict(ctx.extra.get("teacher_val", {}))


class Distillation(Stage):
    """The `distill` verb: each hook goes to the classifier or (data.task=generation) the causal-LM distillation."""

    name = "distill"
    config = DistillConfig
    report_sections = Classification.report_sections  # each section decides from the run's files whether it applies

    def __init__(self) -> None:
        self.classifier, self.lm = ClassifierDistillation(), LMDistillation()

    def check(self, cfg: DistillConfig) -> None:
        T.require_teacher(cfg.teacher, generation=cfg.data.task == "generation")
        self.of(cfg).check(cfg)

    def of(self, where: Any) -> Stage:
        cfg = where.cfg if isinstance(where, RunContext) else where
        return self.lm if cfg.data.task == "generation" else self.classifier


def _forward(hook: str) -> Callable[..., Any]:
    def forward(self: Distillation, where: Any, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.of(where), hook)(where, *args, **kwargs)
    forward.__name__ = hook
    return forward


for _hook, _value in vars(Stage).items():
    if callable(_value) and not _hook.startswith("_") and _hook not in vars(Distillation):
        setattr(Distillation, _hook, _forward(_hook))
