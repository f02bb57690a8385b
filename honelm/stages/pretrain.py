"""`honelm pretrain`: causal language modelling from random init (or any checkpoint) on packed text.

Validation reports loss, perplexity and bits-per-byte; bits-per-byte divides the summed
cross-entropy by the UTF-8 bytes of the text, so models with different tokenizers compare.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from honelm import boosters
from honelm import runtime as rt
from honelm.boosters.adversarial import AdversarialConfig
from honelm.boosters.lora import LoraConfig
from honelm.checkpoint import best_writes_base, save_pretrained_atomic
from honelm.config import ModelConfig, RunConfig, TrainConfig, section
from honelm.errors import ConfigError
from honelm.data.packing import PackedBlocks, bits_per_byte, pack
from honelm.loop import BatchStream, Callback, TrainPlan, fit
from honelm.objectives.lm import CausalLM
from honelm.stages import setup as S


@dataclass
class TextDataConfig(S.SplitDataConfig):
    """Text corpus for language modelling, its documents, and the block length."""

    unit: Literal["lines", "paragraphs", "files"] = "lines"
    """How plain-text files become documents: one per non-empty line, per blank-line-separated paragraph, or per file."""
    text_field: str = "text"
    """Field holding the text in JSONL/JSON/CSV/TSV/Parquet files."""
    block_size: int = 256
    """Tokens per training block (documents are packed, separated by EOS)."""


@dataclass
class PretrainConfig:
    """Causal LM pre-training."""

    run: RunConfig = section(RunConfig)
    data: TextDataConfig = section(TextDataConfig)
    model: ModelConfig = section(ModelConfig)
    train: TrainConfig = section(TrainConfig)
    lora: LoraConfig = section(LoraConfig)
    adversarial: AdversarialConfig = section(AdversarialConfig)

    def validate(self) -> None:
        if self.adversarial.method == "plae":
            raise ConfigError("adversarial.method=plae works with classify only: it retrains on labelled adversarial "
                              "embeddings (for language modelling use fgm, pgd, freelb, smart, r3f, vat or neftune)")


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


def run(cfg: PretrainConfig, resume: str | None = None, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    runtime = rt.setup(cfg.train.threads)
    rt.seed_everything(cfg.run.seed)
    run_dir = S.run_directory("pretrain", cfg, runtime, resume)
    tracker = S.tracker_for(run_dir, runtime, cfg)
    splits = S.text_splits(cfg.data, tracker.say)
    S.write_json(run_dir / "split_manifest.json", splits.manifest, runtime)
    tokenizer = S.resolve_tokenizer(cfg.model, run_dir,
                                    lambda: [d.text for d in splits.train], "bpe", tracker.say, runtime, resume is not None)
    model = S.resolve_model(cfg.model, "lm", tokenizer, cfg.run.seed, tracker.say,
                            carry=boosters.carries_adapter(cfg, "pretrain"))
    model = boosters.apply(model, cfg, "lm", tracker.say)
    S.check_block_fits(model, cfg.data.block_size, "data.block_size")
    train_blocks = pack(tokenizer, [d.text for d in splits.train], cfg.data.block_size)
    val_blocks = pack(tokenizer, [d.text for d in splits.val], cfg.data.block_size) if splits.val else None
    tracker.say(f"data: {len(splits.train)} train documents → {len(train_blocks)} blocks of {cfg.data.block_size}; "
                f"{len(splits.val)} validation documents → {len(val_blocks) if val_blocks else 0} blocks")
    stream = BatchStream(len(train_blocks), train_blocks.collate, cfg.train.batch_size, cfg.train.grad_accum,
                         cfg.run.seed, runtime.world_size, runtime.rank)
    evaluate = (lambda m: lm_metrics(m, val_blocks, cfg.train.eval_batch_size, runtime.device)) if val_blocks else None
    objective = boosters.objective(CausalLM(), cfg, tokenizer, tracker.say)
    plan = TrainPlan(objective, stream, evaluate,
                     lambda m, info: save_pretrained_atomic(m, tokenizer, run_dir / "best", info),
                     cfg.train.metric or "val_loss",
                     best_writes_base=functools.partial(best_writes_base, model, run_dir))
    result = fit(model, plan, cfg.train, runtime, run_dir, tracker=tracker, resume=resume is not None,
                 callbacks=callbacks)
    tracker.close()
    return {"run_dir": str(run_dir), "steps": result.steps, "reason": result.reason, "best_step": result.best_step,
            "stop_requested": result.stop_requested, **result.last_eval}


def evaluate_test(run_dir: Path, cfg: PretrainConfig, test_docs: list[Any]) -> dict[str, float]:
    """Test metrics of the run's best model (called only by honelm.protocol.test)."""
    from honelm.models import load_model
    from honelm.tokenizer import load_tokenizer

    device = rt.setup().device
    tokenizer = load_tokenizer(run_dir / "best")
    model = load_model(run_dir / "best", "lm").to(device).eval()
    blocks = pack(tokenizer, [d.text for d in test_docs], cfg.data.block_size)
    with torch.no_grad():
        return lm_metrics(model, blocks, cfg.train.eval_batch_size, device, prefix="test")
