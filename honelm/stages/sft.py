"""`honelm sft`: instruction tuning, the causal-LM loss on the assistant's tokens of conversations.

Rows in any of the formats of `honelm.data.chat` (alpaca, prompt_completion, messages, sharegpt;
detected per row) are rendered by the tokenizer's chat template (the checkpoint's own; a
tokenizer without one gets honelm's default, which is saved with best/). Labels are -100 except
on the tokens `data.train_on` selects (by default every assistant turn, its end-of-turn EOS
included). Rows are packed several to a row by default (`honelm.data.sft`), with position_ids
restarting per example and no attention across examples. Validation reports loss and
perplexity per trained token; at the end the best model answers a few validation prompts
(samples.jsonl, the log) and those answers are scored against the references (exact match,
token F1, chrF, BLEU; `honelm.data.answers`). `honelm test` reports the same on the test split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import torch

from honelm.boosters import StageConfig
from honelm.boosters.adversarial import AdversarialConfig
from honelm.boosters.lora import LoraConfig
from honelm.config import ModelConfig, RunConfig, TrainConfig, section
from honelm.data import answers as A
from honelm.data.chat import ensure_template
from honelm.data.sft import (ChatDocument, SFTExamples, check_packing, encode_conversations, pack_examples,
                             split_conversations, template_texts)
from honelm.data.sources import SplitDataConfig, say_split
from honelm.errors import ConfigError, HonelmError
from honelm.loop import BatchStream
from honelm.models import check_block_fits
from honelm.objectives.lm import CausalLM
from honelm.stages.contract import Plan, RunContext, Stage


@dataclass
class ChatDataConfig(SplitDataConfig):
    """Conversations for instruction tuning: their format, length, which tokens train, packing."""

    format: Literal["auto", "alpaca", "prompt_completion", "messages", "sharegpt"] = "auto"
    """Row format; auto detects it per row: alpaca (instruction, input?, output), prompt_completion (prompt, completion), messages ([{role, content}]) or sharegpt (conversations: [{from, value}])."""
    max_length: int = 512
    """Longest example in tokens (and the length of a packed row); longer ones keep their start and are counted; one whose every reply starts after it is dropped and counted (file:line in the log)."""
    train_on: Literal["assistant", "last", "all"] = "assistant"
    """Tokens that carry the loss: every assistant turn with its end-of-turn EOS (assistant), only the final assistant turn (last), or every token (all)."""
    packing: bool = True
    """Pack several examples per row (best-fit decreasing; position_ids restart per example, no attention across examples); false = one right-padded example per row, batches grouped by length."""


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


def chat_splits(data: ChatDataConfig, say: Callable[[str], None], leak_texts: list[str] | None = None) -> Any:
    """Conversations split by content and seed (`honelm.data.sft.split_conversations`), the split said."""
    splits = split_conversations(data, leak_texts)
    say_split(splits.manifest, say)
    return splits


def encode_split(tokenizer: Any, docs: Sequence[ChatDocument], data: ChatDataConfig) -> SFTExamples:
    return encode_conversations(tokenizer, [d.conversation for d in docs], data.max_length, data.train_on,
                                where=[(d.source, d.line) for d in docs])


def lm_scores(model: torch.nn.Module, examples: SFTExamples, batch_size: int, device: torch.device,
              prefix: str) -> dict[str, float]:
    """Loss (nats per trained token) and perplexity over every example, in length-sorted padded batches."""
    objective = CausalLM()
    lengths = examples.lengths
    order = sorted(range(len(examples)), key=lambda i: lengths[i])
    nll, count = 0.0, 0
    for start in range(0, len(order), batch_size):
        batch = {k: v.to(device) for k, v in examples.collate(order[start:start + batch_size]).items()}
        loss = objective(model, batch)
        nll += float(loss.value)
        count += int(loss.units)
    mean = nll / max(count, 1)
    return {f"{prefix}_loss": mean, f"{prefix}_ppl": math.exp(min(mean, 50.0))}


class SFT(Stage):
    """Causal LM on the trained tokens of conversations; validation and test: loss and perplexity (+ answers)."""

    name = "sft"
    config = SFTConfig

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
        train = self.encode(ctx, ctx.splits.train, "train")
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
        stream = BatchStream(len(items), items.collate, cfg.train.batch_size, cfg.train.grad_accum, cfg.run.seed,
                             ctx.runtime.world_size, ctx.runtime.rank, lengths=items.lengths)
        evaluate = (lambda m: self.score(ctx, m, val, "val")) if val is not None and len(val) else None
        return Plan(CausalLM(), stream, evaluate, metric=cfg.train.metric or "val_loss")

    def finish(self, ctx: RunContext, plan: Plan, result: Any) -> dict[str, Any]:
        if result.reason == "interrupted" or not ctx.splits.val or ctx.cfg.samples.n <= 0:
            return {}
        assert ctx.tracker is not None
        return A.write_samples(ctx.run_dir, ctx.cfg.samples, ctx.splits.val, ctx.runtime, ctx.tracker, result.steps)

    def encode(self, ctx: RunContext, rows: list[Any], split: str) -> SFTExamples:
        return encode_split(ctx.tokenizer, rows, ctx.cfg.data)

    def score(self, ctx: RunContext, model: torch.nn.Module, data: SFTExamples, split: str) -> dict[str, float]:
        return lm_scores(model, data, ctx.cfg.train.eval_batch_size, ctx.device, split)

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
