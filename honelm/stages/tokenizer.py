"""`honelm tokenizer`: train a byte-level BPE (decoders) or WordPiece (encoders) tokenizer.

The tokenizer is trained on the TRAIN split of the corpus only (the same split settings as the
`pretrain` run that will use it), and saved as a Hugging Face tokenizer directory under
RUN/tokenizer, loadable with `AutoTokenizer.from_pretrained`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from honelm import runtime as rt
from honelm.bounds import at_least
from honelm.config import RunConfig, section
from honelm.data.sections import TextDataConfig
from honelm.data.sources import text_splits
from honelm.rundir import (discard_failed_start, latest_of, release_run, run_directory, runs_parent, tracker_for,
                           write_json)
from honelm.tokenizer import bytes_per_token_stats, train_tokenizer


@dataclass
class TokenizerOptions:
    """What kind of tokenizer, and how big."""

    kind: Literal["bpe", "wordpiece"] = "bpe"
    """bpe = byte-level BPE (decoders, any script, no unknown tokens); wordpiece = BERT-style (encoders)."""
    vocab_size: Annotated[int, at_least(1)] = 8000
    """Vocabulary size, special tokens included."""
    min_frequency: Annotated[int, at_least(1)] = 2
    """A merge (BPE) or word piece must occur this often to enter the vocabulary."""
    lowercase: bool = False
    """Lowercase before tokenizing (cased is the default: lowercasing is lossy for some scripts)."""


@dataclass
class TokenizerConfig:
    """Train a tokenizer on a corpus."""

    run: RunConfig = section(RunConfig)
    data: TextDataConfig = section(TextDataConfig)
    tokenizer: TokenizerOptions = section(TokenizerOptions)


def run(cfg: TokenizerConfig, resume: str | None = None) -> dict[str, Any]:
    runtime = rt.setup()
    latest_before = latest_of(runs_parent("tokenizer", cfg))
    run_dir = run_directory("tokenizer", cfg, runtime, None)
    try:
        return _train(cfg, runtime, run_dir)
    except BaseException:
        # a tokenizer run that fails (a missing file, bad rows) holds nothing to keep: as a training run's failed
        # start, its directory goes, `latest` points back and the same run.name works again
        if discard_failed_start(run_dir, latest_before, runtime):
            print(f"{run_dir}: removed, as the run failed (run the same command again once the error is fixed)",
                  file=sys.stderr, flush=True)
        raise
    finally:
        release_run(run_dir)


def _train(cfg: TokenizerConfig, runtime: rt.Runtime, run_dir: Path) -> dict[str, Any]:
    tracker = tracker_for(run_dir, runtime, cfg)
    splits = text_splits(cfg.data, tracker.say)
    write_json(run_dir / "split_manifest.json", splits.manifest, runtime)
    texts = [d.text for d in splits.train]
    opts = cfg.tokenizer
    tokenizer = train_tokenizer(texts, kind=opts.kind, vocab_size=opts.vocab_size, min_frequency=opts.min_frequency,
                                lowercase=opts.lowercase)
    tokenizer.save_pretrained(run_dir / "tokenizer")
    stats = bytes_per_token_stats(tokenizer, [d.text for d in splits.val] or texts[:1000])
    summary = {"kind": opts.kind, "vocab_size": len(tokenizer), "train_documents": len(texts), **stats}
    write_json(run_dir / "tokenizer_stats.json", summary, runtime)
    tracker.event("end", 0, reason="done", message=f"tokenizer saved to {run_dir / 'tokenizer'}",
                  **{k: v for k, v in summary.items() if isinstance(v, (int, float))})
    tracker.close()
    return {"run_dir": str(run_dir), **summary}
