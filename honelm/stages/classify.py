"""`honelm classify`: sequence classification (single texts or pairs) and regression.

Works on an encoder or a decoder, from a preset, a `pretrain`/`adapt` run, or any checkpoint.
Validation reports loss, accuracy and macro-F1 (MSE and Pearson for regression); the best
validation checkpoint is kept and early stopping watches validation only. The run writes
`labels.json` (label id → name) and, beside the best model, `best/val_predictions.jsonl`: the
per-example predictions of the evaluation that made it best (format: honelm.predictions).
`honelm test` writes `test_predictions.jsonl` the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

from honelm import predictions as P
from honelm.boosters import StageConfig
from honelm.boosters.base import LABELS
from honelm.boosters.adversarial import AdversarialConfig
from honelm.boosters.lora import LoraConfig
from honelm.config import ModelConfig, RunConfig, TrainConfig, section
from honelm.data.batches import EncodedExamples, encode_examples, label_maps
from honelm.data.readers import check_labels_seen
from honelm.data.sections import LabelledDataConfig
from honelm.data.sources import labelled_splits
from honelm.metrics import OneClassWatch, classification_scores
from honelm.models import LoadedModel, check_block_fits, model_kind
from honelm.objectives.base import Objective
from honelm.objectives.classify import Classify, predict
from honelm.stages.contract import Inference, ModelSpec, Plan, ReportSection, RunContext, Stage


def _classify_train_defaults() -> TrainConfig:
    return TrainConfig(lr=5e-5, weight_decay=0.01, adam_beta2=0.999, warmup_ratio=0.06, schedule="linear",
                       min_lr_ratio=0.0, epochs=3.0, batch_size=32, eval_every=100, patience=5)


@dataclass
class ClassifyConfig(StageConfig):
    """Fine-tune a sequence classifier or regressor."""

    verb = "classify"
    capabilities = frozenset({LABELS})

    run: RunConfig = section(RunConfig)
    data: LabelledDataConfig = section(LabelledDataConfig)
    model: ModelConfig = section(ModelConfig)
    train: TrainConfig = section(_classify_train_defaults)  # type: ignore[arg-type]
    lora: LoraConfig = section(LoraConfig)
    adversarial: AdversarialConfig = section(AdversarialConfig)


class Classification(Stage):
    """Fine-tune a classifier or regressor; validation and test score the same way and keep per-example predictions."""

    name = "classify"
    config = ClassifyConfig
    report_sections = (ReportSection("results", ("confusion.png", "calibration.png", "pred_vs_gold.png"),
                                     "honelm.stages.classify_report:predictions_section"),)

    def splits(self, cfg: ClassifyConfig, say: Callable[[str], None], leak_texts: list[str] | None = None) -> Any:
        return labelled_splits(cfg.data, say, leak_texts)

    def tokenizer_texts(self, ctx: RunContext) -> list[str]:
        train = ctx.splits.train
        return [e.text for e in train] + [e.text_pair for e in train if e.text_pair]

    def tokenizer_kind(self, cfg: ClassifyConfig) -> Literal["bpe", "wordpiece"]:
        return "bpe" if cfg.model.arch == "decoder" else "wordpiece"

    def prepare(self, ctx: RunContext) -> None:
        if ctx.runtime.is_main:
            P.write_labels(ctx.run_dir, self.labels(ctx)[1])

    def model_spec(self, ctx: RunContext) -> ModelSpec:
        label2id, id2label = self.labels(ctx)
        return ModelSpec("classify", num_labels=1 if label2id is None else len(label2id), id2label=id2label)

    def plan(self, ctx: RunContext, loaded: LoadedModel) -> Plan:
        cfg = ctx.cfg
        check_block_fits(loaded.model, cfg.data.max_length, "data.max_length")
        ctx.extra["is_decoder"] = model_kind(loaded.model) == "decoder"
        train = self.training_items(ctx)
        val = self.encode(ctx, ctx.splits.val, "val") if ctx.splits.val else None
        for name, enc in (("train", train), ("validation", val)):
            if enc is not None and enc.truncated:
                ctx.say(f"note: {enc.truncated} of {len(enc)} {name} examples are longer than data.max_length="
                        f"{cfg.data.max_length} and were truncated")
        stream = ctx.stream(train, lengths=train.lengths)
        objective = self.objective(ctx)

        def best_files(info: dict[str, Any]) -> dict[str, str] | None:
            # fit() calls save_best right after the evaluation that set a new best, so the logits `score`
            # kept are that evaluation's; no evaluation, no val predictions
            logits = ctx.extra.get("val_logits")
            if logits is None or info.get("metric") is None or val is None:
                return None
            return {P.VAL_FILE: self.predictions(ctx, logits, ctx.splits.val, val)}

        def reset() -> None:  # each fit starts at the stream's start with no kept evaluation
            stream.position = 0
            ctx.extra.pop("val_logits", None)

        return Plan(objective, stream, self.validation(ctx, ctx.splits.val, "examples", val),
                    metric=cfg.train.metric or objective.default_metric, best_files=best_files, reset=reset)

    def training_items(self, ctx: RunContext) -> EncodedExamples:
        """What the training stream draws from (here: the encoded train split)."""
        return self.encode(ctx, ctx.splits.train, "train")

    def objective(self, ctx: RunContext) -> Objective:
        return Classify(regression=ctx.cfg.data.task == "regression")

    def encode(self, ctx: RunContext, rows: list[Any], split: str) -> EncodedExamples:
        return encode_examples(ctx.tokenizer, rows, self.labels(ctx)[0], ctx.cfg.data.max_length, ctx.extra["is_decoder"])

    def score(self, ctx: RunContext, model: torch.nn.Module, data: EncodedExamples, split: str) -> dict[str, float]:
        logits = predict(model, data, ctx.cfg.train.eval_batch_size, ctx.device)
        ctx.extra[f"{split}_logits"] = logits  # the per-example predictions files are written from these
        n_labels = self.model_spec(ctx).num_labels or 1
        if split == "val":  # a collapse to one class is said (docs/lora.md)
            ctx.extra.setdefault("one_class", OneClassWatch(ctx.say))(logits, data.labels, self.labels(ctx)[1])
        return classification_scores(logits, data.labels, ctx.cfg.data.task == "regression", n_labels, split)

    def test(self, ctx: RunContext, rows: list[Any]) -> dict[str, Any]:
        if ctx.cfg.data.task != "regression":
            check_labels_seen(ctx.splits.train, rows, "test")
        model = self.load_best(ctx).to(ctx.device).eval()
        ctx.extra["is_decoder"] = model_kind(model) == "decoder"
        data = self.encode(ctx, rows, "test")
        with torch.no_grad():
            out: dict[str, Any] = self.score(ctx, model, data, "test")
        out["n_examples"] = len(data)
        # labels.json again, for runs trained before classify wrote it (the same train labels give the same names)
        out["files"] = {P.TEST_FILE: self.predictions(ctx, ctx.extra["test_logits"], rows, data),
                        P.LABELS_FILE: P.labels_text(self.labels(ctx)[1])}
        return out

    def inference(self, ctx: RunContext, model: torch.nn.Module, rows: list[Any]) -> Inference:
        ctx.extra["is_decoder"] = model_kind(model) == "decoder"
        data, objective = self.encode(ctx, rows, "val"), Classify()
        return Inference(lambda idx: {k: v.to(ctx.device) for k, v in data.collate(list(idx)).items()},
                         lambda batch: objective.logits(model, batch))

    def labels(self, ctx: RunContext) -> tuple[dict | None, dict[int, str] | None]:
        """label → id and id → name from the train split (computed once per context)."""
        if "labels" not in ctx.extra:
            ctx.extra["labels"] = label_maps(ctx.splits.train, ctx.cfg.data.task)
        return ctx.extra["labels"]

    def predictions(self, ctx: RunContext, logits: torch.Tensor, rows: list[Any], data: EncodedExamples) -> str:
        """The per-example predictions file (honelm.predictions) of `rows`, encoded as `data`."""
        regression = ctx.cfg.data.task == "regression"
        # gold as read from the data (regression labels without a float32 round trip), in split order
        gold = [float(e.label) for e in rows] if regression else data.labels.tolist()
        return P.dumps_records(P.prediction_records(logits, gold, regression))
