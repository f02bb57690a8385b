"""`honelm prompt`: zero/few-shot classification with a causal LM, validated and tested once like a trained run.

Nothing trains (`trains = False`): the model in model.init_from (a local directory, a honelm run,
`pkg:MODULE` or a hub id) scores each label's verbalizer after every example's prompt
(honelm.prompting: instruction, shots from the train split, chat template) and those scores are
the classifier's logits. The data section is classify's, so the same data.* values give the
same split, `labels.json`, `best/val_predictions.jsonl` and (from `honelm test`)
`test_predictions.jsonl` as a classify run: a prompted LM sits in the same comparison. The model
is not copied: RUN/prompted.json records its directory and fingerprint, and `honelm test` loads it
from there, refusing one that is gone or changed. best/ holds best.json, the validation
predictions and the tokenizer the prompts were rendered with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from honelm import predictions as P
from honelm.boosters import StageConfig
from honelm.checkpoint import atomic_directory, resolve_model_dir
from honelm.config import ModelConfig, RunConfig, section
from honelm.data.chat import ensure_template
from honelm.data.sections import LabelledDataConfig
from honelm.errors import ConfigError
from honelm.metrics import classification_scores
from honelm.models import LoadedModel, check_block_fits, load_model
from honelm.prompting import (PromptOptions, Prompted, Prompter, ScoringConfig, check_source, pick_shots,
                              source_record, verbalizer_scores)
from honelm.stages.classify import Classification
from honelm.stages.contract import Inference, ModelSpec, Plan, RunContext
from honelm.stages.resolve import init_kind
from honelm.tokenizer import load_tokenizer

SOURCE_FILE = "prompted.json"


@dataclass
class PromptConfig(StageConfig):
    """Classify with a prompted causal LM: each label's verbalizer scored after the prompt; nothing trains."""

    verb = "prompt"

    run: RunConfig = section(RunConfig)
    data: LabelledDataConfig = section(LabelledDataConfig)
    model: ModelConfig = section(ModelConfig)
    prompt: PromptOptions = section(PromptOptions)
    train: ScoringConfig = section(ScoringConfig)

    def validate(self) -> None:
        super().validate()
        if self.data.task != "classification":
            raise ConfigError(f"data.task={self.data.task}: prompt scores one verbalizer per label, so it classifies "
                              "only (use classify for regression)")
        if self.prompt.shots < 0 or self.train.eval_batch_size < 1:
            raise ConfigError("prompt.shots must be >= 0 and train.eval_batch_size >= 1")


class PromptStage(Classification):
    """Classification's splits, labels and prediction files; a causal LM's verbalizer scores as the logits."""

    name = "prompt"
    config = PromptConfig
    trains = False
    report_sections = ()  # classify's predictions section reads this run's files already

    def check(self, cfg: PromptConfig) -> None:
        if not cfg.model.init_from:
            raise ConfigError("model.init_from: prompt needs the causal LM to prompt (a directory, a honelm run, "
                              "pkg:MODULE or a hub id)")
        kind = init_kind(cfg.model)
        if kind != "decoder":
            raise ConfigError(f"model.init_from={cfg.model.init_from} is an {kind}: prompt needs a causal LM (decoder)")

    def prepare(self, ctx: RunContext) -> None:
        super().prepare(ctx)  # labels.json
        if ctx.cfg.prompt.chat:
            ensure_template(ctx.tokenizer, ctx.say)
        self.prompter(ctx)  # verbalizers, template and shots checked before a (large) model loads

    def model_spec(self, ctx: RunContext) -> ModelSpec:
        return ModelSpec("lm")

    def before_boosters(self, ctx: RunContext, loaded: LoadedModel) -> None:
        spec = ctx.cfg.model.init_from
        ctx.write_json(SOURCE_FILE, source_record(spec, resolve_model_dir(spec)))

    def plan(self, ctx: RunContext, loaded: LoadedModel) -> Plan:
        cfg = ctx.cfg
        val = self.encode(ctx, ctx.splits.val, "val") if ctx.splits.val else None
        if val is not None:
            check_block_fits(loaded.model, max(map(len, val.sequences)),
                             "prompt + verbalizer tokens (data.max_length, prompt.shots)")
            ctx.say(f"prompt: {cfg.prompt.shots} shot(s) per label, verbalizers {', '.join(self.prompter(ctx).words)}; "
                    f"{len(val)} validation examples x {val.n_labels} labels scored")
            if val.truncated:
                ctx.say(f"note: {val.truncated} validation texts are longer than data.max_length="
                        f"{cfg.data.max_length} tokens and were cut")

        def save_best(model: torch.nn.Module, info: dict[str, Any]) -> None:
            with atomic_directory(ctx.run_dir / "best") as tmp:  # no model: prompted.json says where it is
                ctx.tokenizer.save_pretrained(tmp)
                (tmp / "best.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
                if val is not None and info.get("metric") is not None:
                    text = self.predictions(ctx, ctx.extra["val_logits"], ctx.splits.val, val)
                    (tmp / P.VAL_FILE).write_text(text, encoding="utf-8")

        return Plan(None, None, (lambda m: self.score(ctx, m, val, "val")) if val is not None else None,
                    metric=cfg.train.metric or "val_accuracy", save_best=save_best)

    def prompter(self, ctx: RunContext) -> Prompter:
        """The run's prompter (its shots drawn from the train split by run.seed), built once per context."""
        if "prompter" not in ctx.extra:
            cfg, (label2id, id2label) = ctx.cfg, self.labels(ctx)
            shots = pick_shots(ctx.splits.train, cfg.prompt.shots, cfg.run.seed, label2id)
            ctx.extra["prompter"] = Prompter(ctx.tokenizer, cfg.prompt, label2id, id2label, shots,
                                             cfg.data.max_length, bool(cfg.data.pair_field))
        return ctx.extra["prompter"]

    def encode(self, ctx: RunContext, rows: list[Any], split: str) -> Prompted:
        return self.prompter(ctx).encode(rows)

    def score(self, ctx: RunContext, model: torch.nn.Module, data: Prompted, split: str) -> dict[str, float]:
        logits = verbalizer_scores(model, data, ctx.cfg.train.eval_batch_size, ctx.device,
                                   mean=ctx.cfg.prompt.normalize == "mean")
        ctx.extra[f"{split}_logits"] = logits  # the per-example predictions files are written from these
        return classification_scores(logits, data.labels, False, data.n_labels, split)

    def inference(self, ctx: RunContext, model: torch.nn.Module, rows: list[Any]) -> Inference:
        """What `honelm compare` times: each row's prompt with every label's verbalizer, scored in one forward."""
        mean = ctx.cfg.prompt.normalize == "mean"
        return Inference(lambda idx: self.encode(ctx, [rows[i] for i in idx], "val"),
                         lambda data: verbalizer_scores(model, data, len(data.sequences), ctx.device, mean=mean))

    def test_tokenizer(self, ctx: RunContext) -> Any:
        return load_tokenizer(ctx.run_dir / "best")

    def load_best(self, ctx: RunContext) -> torch.nn.Module:
        """The recorded model (RUN/prompted.json), refused when it is gone or changed."""
        record = json.loads((ctx.run_dir / SOURCE_FILE).read_text(encoding="utf-8"))
        return load_model(check_source(record, ctx.run_dir), "lm", trust_remote_code=ctx.cfg.model.trust_remote_code)
