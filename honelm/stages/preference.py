"""What `honelm reward` and `honelm dpo` share: the data section, the stage base class, dropout, the reference's origin.

Both verbs train on preference pairs rendered through the tokenizer's chat template (a tokenizer
without one gets honelm's default, `honelm.data.chat.ensure_template`), split by prompt
(`honelm.data.preferences.split_pairs`), and batch each pair as two rows [chosen; rejected].
`PreferenceStage` holds that common part of their `Stage`s. A run trained against a frozen
reference (dpo) records where its weights are in RUN/reference.json, so `honelm test` scores
against the same model (`reference_location`, `load_reference`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch import nn

from honelm.adapters import adapter_info
from honelm.checkpoint import atomic_directory
from honelm.data.chat import ensure_template
from honelm.data.preferences import EncodedPairs, PairRow, describe_encoding, encode_pairs, split_pairs
from honelm.data.sources import SplitDataConfig
from honelm.errors import HonelmError
from honelm.loop import BatchStream
from honelm.models import LoadedModel, check_block_fits, load_model
from honelm.runtime import Runtime
from honelm.stages.contract import RunContext, Stage

SPLIT_NAMES = {"val": "validation"}
"""How a split is named in the log's truncation notes."""
REFERENCE_FILE = "reference.json"
"""RUN/reference.json: where a run's frozen reference model is (`reference_location`)."""


@dataclass
class PreferenceDataConfig(SplitDataConfig):
    """Preference pairs: {prompt, chosen, rejected} (strings or message lists) or ShareGPT {conversations, chosen, rejected} rows; splits group pairs by prompt."""

    max_length: int = 512
    """Longest prompt + reply in tokens (chat template included): the prompt's oldest turns go first (trim_turns), then the end is cut; pairs left with no reply token are dropped. All counted in the log."""
    trim_turns: bool = True
    """When a reply does not fit in max_length, drop the prompt's oldest user/assistant exchanges (the system message and the last user turn stay) until it fits; counted in the log. false = cut the end instead."""
    drop_truncated: bool = False
    """Also drop pairs whose chosen or rejected reply is cut by max_length (a cut reply changes its score); counted in the log."""


def disable_dropout(model: nn.Module) -> int:
    """Set every dropout of `model` to 0 (nn.Dropout modules and attention-dropout rates); returns how many were on.

    A model with dropout scores the same sequence differently on every pass, so chosen and
    rejected (and policy and reference) would be compared through noise (TRL: disable_dropout=True).
    """
    changed = 0
    for module in model.modules():
        if isinstance(module, nn.Dropout) and module.p > 0:
            module.p = 0.0
            changed += 1
        rate = getattr(module, "attention_dropout", None)  # Llama-style attention reads a float, not a module
        if isinstance(rate, float) and rate > 0:
            module.attention_dropout = 0.0
            changed += 1
    return changed


def pair_texts(rows: list[PairRow]) -> list[str]:
    """Prompt and reply texts, to train a tokenizer on the fly (from scratch)."""
    out: list[str] = []
    for r in rows:
        assert r.pair is not None
        out += [m["content"] for m in r.pair.prompt] + [r.pair.chosen, r.pair.rejected]
    return out


def encode_split(tokenizer: Any, rows: list[PairRow], data: PreferenceDataConfig, name: str,
                 say: Callable[[str], None]) -> EncodedPairs:
    """Encode one split's pairs and log what truncation cut or dropped."""
    enc = encode_pairs(tokenizer, rows, data.max_length, data.drop_truncated, data.trim_turns)
    note = describe_encoding(enc, name, data.max_length, data.drop_truncated)
    if note:
        say(f"note: {note}")
    return enc


def reference_location(loaded: LoadedModel, tokenizer: Any, run_dir: Path, lora: bool, runtime: Runtime) -> dict:
    """Where `honelm test` finds the reference weights; writes RUN/reference/ when they exist on no disk."""
    if lora:  # the adapter's base (the init_from checkpoint or RUN/base/), named in best/adapter_config.json
        return {"kind": "adapter_base"}
    if loaded.source:
        return {"kind": "checkpoint", "path": loaded.source}
    target = run_dir / "reference"
    if runtime.is_main and not (target / "config.json").is_file():
        with atomic_directory(target) as tmp:
            loaded.model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    return {"kind": "checkpoint", "path": str(target.resolve())}


def load_reference(run_dir: Path) -> nn.Module:
    """The frozen reference a DPO run trained against, from RUN/reference.json."""
    path = run_dir / REFERENCE_FILE
    if not path.is_file():
        raise HonelmError(f"{run_dir}: no {REFERENCE_FILE} (where the reference model is)")
    info = json.loads(path.read_text(encoding="utf-8"))
    where = (adapter_info(run_dir / "best")["base_model_name_or_path"] if info.get("kind") == "adapter_base"
             else info.get("path"))
    if not where or not Path(where).exists():
        raise HonelmError(f"{run_dir}: the reference model {where} does not exist (moved or deleted?)")
    return load_model(where, "lm")


class PreferenceStage(Stage):
    """Pairs split by prompt, a chat template, [chosen; rejected] batches grouped by length."""

    def splits(self, cfg: Any, say: Callable[[str], None], leak_texts: list[str] | None = None) -> Any:
        return split_pairs(cfg.data, say, leak_texts)

    def tokenizer_texts(self, ctx: RunContext) -> list[str]:
        return pair_texts(ctx.splits.train)

    def prepare(self, ctx: RunContext) -> None:
        ensure_template(ctx.tokenizer, ctx.say)

    def encode(self, ctx: RunContext, rows: list[Any], split: str) -> EncodedPairs:
        # `honelm test` has no tracker: its truncation note goes to the terminal
        say = ctx.say if ctx.tracker is not None else print
        return encode_split(ctx.tokenizer, rows, ctx.cfg.data, SPLIT_NAMES.get(split, split), say)

    def encode_training(self, ctx: RunContext, model: nn.Module) -> tuple[EncodedPairs, EncodedPairs | None]:
        """Train and validation pairs (validation None without a validation split), after the length check."""
        check_block_fits(model, ctx.cfg.data.max_length, "data.max_length")
        train = self.encode(ctx, ctx.splits.train, "train")
        val = self.encode(ctx, ctx.splits.val, "val") if ctx.splits.val else None
        if not len(train):
            raise HonelmError("no training pair is left after truncation: raise data.max_length")
        return train, val

    def encode_test(self, ctx: RunContext, rows: list[Any]) -> EncodedPairs:
        data = self.encode(ctx, rows, "test")
        if not len(data):
            raise HonelmError(f"{ctx.run_dir}: no test pair is left after truncation at "
                              f"data.max_length={ctx.cfg.data.max_length}")
        return data

    @staticmethod
    def data_line(train: EncodedPairs, val: EncodedPairs | None) -> str:
        return f"data: {len(train)} train pairs, {len(val) if val else 0} validation pairs"

    @staticmethod
    def stream(ctx: RunContext, train: EncodedPairs) -> BatchStream:
        """Batches of train pairs grouped by length (each pair is two padded rows)."""
        cfg = ctx.cfg
        return BatchStream(len(train), train.collate, cfg.train.batch_size, cfg.train.grad_accum, cfg.run.seed,
                           ctx.runtime.world_size, ctx.runtime.rank, lengths=train.lengths)
