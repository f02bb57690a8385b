"""Text generation from a causal LM: sampling settings, seeded batched generation, prompt files.

This module owns:
- `SamplingConfig`: the knobs of decoding, validated in one place;
- `generate`: batched, left-padded, seeded generation that returns only the new text per prompt
  and leaves the caller's model mode and global RNG state exactly as it found them
  (`generate_ids` does the same for prompts given as token ids, e.g. rendered chat prompts, and
  `sample_ids` returns the sampled token ids themselves);
- `read_prompts` / `read_prompt_rows` / `write_generations`: the prompt-file and generations-file
  formats; a generations file is `honelm sft` input as it is (prompt_completion rows).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Iterator, Sequence

import torch
from transformers import GenerationConfig, StoppingCriteriaList

from honelm.bounds import at_least, between
from honelm.data.chat import Messages, prompt_of, reference_of
from honelm.data.readers import read_rows
from honelm.errors import DataError


@dataclass
class SamplingConfig:
    """How to decode. Validated on construction and again by `generate` (fields are mutable)."""

    max_new_tokens: Annotated[int, at_least(1)] = 64
    """Upper bound on generated tokens per prompt; generation stops earlier at the EOS token."""

    temperature: Annotated[float, at_least(0)] = 1.0
    """Softmax temperature for sampling (> 0). 0 means greedy decoding, whatever `do_sample` says."""

    top_k: Annotated[int, at_least(0)] = 0
    """Keep only the k most likely tokens before sampling; 0 turns the filter off."""

    top_p: Annotated[float, between(0, 1, open_lo=True)] = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose mass reaches top_p, in (0, 1]; 1.0 = off."""

    seed: Annotated[int, at_least(0)] = 0
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
    # skip_special_tokens drops the EOS (and anything special the model wrote before it).
    return tokenizer.batch_decode(sample_ids(model, tokenizer, rows, cfg, batch_size), skip_special_tokens=True)


def sample_ids(
    model: Any,
    tokenizer: Any,
    rows: list[list[int]],
    cfg: SamplingConfig,
    batch_size: int = 8,
    stopping_criteria: Sequence[Any] = (),
) -> list[list[int]]:
    """The new token ids sampled after each prompt (given as ids): up to and including the first EOS,
    or `max_new_tokens` ids when no EOS came. Same seeding, batching and mode handling as `generate`.

    The exact sampled tokens, not a re-tokenisation of their decoded text (which may split
    differently): on-policy distillation trains on the very tokens the student chose.
    `stopping_criteria` (transformers `StoppingCriteria`) see every step's tokens and may end rows
    early (the server's stop strings, per-request token limits and streaming); a row they end is
    padded after its last token, which the returned ids do not cut.
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
    if stopping_criteria:
        gen_kwargs["stopping_criteria"] = StoppingCriteriaList(stopping_criteria)
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
    outputs: list[list[int]] = []
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
                # Decoder-only output = [padded prompt | new tokens]; all rows share the padded width. An
                # encoder-decoder's starts with the decoder-start token, which was not sampled.
                new_tokens = sequences[:, 1:] if is_enc_dec else sequences[:, input_ids.shape[1] :]
                outputs.extend(_until_eos(row, eos_id) for row in new_tokens.tolist())
    finally:
        model.train(was_training)
    return outputs


def _until_eos(row: list[int], eos_id: int | None) -> list[int]:
    """A sampled row cut after its first EOS: what follows is the padding of rows that stopped early."""
    if eos_id is not None and eos_id in row:
        return row[: row.index(eos_id) + 1]
    return row


def read_prompts(path: str | Path) -> list[str]:
    """Read prompts from a .txt (one per line, blank lines skipped) or .jsonl (`{"prompt": ...}`) file.

    Bad rows raise `DataError(path, line, field, message)` with a 1-based line number. A file with
    no prompts at all is an error too: generating nothing is never what the user asked for.
    """
    return [prompt for _, prompt in _numbered_prompts(path)]


def _numbered_prompts(path: str | Path) -> list[tuple[int, str]]:
    """`read_prompts` with the 1-based line of each prompt."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        raise DataError(p, None, None, f"unsupported prompt file type '{p.suffix}'; use .txt or .jsonl")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise DataError(p, None, None, f"cannot read prompt file: {exc.strerror or exc}") from exc

    prompts: list[tuple[int, str]] = []
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
            prompts.append((lineno, line))
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
        prompts.append((lineno, value))
    if not prompts:
        raise DataError(p, None, None, "no prompts found (file is empty or only blank lines)")
    return prompts


