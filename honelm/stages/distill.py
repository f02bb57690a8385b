"""`honelm distill`: a teacher teaches a smaller student one task (knowledge distillation).

Classification and regression (`ClassifierDistillation`): the student is anything `classify` trains
(a from-scratch preset whose tokenizer is trained on the transfer text, a `pretrain`/`adapt` run, a
smaller checkpoint; LoRA composes); the teacher is any classifier on the same label set, with its
own tokenizer and architecture (`honelm.teacher`). The student learns from the transfer set
(`honelm.data.transfer`: the train split, optional unlabelled text, optional augmented copies,
leak-guarded against validation and test) with α·CE(gold) + (1 − α)·T²·KL(teacher_T ‖ student_T),
or the logit MSE (`honelm.objectives.distill`). The teacher's outputs are computed once and cached
in RUN/teacher/. Validation, early stopping, best/, `honelm test` and the predictions files are
exactly `classify`'s, on the same split for the same data settings, so a classify run, a distill
run and the teacher's own run are tested on the same sealed test split (`honelm compare`).

Generation (`data.task=generation`, `honelm.stages.distill_lm`): a teacher causal LM teaches a
student on conversations, by its answers (sequence-level) or its next-token distribution
(token-level); validation and test are `sft`'s. `Distillation`, the verb's stage, hands every hook
to one of the two by the run's config.
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
from honelm.data.answers import SamplesConfig
from honelm.data.batches import encode_examples
from honelm.data.sections import LabelledDataConfig
from honelm.data.transfer import (AugmentConfig, TransferExamples, build_transfer_set, read_unlabelled,
                                  with_placeholder_labels)
from honelm.errors import ConfigError
from honelm.generate import SamplingConfig
from honelm.metrics import classification_scores
from honelm.objectives.base import Objective
from honelm.objectives.distill import Distill
from honelm.stages.classify import Classification, _classify_train_defaults
from honelm.stages.contract import Plan, RunContext, Stage
from honelm.stages.distill_lm import LMDistillation, check_generation
from honelm.tokenizer import load_tokenizer


@dataclass
class DistillDataConfig(LabelledDataConfig):
    """The task's labelled data (split exactly as `classify` splits it) and extra unlabelled transfer text."""

    task: Literal["classification", "regression", "generation"] = "classification"
    """classification or regression (labelled examples: a teacher classifier/regressor), or generation (conversations: a teacher causal LM; docs/distill.md)."""
    format: Literal["auto", "alpaca", "prompt_completion", "messages", "sharegpt"] = "auto"
    """Generation only: the conversations' row format, as `sft`'s data.format."""
    train_on: Literal["assistant", "last", "all"] = "assistant"
    """Generation only: tokens that carry the loss, as `sft`'s data.train_on."""
    packing: bool = True
    """Generation only: pack several examples per row, as `sft`'s data.packing."""
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
    mode: Literal["auto", "sequence", "token"] = "auto"
    """Generation only: sequence (the teacher answers the training prompts, the student is SFT'd on the answers; any tokenizers) or token (the teacher's next-token distribution on the references; one shared vocabulary); auto = token when the student's tokenizer is the teacher's vocabulary."""
    divergence: Literal["forward", "reverse", "jsd"] = "forward"
    """Token-level KD: forward KL, reverse KL, or generalized JSD(beta) (GKD), on the teacher's top-k."""
    beta: float = 0.5
    """Token-level KD with divergence=jsd: the interpolation beta in (0, 1)."""
    top_k: int = 32
    """Token-level KD: teacher log-probs kept per target token (memory k x 6 bytes per token)."""
    num_samples: int = 1
    """Sequence-level KD: teacher answers per training prompt (seeds sampling.seed, seed+1, ...)."""

    def validate(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"distill.alpha={self.alpha} must be in [0, 1]")
        if self.temperature <= 0:
            raise ConfigError(f"distill.temperature={self.temperature} must be > 0")
        if self.top_k < 1 or self.num_samples < 1:
            raise ConfigError("distill.top_k and distill.num_samples must be >= 1")
        if self.divergence == "jsd" and not 0.0 < self.beta < 1.0:
            raise ConfigError(f"distill.beta={self.beta} must be in (0, 1) for divergence=jsd")


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


class Distillation(Stage):
    """The `distill` verb: every hook goes to the classifier distillation or, for data.task=generation, the
    causal-LM one (`honelm.stages.distill_lm`), chosen from the run's config."""

    name = "distill"
    config = DistillConfig
    report_sections = Classification.report_sections  # each section decides from the run's files whether it applies

    def __init__(self) -> None:
        self.classifier, self.lm = ClassifierDistillation(), LMDistillation()

    def of(self, where: Any) -> Stage:
        cfg = where.cfg if isinstance(where, RunContext) else where
        return self.lm if cfg.data.task == "generation" else self.classifier


def _forward(hook: str) -> Callable[..., Any]:
    def forward(self: Distillation, where: Any, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.of(where), hook)(where, *args, **kwargs)
    forward.__name__ = hook
    forward.__doc__ = f"`{hook}` of the distillation this run's config asks for."
    return forward


for _hook in [n for n, v in vars(Stage).items() if callable(v) and not n.startswith("_")]:
    setattr(Distillation, _hook, _forward(_hook))
