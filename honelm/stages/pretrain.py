"""`honelm pretrain`: causal language modelling from random init (or any checkpoint) on packed text.

Validation reports loss, perplexity and bits-per-byte; bits-per-byte divides the summed
cross-entropy by the UTF-8 bytes of the text, so models with different tokenizers compare. Each
validation block's score record (its targets and summed loss) goes to best/val_predictions.jsonl.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from honelm.boosters import StageConfig
from honelm.boosters.adversarial import AdversarialConfig
from honelm.boosters.lora import LoraConfig
from honelm.config import ModelConfig, RunConfig, TrainConfig, section
from honelm.data.large_corpus import CorpusPart, corpus_splits
from honelm.data.packing import PackedBlocks, pack
from honelm.data.sections import TextDataConfig
from honelm.data.token_file import MemmapBlocks
from honelm.models import check_block_fits
from honelm.objectives.lm import CausalLM
from honelm.objectives.lm_scores import lm_scores, loss_sums
from honelm.stages.contract import Plan, RunContext, Stage


@dataclass
class PretrainConfig(StageConfig):
    """Causal LM pre-training."""

    verb = "pretrain"

    run: RunConfig = section(RunConfig)
    data: TextDataConfig = section(TextDataConfig)
    model: ModelConfig = section(ModelConfig)
    train: TrainConfig = section(TrainConfig)
    lora: LoraConfig = section(LoraConfig)
    adversarial: AdversarialConfig = section(AdversarialConfig)


class Pretrain(Stage):
    """Causal LM on packed blocks; validation and test: loss, perplexity and bits-per-byte."""

    name = "pretrain"
    config = PretrainConfig
    record_metrics = ("loss",)

    def splits(self, cfg: PretrainConfig, say: Callable[[str], None], leak_texts: list[str] | None = None) -> Any:
        return corpus_splits(cfg.data, say, leak_texts)

    def plan(self, ctx: RunContext, loaded: Any) -> Plan:
        cfg = ctx.cfg
        check_block_fits(loaded.model, cfg.data.block_size, "data.block_size")
        train_blocks = self.encode(ctx, ctx.splits.train, "train")
        evaluate = self.validation(ctx, ctx.splits.val, "blocks")
        ctx.say(f"data: {len(ctx.splits.train)} train documents → {len(train_blocks)} blocks of {cfg.data.block_size}; "
                f"{len(ctx.splits.val)} validation documents → {evaluate.items if evaluate else 0} blocks")
        return Plan(CausalLM(), ctx.stream(train_blocks), evaluate, metric=cfg.train.metric or "val_loss")

    def encode(self, ctx: RunContext, rows: list[Any] | CorpusPart, split: str) -> PackedBlocks | MemmapBlocks:
        """Packed blocks in memory, or served from the split's token file for a large corpus (data.memmap)."""
        if isinstance(rows, CorpusPart):
            return rows.blocks(ctx.tokenizer, ctx.cfg.data.block_size)
        return pack(ctx.tokenizer, [d.text for d in rows], ctx.cfg.data.block_size)

    def score(self, ctx: RunContext, model: torch.nn.Module, data: PackedBlocks | MemmapBlocks, split: str) -> dict[str, float]:
        """Loss (nats/token), perplexity and bits-per-byte over every target token of the blocks."""
        sums = loss_sums(model, data, ctx.cfg.train.eval_batch_size, 0, ctx.device, ctx.records(split))  # no masks
        return lm_scores({split: sums}, {split: data}, split)
