"""What `honelm reward` and `honelm dpo` share: the stage base class and dropout off.

`honelm dpo` with KTO (`dpo.loss=kto`, `PreferenceStage.unpaired`) reads, splits and encodes unpaired
examples (`honelm.data.unpaired`) instead of pairs, batched the same way (two rows per unit).

Both verbs train on preference pairs rendered through the tokenizer's chat template (a tokenizer
without one gets honelm's default, `honelm.data.chat.ensure_template`), split by prompt
(`honelm.data.preferences.split_pairs`), and batch each pair as two rows [chosen; rejected].
`PreferenceStage` holds that common part of their `Stage`s, and turns dropout off for both
(`dropout_off`). Where a frozen reference comes from (dpo): `honelm.stages.reference`.

Their configs derive from `PairsConfig`, which offers the boosters `PAIRS` (adversarial training
perturbs chosen and rejected alike). `honelm test` scores best/ on the test pairs with the stage's
own `score` (after `test_setup`: dpo's reference); every pair's score record (both rewards, the
loss and the pair metrics) goes to test_predictions.jsonl, as the validation ones went to
best/val_predictions.jsonl.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch
from torch import nn

from honelm.boosters import StageConfig
from honelm.boosters.base import PAIRS
from honelm.data.chat import ensure_template
from honelm.data.preferences import EncodedPairs, PairRow, describe_encoding, encode_pairs, split_pairs
from honelm.data.sections import PreferenceDataConfig
from honelm.data.unpaired import EncodedExamples, ExampleRow, encode_examples, split_examples
from honelm.errors import HonelmError
from honelm.loop import BatchStream
from honelm.models import check_block_fits
from honelm.stages.contract import RunContext, Stage

SPLIT_NAMES = {"val": "validation"}
"""How a split is named in the log's truncation notes."""


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


def pair_texts(rows: list[PairRow] | list[ExampleRow]) -> list[str]:
    """Prompt and reply texts (of pairs, or of KTO's examples), to train a tokenizer on the fly (from scratch)."""
    out: list[str] = []
    for r in rows:
        if isinstance(r, ExampleRow):
            assert r.example is not None
            out += [m["content"] for m in r.example.prompt] + [r.example.completion]
            continue
        assert r.pair is not None
        out += [m["content"] for m in r.pair.prompt] + [r.pair.chosen, r.pair.rejected]
    return out


def encode_split(tokenizer: Any, rows: list[Any], data: PreferenceDataConfig, name: str,
                 say: Callable[[str], None], unpaired: bool = False) -> EncodedPairs | EncodedExamples:
    """Encode one split's pairs (or, `unpaired`, KTO's examples) and log what truncation cut or dropped."""
    encode = encode_examples if unpaired else encode_pairs
    enc = encode(tokenizer, rows, data.max_length, data.drop_truncated, data.trim_turns)
    note = describe_encoding(enc, name, data.max_length, data.drop_truncated)
    if note:
        say(f"note: {note}")
    return enc


class PairsConfig(StageConfig):
    """Base of a preference stage's config: it offers the boosters `PAIRS` (a pairwise loss on chosen and rejected)."""

    capabilities: ClassVar[frozenset[str]] = frozenset({PAIRS})


class PreferenceStage(Stage):
    """Pairs split by prompt, a chat template, [chosen; rejected] batches grouped by length."""

    def splits(self, cfg: Any, say: Callable[[str], None], leak_texts: list[str] | None = None) -> Any:
        return (split_examples if self.unpaired(cfg) else split_pairs)(cfg.data, say, leak_texts)

    def unpaired(self, cfg: Any) -> bool:
        """Whether the stage trains on unpaired examples judged desirable or not (dpo with KTO) instead of pairs."""
        return False

    def tokenizer_texts(self, ctx: RunContext) -> list[str]:
        return pair_texts(ctx.splits.train)

    def prepare(self, ctx: RunContext) -> None:
        ensure_template(ctx.tokenizer, ctx.say)

    def encode(self, ctx: RunContext, rows: list[Any], split: str) -> EncodedPairs:
        # `honelm test` has no tracker: its truncation note goes to the terminal
        say = ctx.say if ctx.tracker is not None else print
        return encode_split(ctx.tokenizer, rows, ctx.cfg.data, SPLIT_NAMES.get(split, split), say,
                            self.unpaired(ctx.cfg))

    def encode_training(self, ctx: RunContext, model: nn.Module) -> tuple[EncodedPairs, EncodedPairs | None]:
        """Train and validation pairs (validation None without a validation split), after the length check."""
        check_block_fits(model, ctx.cfg.data.max_length, "data.max_length")
        train = self.encode(ctx, ctx.splits.train, "train")
        val = self.encode(ctx, ctx.splits.val, "val") if ctx.splits.val else None
        if not len(train):
            raise HonelmError(f"no training {train.unit[:-1]} is left after truncation: raise data.max_length")
        return train, val

    def test(self, ctx: RunContext, rows: list[Any]) -> dict[str, Any]:
        """Test metrics of best/ on the test pairs (the stage's `score`, after `test_setup`) and the pair counts."""
        model = self.load_best(ctx).to(ctx.device).eval()
        self.test_setup(ctx)
        data = self.encode_test(ctx, rows)
        with torch.no_grad():
            out: dict[str, Any] = self.score(ctx, model, data, "test")
        return {**out, f"n_{data.unit}": len(data), "n_dropped": len(data.dropped)}

    def test_setup(self, ctx: RunContext) -> None:
        """What `score` needs for the test beyond best/ (dpo: the run's reference)."""

    def encode_test(self, ctx: RunContext, rows: list[Any]) -> EncodedPairs | EncodedExamples:
        data = self.encode(ctx, rows, "test")
        if not len(data):
            raise HonelmError(f"{ctx.run_dir}: no test {data.unit[:-1]} is left after truncation at "
                              f"data.max_length={ctx.cfg.data.max_length}")
        return data

    @staticmethod
    def dropout_off(ctx: RunContext, model: nn.Module, section: str) -> None:
        """Every dropout of `model` off when `<section>.disable_dropout` (the default), said in the log."""
        if getattr(ctx.cfg, section).disable_dropout:
            n = disable_dropout(model)
            if n:
                ctx.say(f"dropout: turned off in {n} places ({section}.disable_dropout=true)")

    @staticmethod
    def data_line(train: EncodedPairs | EncodedExamples, val: EncodedPairs | EncodedExamples | None) -> str:
        kinds = " ({} desirable, {} undesirable)".format(*train.counts) if isinstance(train, EncodedExamples) else ""
        return f"data: {len(train)} train {train.unit}{kinds}, {len(val) if val else 0} validation {train.unit}"

    @staticmethod
    def stream(ctx: RunContext, train: EncodedPairs | EncodedExamples) -> BatchStream:
        """Batches of train pairs (or KTO's examples) grouped by length (each is two padded rows)."""
        cfg = ctx.cfg
        return BatchStream(len(train), train.collate, cfg.train.batch_size, cfg.train.grad_accum, cfg.run.seed,
                           ctx.runtime.world_size, ctx.runtime.rank, lengths=train.lengths)
