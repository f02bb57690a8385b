"""What `honelm reward` and `honelm dpo` share: the data section, data preparation, dropout, the reference's origin.

Both verbs train on preference pairs rendered through the tokenizer's chat template (a tokenizer
without one gets honelm's default, `honelm.data.chat.ensure_template`), split by prompt
(`honelm.data.preferences.split_pairs`), and batch each pair as two rows [chosen; rejected].
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch import nn

from honelm.data.preferences import EncodedPairs, PairRow, describe_encoding, encode_pairs, split_pairs
from honelm.stages import setup as S


@dataclass
class PreferenceDataConfig(S.SplitDataConfig):
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


def prepare(cfg: Any, run_dir: Path, runtime: Any, tracker: Any, resume: bool) -> tuple[Any, Any]:
    """Splits (manifest written) and the tokenizer, with a chat template."""
    from honelm.data.chat import ensure_template

    splits = split_pairs(cfg.data, tracker.say)
    S.write_json(run_dir / "split_manifest.json", splits.manifest, runtime)
    tokenizer = S.resolve_tokenizer(cfg.model, run_dir, lambda: pair_texts(splits.train), "bpe", tracker.say,
                                    runtime, resume)
    ensure_template(tokenizer, tracker.say)
    return splits, tokenizer
