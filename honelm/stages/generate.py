"""`honelm generate`: sample continuations from a causal LM (a run or any checkpoint directory).

One prompt, or a prompt file (.txt lines or .jsonl rows with "prompt") whose generations go to a
JSONL file (`out`: prompt, output and the sampling settings of that row, seed included). With
`chat=true` each prompt is a user message rendered by the chat template and the output is the
assistant's reply.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from honelm import runtime as rt
from honelm.checkpoint import resolve_model_dir
from honelm.config import section
from honelm.errors import ConfigError
from honelm.data.chat import ensure_template, prompt_ids
from honelm.generate import SamplingConfig, generate_ids, read_prompts, write_generations
from honelm.models import load_model
from honelm.tokenizer import load_tokenizer


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
    chat: bool = False
    """Send each prompt as a user message through the model's chat template (honelm's default is added to a tokenizer without one) and generate the assistant's reply."""
    sampling: SamplingConfig = section(SamplingConfig)


def run(cfg: GenerateConfig, resume: str | None = None) -> dict[str, Any]:
    if not cfg.model:
        raise ConfigError("which model? give a run directory or model directory: honelm generate RUN prompt='...'")
    path = resolve_model_dir(cfg.model)
    device = rt.setup().device
    tokenizer = load_tokenizer(path)
    model = load_model(path, "lm").to(device)
    prompts = read_prompts(cfg.prompts_file) if cfg.prompts_file else [cfg.prompt]
    if cfg.chat:
        ensure_template(tokenizer, lambda line: print(line, file=sys.stderr))
        if not all(p.strip() for p in prompts):
            raise ConfigError("chat=true needs a prompt: the user message to reply to")
        rows = [prompt_ids(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    else:  # an empty prompt starts from EOS, as a document does in pre-training
        if not cfg.prompt and not cfg.prompts_file and tokenizer.eos_token_id is None:
            raise ConfigError("no prompt given and the tokenizer has no EOS token to start from: give prompt=...")
        rows = [tokenizer(p)["input_ids"] if p else [tokenizer.eos_token_id] for p in prompts]
    outputs: list[str] = []
    all_prompts: list[str] = []
    settings: list[SamplingConfig] = []
    for k in range(cfg.num_samples):
        sampling = SamplingConfig(**{**cfg.sampling.__dict__, "seed": cfg.sampling.seed + k})
        outputs.extend(generate_ids(model, tokenizer, rows, sampling))
        all_prompts.extend(prompts)
        settings.extend([sampling] * len(prompts))
    if cfg.out:
        write_generations(cfg.out, all_prompts, outputs, settings)
        print(f"wrote {len(outputs)} generations to {cfg.out}", file=sys.stderr)
    else:
        for prompt, output in zip(all_prompts, outputs):
            print(f"user: {prompt}\nassistant: {output}" if cfg.chat else prompt + output)
            print("-" * 40)
    return {"generations": len(outputs)}
