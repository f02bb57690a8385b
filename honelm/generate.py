"""Text generation from a causal LM: sampling settings, seeded batched generation, prompt files.

This module owns:
- `SamplingConfig`: the knobs of decoding, validated in one place;
- `generate`: batched, left-padded, seeded generation that returns only the new text per prompt
  and leaves the caller's model mode and global RNG state exactly as it found them
  (`generate_ids` does the same for prompts given as token ids, e.g. rendered chat prompts);
- `read_prompts` / `write_generations`: the prompt-file and generations-file formats.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from transformers import GenerationConfig

from honelm.errors import DataError


@dataclass
class SamplingConfig:
    """How to decode. Validated on construction and again by `generate` (fields are mutable)."""

    max_new_tokens: int = 64
    """Upper bound on generated tokens per prompt; generation stops earlier at the EOS token."""

    temperature: float = 1.0
    """Softmax temperature for sampling (> 0). 0 means greedy decoding, whatever `do_sample` says."""

    top_k: int = 0
    """Keep only the k most likely tokens before sampling; 0 turns the filter off."""

    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose mass reaches top_p, in (0, 1]; 1.0 = off."""

    seed: int = 0
    """Seed for sampling: the same seed, prompts, model and batch_size give the same outputs."""

    do_sample: bool = True
    """True = sample from the (filtered) distribution; False = greedy (argmax) decoding."""

    def __post_init__(self) -> None:
        self.validate()

    @property
    def greedy(self) -> bool:
        """Whether decoding is greedy: explicitly (do_sample False) or via temperature 0."""
        return (not self.do_sample) or self.temperature == 0

    def validate(self) -> None:
        """Raise ValueError naming the bad field; called again by `generate` since fields can be reassigned."""
        # bool is an int subclass; reject it so `max_new_tokens=True` is not silently 1.
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not (0.0 < float(self.top_p) <= 1.0):
            raise ValueError(f"top_p must be in (0, 1] (1.0 = off), got {self.top_p!r}")
        if float(self.temperature) < 0 or self.temperature != self.temperature:  # second test catches NaN
            raise ValueError(
                f"temperature must be > 0 when sampling (or exactly 0 for greedy decoding), got {self.temperature!r}"
            )