@dataclass
class PromptRow:
    """One prompt of a prompt file: messages ending with a user turn, the reply the row holds for it
    (its reference, kept apart from what is trained), and where it came from."""

    messages: Messages
    reference: str | None
    source: str
    line: int

    @classmethod
    def given(cls, text: str) -> "PromptRow":
        """A prompt typed on the command line (may be empty: an unconditional sample)."""
        return cls([{"role": "user", "content": text}], None, "prompt", 0)

    def text(self) -> str:
        """The prompt as plain text to continue (chat=false): only a single user message has one."""
        if len(self.messages) != 1 or self.messages[0]["role"] != "user":
            raise DataError(self.source, self.line, "prompt", "has a system message or several turns, which "
                            "need the chat template: set chat=true")
        return self.messages[0]["content"]

    def field(self) -> str | Messages:
        """The row's prompt as a generations file stores it: the text of a lone user message, else the
        message list (both are `prompt_completion` prompts to `honelm.data.chat`)."""
        single = len(self.messages) == 1 and self.messages[0]["role"] == "user"
        return self.messages[0]["content"] if single else self.messages


def read_prompt_rows(path: str | Path) -> list[PromptRow]:
    """Prompts of a .txt file (one per line, as `read_prompts`) or of structured rows (.jsonl, .json,
    .csv, .tsv, .parquet) in any format `honelm.data.chat.prompt_of` reads: a bare {"prompt"}, or an
    SFT row (alpaca, prompt_completion, messages, sharegpt) whose prompt is the conversation up to its
    last assistant turn and whose reply becomes the row's `reference`. Bad rows are a DataError
    naming file, line and field.
    """
    p = Path(path)
    if p.suffix.lower() == ".txt":
        return [PromptRow([{"role": "user", "content": text}], None, str(p), line) for line, text in _numbered_prompts(p)]
    return [PromptRow(prompt_of(row), reference_of(row), row.source, row.line) for row in read_rows(p)]


def write_generations(
    path: str | Path,
    prompts: Sequence[str | Messages],
    outputs: Sequence[str],
    cfg: SamplingConfig | list[SamplingConfig],
    references: Sequence[str | None] | None = None,
    chat: bool | None = None,
) -> list[int]:
    """Write one JSON line per prompt, an SFT row of the prompt_completion format
    (`honelm.data.chat`), so the file is `honelm sft` input as it is (sequence-level distillation):

        {"prompt": text | messages, "completion": output, "output": output, "sampling": {...},
         "reference"?: the row's own reply, "chat"?: whether the prompt went through the chat template}

    `sampling` (the full config) rides on every row so a single line is reproducible on its own;
    pass one config per row when they differ (several samples per prompt use seeds seed, seed+1,
    ...). `output` repeats the completion under the name honelm's other answer files use (and
    earlier generations files had), for whatever reads them; `sft` reads `prompt` and `completion`
    and ignores the other fields. A blank output (the model ended at once) is no SFT row (`sft`
    refuses an empty completion): it is not written, and the indices of those left out are returned
    for the caller to report.
    """
    if len(prompts) != len(outputs):
        raise ValueError(f"{len(prompts)} prompts but {len(outputs)} outputs; they must pair one to one")
    configs = cfg if isinstance(cfg, list) else [cfg] * len(prompts)
    if len(configs) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(configs)} sampling configs")
    refs = list(references) if references is not None else [None] * len(prompts)
    if len(refs) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(refs)} references")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    blank: list[int] = []
    with p.open("w", encoding="utf-8") as fh:
        for i, (prompt, output, one, ref) in enumerate(zip(prompts, outputs, configs, refs)):
            if not output.strip():
                blank.append(i)
                continue
            row: dict[str, Any] = {"prompt": prompt, "completion": output, "output": output,
                                   "sampling": dataclasses.asdict(one)}
            if ref is not None:
                row["reference"] = ref
            if chat is not None:
                row["chat"] = chat
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return blank
