"""`honelm sft`: instruction tuning, the causal-LM loss on the assistant's tokens of conversations.

Rows in any of the formats of `honelm.data.chat` (alpaca, prompt_completion, messages, sharegpt;
detected per row) are rendered by the tokenizer's chat template (the checkpoint's own; a
tokenizer without one gets honelm's default, which is saved with best/). Labels are -100 except
on the tokens `data.train_on` selects (by default every assistant turn, its end-of-turn EOS
included). Rows are packed several to a row by default (`honelm.data.sft`), with position_ids
restarting per example and no attention across examples. Validation reports loss and
perplexity per trained token (each example's score record, its trained tokens and summed loss, goes
to best/val_predictions.jsonl: what `honelm ablate` compares); at the end the best model answers a
few validation prompts (samples.jsonl, the log) and those answers are scored against the
references (exact match, token F1, chrF, BLEU; `honelm.data.answers`). `honelm test` reports the
same on the test split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from honelm.boosters import StageConfig
from honelm.boosters.adversarial import AdversarialConfig
from honelm.boosters.lora import LoraConfig
from honelm.config import ModelConfig, RunConfig, TrainConfig, section
from honelm.data import answers as A
from honelm.data.chat import ensure_template
from honelm.data.sections import ChatDataConfig, chat_splits, encode_chat_split
from honelm.data.sft import SFTExamples, check_packing, pack_examples, template_texts
from honelm.errors import ConfigError, HonelmError
from honelm.models import check_block_fits
from honelm.objectives.base import Objective
from honelm.objectives.lm import CausalLM
from honelm.objectives.lm_scores import example_scores
from honelm.stages.contract import Plan, RunContext, Stage


def _sft_train_defaults() -> TrainConfig:
    # Alpaca's recipe (METHODS.md §5.1: cosine, warmup 0.03, no weight decay) with a learning rate
    # for small models; AdamW betas as in HF/TRL.
    return TrainConfig(lr=1e-4, weight_decay=0.0, adam_beta2=0.999, warmup_ratio=0.03, schedule="cosine",
                       min_lr_ratio=0.0, epochs=3.0, batch_size=8, eval_every=100)


@dataclass
class SFTConfig(StageConfig):
    """Supervised fine-tuning on conversations (instruction tuning)."""

    verb = "sft"

    run: RunConfig = section(RunConfig)
    data: ChatDataConfig = section(ChatDataConfig)
    model: ModelConfig = section(ModelConfig)
    train: TrainConfig = section(_sft_train_defaults)  # type: ignore[arg-type]
    samples: A.SamplesConfig = section(A.SamplesConfig)
    lora: LoraConfig = section(LoraConfig)
    adversarial: AdversarialConfig = section(AdversarialConfig)

    def validate(self) -> None:
        super().validate()
        if self.data.max_length < 2:
            raise ConfigError("data.max_length must be at least 2")
        if self.model.arch != "decoder":
            raise ConfigError("sft trains a causal LM: model.arch must be decoder")


class SFT(Stage):
    """Causal LM on the trained tokens of conversations; validation and test: loss and perplexity (+ answers)."""

    name = "sft"
    config = SFTConfig
    record_metrics = ("loss",)

    def splits(self, cfg: SFTConfig, say: Callable[[str], None], leak_texts: list[str] | None = None) -> Any:
        return chat_splits(cfg.data, say, leak_texts)

    def tokenizer_texts(self, ctx: RunContext) -> list[str]:
        return template_texts([d.conversation for d in ctx.splits.train])

    def prepare(self, ctx: RunContext) -> None:
        if not ensure_template(ctx.tokenizer, ctx.say):
            ctx.say("chat template: the tokenizer's own")

    def plan(self, ctx: RunContext, loaded: Any) -> Plan:
        cfg = ctx.cfg
        check_block_fits(loaded.model, cfg.data.max_length, "data.max_length")
        train = self.training_examples(ctx)
        val = self.encode(ctx, ctx.splits.val, "val") if ctx.splits.val else None
        ctx.say(train.describe("train") + f" (loss on: {cfg.data.train_on})")
        if val is not None:
            ctx.say(val.describe("validation"))
        if not len(train):
            raise HonelmError("no training example is left: every reply starts after data.max_length")
        items: Any = train
        if cfg.data.packing:
            check_packing(loaded.model, train)
            items = pack_examples(train, cfg.data.max_length)
            ctx.say(f"packing: {len(train)} examples → {len(items)} rows of up to {cfg.data.max_length} tokens, "
                    f"{items.fill:.0%} full (best-fit decreasing; position_ids restart per example; checked: no "
                    "attention across examples)")
        evaluate = self.validation(ctx, ctx.splits.val, "examples", val) if val is not None and len(val) else None
        items, objective = self.training_items(ctx, train, items)
        return Plan(objective, ctx.stream(items, lengths=items.lengths), evaluate, metric=cfg.train.metric or "val_loss")

    def training_examples(self, ctx: RunContext) -> SFTExamples:
        """The encoded conversations that train (here: the train split's)."""
        return self.encode(ctx, ctx.splits.train, "train")

    def training_items(self, ctx: RunContext, examples: SFTExamples, items: Any) -> tuple[Any, Objective]:
        """What the stream draws from (`items`: `examples`, packed when data.packing) and the objective."""
        return items, CausalLM()

    def finish(self, ctx: RunContext, plan: Plan, result: Any) -> dict[str, Any]:
        if result.reason == "interrupted" or not ctx.splits.val or ctx.cfg.samples.n <= 0:
            return {}
        assert ctx.tracker is not None
        return A.write_samples(ctx.run_dir, ctx.cfg.samples, ctx.splits.val, ctx.runtime, ctx.tracker, result.steps)

    def encode(self, ctx: RunContext, rows: list[Any], split: str) -> SFTExamples:
        return encode_chat_split(ctx.tokenizer, rows, ctx.cfg.data)

    def score(self, ctx: RunContext, model: torch.nn.Module, data: SFTExamples, split: str) -> dict[str, float]:
        return example_scores(model, data, ctx.cfg.train.eval_batch_size, ctx.device, split, ctx.records(split))

    def test(self, ctx: RunContext, rows: list[Any]) -> dict[str, Any]:
        """Loss and perplexity on every test example; reference metrics of best/'s answers (test_predictions.json)."""
        cfg = ctx.cfg
        model = self.load_best(ctx).to(ctx.device).eval()  # best/'s tokenizer carries the template training used
        examples = self.encode(ctx, rows, "test")
        asked = rows[: cfg.samples.test_limit] if cfg.samples.test_limit else rows
        with torch.no_grad():
            out: dict[str, Any] = self.score(ctx, model, examples, "test") if len(examples) else {}
            records, cut = A.answer(model, ctx.tokenizer, asked, cfg.samples)
        out.update(A.scores(records, "test"))
        out.update(n_examples=len(rows), n_scored_for_loss=len(examples), n_dropped=len(examples.dropped),
                   n_truncated=examples.truncated, n_answered=len(records), prompts_cut=cut,
                   files={"test_predictions.json": A.predictions_json(records)})
        return out
