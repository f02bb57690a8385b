"""`honelm generate`: sample continuations from a causal LM (a run or any checkpoint directory).

One prompt, or a prompt file whose generations go to a JSONL file (`out`). A prompt file is .txt
(one prompt per line) or structured rows: {"prompt"} or any SFT row (alpaca, prompt_completion,
messages, sharegpt), whose prompt is the conversation up to its last assistant turn and whose reply
is kept as the output row's `reference`, so a teacher can answer a task's own prompts. With
`chat=true` each prompt goes through the chat template and the output is the assistant's reply;
with `chat=false` a prompt must be a single user message, whose text the model continues.

The output file is `honelm sft` input as it is (sequence-level knowledge distillation, Kim & Rush
2016: the teacher answers, the student is fine-tuned on the answers): each row is a
prompt_completion row {"prompt", "completion"} carrying its sampling settings (seed included) as
extra fields (`honelm.generate.write_generations`). Use chat=true for that: `sft` renders every row
through the chat template, so a chat=false continuation is trained as a reply all the same.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Annotated, Any

from honelm import runtime as rt
from honelm.bounds import at_least
from honelm.checkpoint import resolve_model_dir
from honelm.config import section
from honelm.errors import ConfigError
from honelm.data.chat import ensure_template, prompt_ids
from honelm.generate import PromptRow, SamplingConfig, generate_ids, read_prompt_rows, write_generations
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
    """A .txt file (one prompt per line) or rows (.jsonl/.json/.csv/.tsv/.parquet): {"prompt"} or SFT rows (alpaca, prompt_completion, messages, sharegpt), answered up to their last assistant turn (their reply is kept as `reference`); outputs go to `out`."""
    out: str = ""
    """JSONL file for the generations, rows that `honelm sft` reads as they are (prompt, completion, sampling settings, reference); default: print to the terminal."""
    num_samples: Annotated[int, at_least(1)] = 1
    """Samples per prompt (seeds seed, seed+1, ...)."""
    chat: bool = False
    """Send each prompt (a user message, or a row's conversation) through the model's chat template (honelm's default is added to a tokenizer without one) and generate the assistant's reply; false = continue a single user message's text. Use true for answers that sft trains on."""
    sampling: SamplingConfig = section(SamplingConfig)


def run(cfg: GenerateConfig, resume: str | None = None) -> dict[str, Any]:
    if not cfg.model:
        raise ConfigError("which model? give a run directory or model directory: honelm generate RUN prompt='...'")
    path = resolve_model_dir(cfg.model)
    device = rt.setup().device
    tokenizer = load_tokenizer(path)
    model = load_model(path, "lm").to(device)
    prompts = read_prompt_rows(cfg.prompts_file) if cfg.prompts_file else [PromptRow.given(cfg.prompt)]
    rows = _encode(tokenizer, prompts, cfg)
    outputs: list[str] = []
    asked: list[PromptRow] = []
    settings: list[SamplingConfig] = []
    for k in range(cfg.num_samples):
        sampling = SamplingConfig(**{**cfg.sampling.__dict__, "seed": cfg.sampling.seed + k})
        outputs.extend(generate_ids(model, tokenizer, rows, sampling))
        asked.extend(prompts)
        settings.extend([sampling] * len(prompts))
    if cfg.out:
        blank = write_generations(cfg.out, [p.field() for p in asked], outputs, settings,
                                  [p.reference for p in asked], chat=cfg.chat)
        print(f"wrote {len(outputs) - len(blank)} generations to {cfg.out}", file=sys.stderr)
        if blank:
            where = ", ".join(f"{asked[i].source}:{asked[i].line} (seed {settings[i].seed})" for i in blank[:5])
            print(f"left out {len(blank)} empty generation(s) (the model ended at once; sft refuses an empty "
                  f"completion): {where}{' ...' if len(blank) > 5 else ''}", file=sys.stderr)
        return {"generations": len(outputs) - len(blank), "empty": len(blank)}
    for prompt, output in zip(asked, outputs):
        print(f"user: {prompt.messages[-1]['content']}\nassistant: {output}" if cfg.chat else prompt.text() + output)
        print("-" * 40)
    return {"generations": len(outputs)}


def _encode(tokenizer: Any, prompts: list[PromptRow], cfg: GenerateConfig) -> list[list[int]]:
    """Token ids to continue: each prompt rendered with the generation prompt (chat), else its text."""
    if cfg.chat:
        ensure_template(tokenizer, lambda line: print(line, file=sys.stderr))
        if not all(m["content"].strip() for p in prompts for m in p.messages if m["role"] == "user"):
            raise ConfigError("chat=true needs a prompt: the user message to reply to")
        return [prompt_ids(tokenizer, p.messages) for p in prompts]
    # an empty prompt starts from EOS, as a document does in pre-training
    if not cfg.prompt and not cfg.prompts_file and tokenizer.eos_token_id is None:
        raise ConfigError("no prompt given and the tokenizer has no EOS token to start from: give prompt=...")
    texts = [p.text() for p in prompts]
    return [tokenizer(t)["input_ids"] if t else [tokenizer.eos_token_id] for t in texts]
