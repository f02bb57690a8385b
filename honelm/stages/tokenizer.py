"""`honelm tokenizer`: train a byte-level BPE (decoders) or WordPiece (encoders) tokenizer.

The tokenizer is trained on the TRAIN split of the corpus only (the same split settings as the
`pretrain` run that will use it), and saved as a Hugging Face tokenizer directory under
RUN/tokenizer, loadable with `AutoTokenizer.from_pretrained`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal, Sequence

from honelm import runtime as rt
from honelm.config import RunConfig, section
from honelm.loop import Callback
from honelm.stages import setup as S
from honelm.stages.pretrain import TextDataConfig


@dataclass
class TokenizerOptions:
    """What kind of tokenizer, and how big."""

    kind: Literal["bpe", "wordpiece"] = "bpe"
    """bpe = byte-level BPE (decoders, any script, no unknown tokens); wordpiece = BERT-style (encoders)."""
    vocab_size: int = 8000
    """Vocabulary size, special tokens included."""
    min_frequency: int = 2
    """A merge (BPE) or word piece must occur this often to enter the vocabulary."""
    lowercase: bool = False
    """Lowercase before tokenizing (cased is the default: lowercasing is lossy for some scripts)."""


@dataclass
class TokenizerConfig:
    """Train a tokenizer on a corpus."""

    run: RunConfig = section(RunConfig)
    data: TextDataConfig = section(TextDataConfig)
    tokenizer: TokenizerOptions = section(TokenizerOptions)


def run(cfg: TokenizerConfig, resume: str | None = None, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """`callbacks` (the stage contract, `honelm.loop.Callback`) have nothing to observe here: no model is trained."""
    from honelm.tokenizer import bytes_per_token_stats, train_tokenizer

    runtime = rt.setup()
    run_dir = S.run_directory("tokenizer", cfg, runtime, None)
    tracker = S.tracker_for(run_dir, runtime, cfg)
    splits = S.text_splits(cfg.data, tracker.say)
    S.write_json(run_dir / "split_manifest.json", splits.manifest, runtime)
    texts = [d.text for d in splits.train]
    opts = cfg.tokenizer
    tokenizer = train_tokenizer(texts, kind=opts.kind, vocab_size=opts.vocab_size, min_frequency=opts.min_frequency,
                                lowercase=opts.lowercase)
    tokenizer.save_pretrained(run_dir / "tokenizer")
    stats = bytes_per_token_stats(tokenizer, [d.text for d in splits.val] or texts[:1000])
    summary = {"kind": opts.kind, "vocab_size": len(tokenizer), "train_documents": len(texts), **stats}
    S.write_json(run_dir / "tokenizer_stats.json", summary, runtime)
    tracker.event("end", 0, reason="done", message=f"tokenizer saved to {run_dir / 'tokenizer'}",
                  **{k: v for k, v in summary.items() if isinstance(v, (int, float))})
    tracker.close()
    return {"run_dir": str(run_dir), **summary}
