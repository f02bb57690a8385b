"""`honelm generate`: sample continuations from a causal LM (a run or any checkpoint directory)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from honelm import runtime as rt
from honelm.checkpoint import resolve_model_dir
from honelm.config import section
from honelm.errors import ConfigError
from honelm.generate import SamplingConfig, generate, read_prompts, write_generations


@dataclass
class GenerateConfig:
    """Sample from a causal language model."""

    model: str = ""
    """A run directory (its best/ model) or a model directory; also accepted as the first argument."""
    prompt: str = ""
    """One prompt (empty = an unconditional sample starting from EOS)."""
    prompts_file: str = ""
    """A .txt (one prompt per line) or .jsonl (field `prompt`) file of prompts; outputs go to `out`."""
    out: str = ""
    """JSONL file for the generations (default: print to the terminal)."""
    num_samples: int = 1
    """Samples per prompt (seeds seed, seed+1, ...)."""
    sampling: SamplingConfig = section(SamplingConfig)


def run(cfg: GenerateConfig, resume: str | None = None) -> dict[str, Any]:
    from honelm.models import load_model
    from honelm.tokenizer import load_tokenizer

    if not cfg.model:
        raise ConfigError("which model? give a run directory or model directory: honelm generate RUN prompt='...'")
    path = resolve_model_dir(cfg.model)
    device = rt.setup().device
    tokenizer = load_tokenizer(path)
    model = load_model(path, "lm").to(device)
    prompts = read_prompts(cfg.prompts_file) if cfg.prompts_file else [cfg.prompt]
    outputs, all_prompts = [], []
    for k in range(cfg.num_samples):
        sampling = SamplingConfig(**{**cfg.sampling.__dict__, "seed": cfg.sampling.seed + k})
        outputs.extend(generate(model, tokenizer, prompts, sampling))
        all_prompts.extend(prompts)
    if cfg.out:
        write_generations(cfg.out, all_prompts, outputs, cfg.sampling)
        print(f"wrote {len(outputs)} generations to {cfg.out}", file=sys.stderr)
    else:
        for prompt, output in zip(all_prompts, outputs):
            print(prompt + output)
            print("-" * 40)
    return {"generations": len(outputs)}
