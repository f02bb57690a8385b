"""`honelm pretrain`: causal language modelling from random init (or any checkpoint) on packed text.

Validation reports loss, perplexity and bits-per-byte; bits-per-byte divides the summed
cross-entropy by the UTF-8 bytes of the text, so models with different tokenizers compare.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

from honelm.boosters import StageConfig
from honelm.boosters.adversarial import AdversarialConfig
from honelm.boosters.lora import LoraConfig
from honelm.config import ModelConfig, RunConfig, TrainConfig, section
from honelm.data.packing import PackedBlocks, bits_per_byte, pack
from honelm.data.sources import SplitDataConfig, text_splits
from honelm.loop import BatchStream
from honelm.models import check_block_fits
from honelm.objectives.lm import CausalLM
from honelm.stages.contract import Plan, RunContext, Stage


@dataclass
class TextDataConfig(SplitDataConfig):
    """Text corpus for language modelling, its documents, and the block length."""

    unit: Literal["lines", "paragraphs", "files"] = "lines"
    """How plain-text files become documents: one per non-empty line, per blank-line-separated paragraph, or per file."""
    text_field: str = "text"
    """Field holding the text in JSONL/JSON/CSV/TSV/Parquet files."""
    block_size: int = 256
    """Tokens per training block (documents are packed, separated by EOS)."""


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


def lm_metrics(model: torch.nn.Module, blocks: PackedBlocks, batch_size: int, device: torch.device,
               prefix: str = "val") -> dict[str, float]:
    """Loss (nats/token), perplexity and bits-per-byte over every target token of `blocks`."""
    objective = CausalLM()
    nll, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        batch = blocks.collate(list(range(start, min(start + batch_size, len(blocks)))))
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = objective(model, batch)
        nll += float(loss.value)
        count += int(loss.units)
    mean = nll / max(count, 1)
    return {f"{prefix}_loss": mean, f"{prefix}_ppl": math.exp(min(mean, 50.0)),
            f"{prefix}_bpb": bits_per_byte(nll, blocks.n_bytes)}


class Pretrain(Stage):
    """Causal LM on packed blocks; validation and test: loss, perplexity and bits-per-byte."""

    name = "pretrain"
    config = PretrainConfig

    def splits(self, cfg: PretrainConfig, say: Callable[[str], None], leak_texts: list[str] | None = None) -> Any:
        return text_splits(cfg.data, say, leak_texts)

    def plan(self, ctx: RunContext, loaded: Any) -> Plan:
        cfg, tokenizer = ctx.cfg, ctx.tokenizer
        check_block_fits(loaded.model, cfg.data.block_size, "data.block_size")
        train_blocks = pack(tokenizer, [d.text for d in ctx.splits.train], cfg.data.block_size)
        val_blocks = self.encode(ctx, ctx.splits.val, "val") if ctx.splits.val else None
        ctx.say(f"data: {len(ctx.splits.train)} train documents → {len(train_blocks)} blocks of {cfg.data.block_size}; "
                f"{len(ctx.splits.val)} validation documents → {len(val_blocks) if val_blocks else 0} blocks")
        stream = BatchStream(len(train_blocks), train_blocks.collate, cfg.train.batch_size, cfg.train.grad_accum,
                             cfg.run.seed, ctx.runtime.world_size, ctx.runtime.rank)
        evaluate = (lambda m: self.score(ctx, m, val_blocks, "val")) if val_blocks else None
        return Plan(CausalLM(), stream, evaluate, metric=cfg.train.metric or "val_loss")

    def encode(self, ctx: RunContext, rows: list[Any], split: str) -> PackedBlocks:
        return pack(ctx.tokenizer, [d.text for d in rows], ctx.cfg.data.block_size)

    def score(self, ctx: RunContext, model: torch.nn.Module, data: PackedBlocks, split: str) -> dict[str, float]:
        return lm_metrics(model, data, ctx.cfg.train.eval_batch_size, ctx.device, prefix=split)