def _special_id(tokenizer: Any, model: Any, name: str) -> int | None:
    """Token id `name` ('eos'/'pad') from the tokenizer, falling back to the model's generation config."""
    value = getattr(tokenizer, f"{name}_token_id", None)
    if value is None:
        gen_cfg = getattr(model, "generation_config", None)
        value = getattr(gen_cfg, f"{name}_token_id", None)
    # Some configs hold a list of EOS ids; the first one is a valid pad id.
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return value


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token-id rows into (input_ids, attention_mask).

    Padding by hand instead of via the tokenizer means a tokenizer without a pad token still
    works and the (possibly shared) tokenizer object is never mutated, not even temporarily.
    Left, because a decoder continues from the last position: right padding would make the
    model continue after pad tokens.
    """
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids, mask


def rng_devices(device: torch.device) -> tuple[str | None, list[int]]:
    """Which accelerator RNGs `torch.manual_seed` will touch, so fork_rng can restore all of them."""
    if device.type in ("cpu", "meta"):
        acc = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
        if acc is None:
            return None, []
        device_type = acc.type
    else:
        device_type = device.type
    mod = torch.get_device_module(device_type)
    # torch.manual_seed reseeds every device of the accelerator, so every one must be forked;
    # listing them explicitly also silences fork_rng's many-devices warning.
    count = mod.device_count() if hasattr(mod, "device_count") else 0
    return device_type, list(range(count))


@contextlib.contextmanager
def neutral_generation_config(model: Any) -> Iterator[None]:
    """For the duration: `model.generation_config` holds only its special-token ids.

    transformers merges the checkpoint's generation_config into every `generate` call, and a
    repetition_penalty, min_length or no_repeat_ngram_size saved with a model would reshape the
    distribution even though every sampling knob is passed explicitly; the caller's settings must
    be the whole story (and PPO's rollouts must sample from exactly softmax(logits / T)).
    """
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = getattr(target, "generation_config", None)
    if saved is None:
        yield
        return
    target.generation_config = GenerationConfig(**{k: getattr(saved, k, None) for k in
                                                   ("bos_token_id", "eos_token_id", "pad_token_id")})
    try:
        yield
    finally:
        target.generation_config = saved


def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    cfg: SamplingConfig,
    batch_size: int = 8,
) -> list[str]:
    """Generate a continuation for each prompt and return only the new text (prompt excluded).

    - Prompts are processed in order in batches of `batch_size`, left-padded with an attention mask.
    - Seeding: the RNG is seeded once with `cfg.seed` inside `torch.random.fork_rng`, so outputs are
      reproducible for the same (seed, prompts, batch_size) and the caller's global RNG state is
      restored afterwards. Sampled outputs can depend on batch_size (random draws are shared across
      a batch); greedy outputs do not.
    - `temperature == 0` means greedy decoding.
    - The model runs in eval mode under `torch.no_grad()`; its previous training mode is restored.
    """
    cfg.validate()
    if isinstance(prompts, str):
        # A bare string would be iterated character by character; that is never what the caller meant.
        raise TypeError("prompts must be a list of strings, not a single string")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not prompts:
        return []
    rows = tokenizer(list(prompts))["input_ids"]
    for i, row in enumerate(rows):
        if not row:
            raise ValueError(f"prompt #{i} tokenizes to zero tokens (and the tokenizer adds no BOS); give it some text")
    return generate_ids(model, tokenizer, rows, cfg, batch_size)


def generate_ids(
    model: Any,
    tokenizer: Any,
    rows: list[list[int]],
    cfg: SamplingConfig,
    batch_size: int = 8,
) -> list[str]:
    """`generate` for prompts already tokenised (e.g. a chat template rendered with its special tokens).

    Chat prompts must be passed as ids: re-tokenising their rendered text would add the
    tokenizer's own BOS a second time. Same seeding, batching and decoding as `generate`.
    """
    cfg.validate()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not rows:
        return []
    for i, row in enumerate(rows):
        if not row:
            raise ValueError(f"prompt #{i} has no tokens")

    eos_id = _special_id(tokenizer, model, "eos")
    pad_id = _special_id(tokenizer, model, "pad")
    if pad_id is None:
        pad_id = eos_id
    if pad_id is None:
        raise ValueError("tokenizer has neither a pad nor an eos token; cannot pad a batch for generation")

    gen_kwargs: dict[str, Any] = {
        "max_new_tokens": cfg.max_new_tokens,
        "pad_token_id": pad_id,
        "num_beams": 1,
    }
    if eos_id is not None:
        gen_kwargs["eos_token_id"] = eos_id
    if cfg.greedy:
        gen_kwargs["do_sample"] = False
    else:
        # Pass every sampling knob explicitly: otherwise HF fills unset ones from the checkpoint's
        # generation_config or its global defaults (top_k=50), silently changing the distribution.
        gen_kwargs.update(
            do_sample=True,
            temperature=float(cfg.temperature),
            top_k=int(cfg.top_k),
            top_p=float(cfg.top_p),
        )

    device = next(model.parameters()).device
    is_enc_dec = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    was_training = model.training
    device_type, devices = rng_devices(device)
    outputs: list[str] = []
    model.eval()
    try:
        with torch.random.fork_rng(devices=devices, device_type=device_type), torch.no_grad(), \
                neutral_generation_config(model):
            torch.manual_seed(cfg.seed)
            for start in range(0, len(rows), batch_size):
                input_ids, attention_mask = _left_pad([list(r) for r in rows[start : start + batch_size]], pad_id)
                sequences = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    **gen_kwargs,
                )
                # Decoder-only output = [padded prompt | new tokens]; all rows share the padded width.
                new_tokens = sequences if is_enc_dec else sequences[:, input_ids.shape[1] :]
                # skip_special_tokens drops the EOS and the pad tokens that fill rows that stopped early.
                outputs.extend(tokenizer.batch_decode(new_tokens.tolist(), skip_special_tokens=True))
    finally:
        model.train(was_training)
    return outputs


def read_prompts(path: str | Path) -> list[str]:
    """Read prompts from a .txt (one per line, blank lines skipped) or .jsonl (`{"prompt": ...}`) file.

    Bad rows raise `DataError(path, line, field, message)` with a 1-based line number. A file with
    no prompts at all is an error too: generating nothing is never what the user asked for.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        raise DataError(p, None, None, f"unsupported prompt file type '{p.suffix}'; use .txt or .jsonl")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise DataError(p, None, None, f"cannot read prompt file: {exc.strerror or exc}") from exc

    prompts: list[str] = []
    for lineno, raw_line in enumerate(raw.split(b"\n"), start=1):
        try:
            line = raw_line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(p, lineno, None, f"not valid UTF-8 ({exc.reason})") from exc
        line = line.removesuffix("\r")  # tolerate Windows line endings
        if lineno == 1:
            line = line.removeprefix("\ufeff")  # and a UTF-8 BOM from editors that add one
        if not line.strip():
            continue
        if suffix == ".txt":
            # Keep the line verbatim (minus its terminator): leading/trailing spaces change tokenization.
            prompts.append(line)
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(p, lineno, None, f"invalid JSON: {exc.msg} (column {exc.colno})") from exc
        if not isinstance(row, dict):
            raise DataError(p, lineno, None, f"expected a JSON object, got {type(row).__name__}")
        if "prompt" not in row:
            raise DataError(p, lineno, "prompt", "missing required field")
        value = row["prompt"]
        if not isinstance(value, str):
            raise DataError(p, lineno, "prompt", f"must be a string, got {type(value).__name__}")
        if not value.strip():
            raise DataError(p, lineno, "prompt", "is empty")
        prompts.append(value)
    if not prompts:
        raise DataError(p, None, None, "no prompts found (file is empty or only blank lines)")
    return prompts


def write_generations(
    path: str | Path,
    prompts: list[str],
    outputs: list[str],
    cfg: SamplingConfig | list[SamplingConfig],
) -> None:
    """Write one JSON line per prompt: {"prompt", "output", "sampling"}, sampling = the full config.

    The sampling settings ride on every row so a single line is reproducible on its own; pass one
    config per row when they differ (several samples per prompt use seeds seed, seed+1, ...).
    """
    if len(prompts) != len(outputs):
        raise ValueError(f"{len(prompts)} prompts but {len(outputs)} outputs; they must pair one to one")
    configs = cfg if isinstance(cfg, list) else [cfg] * len(prompts)
    if len(configs) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(configs)} sampling configs")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as fh:
        for prompt, output, one in zip(prompts, outputs, configs):
            row = {"prompt": prompt, "output": output, "sampling": dataclasses.asdict(one)}
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
