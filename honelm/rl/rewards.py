"""What a PPO rollout is scored with: a frozen reward model, or a small programmatic reward.

This module owns the `reward` section of `honelm ppo` and turns it into a `Scorer`: a callable
from a list of finished `Sample`s to a (B,) tensor of scores, one per response.

* `reward.model`: a directory (or run) holding a sequence-classification model with one output
  (`num_labels=1`, what `honelm reward` writes). It reads [prompt | response], right-padded, and
  its output at the last real token is the score (transformers' sequence-classification
  pooling). A chat prompt and its decoded reply are rendered with the reward model's chat
  template and tokenised exactly as `honelm reward` encodes a pair (a reply cut at the length
  limit is closed by the template too: see `missing_eos_penalty`); a plain-text prompt passes
  the policy's token ids when the vocabularies agree, else its text re-tokenised.
* `reward.function`: for tests and demos, no model needed:
    contains:TEXT   1 if the decoded response contains TEXT, else 0
    regex:PATTERN   1 if the Python regex PATTERN matches somewhere in the decoded response, else 0
    token:ID        how many times token id ID occurs in the response (up to and including EOS)

`scorer_models(scorer)` lists the frozen models a scorer runs (the reward model), so that the
training loop can hold them in bf16 under bf16 autocast (`train.bf16_frozen`) like the policy's
other frozen weights.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable

import torch

from honelm.bounds import at_least
from honelm.checkpoint import resolve_model_dir
from honelm.data.chat import ensure_template, render
from honelm.errors import ConfigError, HonelmError
from honelm.models import load_checkpoint
from honelm.tokenizer import load_tokenizer


@dataclass
class RewardConfig:
    """Where the score of a response comes from (exactly one of model / function)."""

    model: str = ""
    """Reward model: a `honelm reward` run or a directory holding a sequence-classification model with num_labels=1."""
    function: str = ""
    """Programmatic reward instead of a model: contains:TEXT (1 if the response contains TEXT), regex:PATTERN (1 if it matches) or token:ID (count of token ID in the response)."""
    missing_eos_penalty: Annotated[float, at_least(0)] = 0.0
    """Subtracted from the score of a response that hit the length limit without EOS (0 = off); discourages endless answers."""

    def validate(self) -> None:
        if bool(self.model) == bool(self.function):
            raise ConfigError("reward: set exactly one of reward.model (a reward model directory or run) and "
                              "reward.function (contains:TEXT, regex:PATTERN or token:ID)")
        if self.function:
            parse_function(self.function)
        if self.missing_eos_penalty < 0:
            raise ConfigError(f"reward.missing_eos_penalty must be >= 0 (it is subtracted), got {self.missing_eos_penalty}")


@dataclass
class Sample:
    """One finished rollout sequence, as the scorers see it."""

    prompt: list[dict[str, str]] | str  # chat messages, or the plain-text prompt
    query_ids: list[int]  # the prompt tokens (no padding)
    response_ids: list[int]  # the real response tokens, up to and including the first EOS
    response_text: str  # the response decoded without special tokens
    ended: bool  # whether the response ended with EOS (False: cut at the length limit)


Scorer = Callable[[list[Sample]], torch.Tensor]


def parse_function(spec: str) -> Callable[[Sample], float]:
    """`contains:TEXT` | `regex:PATTERN` | `token:ID` → a per-sample scoring function."""
    kind, sep, arg = spec.partition(":")
    if not sep or not arg:
        raise ConfigError(f"reward.function={spec!r}: expected contains:TEXT, regex:PATTERN or token:ID")
    if kind == "contains":
        return lambda s: float(arg in s.response_text)
    if kind == "regex":
        try:
            pattern = re.compile(arg)
        except re.error as e:
            raise ConfigError(f"reward.function={spec!r}: invalid regex: {e}") from None
        return lambda s: float(pattern.search(s.response_text) is not None)
    if kind == "token":
        try:
            token = int(arg)
        except ValueError:
            raise ConfigError(f"reward.function={spec!r}: token needs an integer id, got {arg!r}") from None
        if token < 0:
            raise ConfigError(f"reward.function={spec!r}: token id must be >= 0")
        return lambda s: float(sum(1 for t in s.response_ids if t == token))
    raise ConfigError(f"reward.function={spec!r}: unknown kind {kind!r}; use contains, regex or token")


def function_scorer(spec: str, vocab_size: int | None = None) -> Scorer:
    fn = parse_function(spec)
    if vocab_size is not None and spec.startswith("token:") and int(spec[6:]) >= vocab_size:
        raise ConfigError(f"reward.function={spec!r}: token id is outside the vocabulary (size {vocab_size})")
    return lambda samples: torch.tensor([fn(s) for s in samples], dtype=torch.float32)


class RewardModelScorer:
    """A frozen sequence-classification model with one output; scores in batches on the policy's device."""

    def __init__(self, path: str, policy_tokenizer: Any, device: torch.device, autocast: Callable[[], Any],
                 batch_size: int, trust_remote_code: bool = False):
        resolved = resolve_model_dir(path)
        self.tokenizer = load_tokenizer(resolved)
        loaded = load_checkpoint(resolved, "classify", trust_remote_code=trust_remote_code,
                                 num_labels=_reward_labels(resolved))
        self.model = loaded.model.to(device).eval()
        self.model.requires_grad_(False)
        if loaded.new_weights:
            raise HonelmError(f"reward.model={path}: {resolved} is not a reward model (these weights were not in it: "
                              f"{', '.join(loaded.new_weights[:4])}); train one with `honelm reward`")
        self.same_vocab = self.tokenizer.get_vocab() == policy_tokenizer.get_vocab()
        self.policy_tokenizer = policy_tokenizer
        self.device, self.autocast, self.batch_size = device, autocast, batch_size
        self.pad_id = self.model.config.pad_token_id
        if self.pad_id is None:
            raise HonelmError(f"reward.model={path}: the model config has no pad_token_id, so its last token cannot "
                              "be found in a padded batch")
        self.limit = getattr(self.model.config, "max_position_embeddings", None)

    def _ids(self, s: Sample) -> list[int]:
        """The reward model's input: chat prompts re-rendered exactly as `honelm reward` encodes a pair
        (prompt + assistant reply through the chat template, no extra special tokens); plain prompts
        as the policy's own ids when the vocabularies agree, else re-tokenised text."""
        if isinstance(s.prompt, list):
            ensure_template(self.tokenizer)
            text = render(self.tokenizer, s.prompt + [{"role": "assistant", "content": s.response_text}])
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.same_vocab:
            return s.query_ids + s.response_ids
        return self.tokenizer(s.prompt + s.response_text)["input_ids"]

    def frozen_models(self) -> list[torch.nn.Module]:
        """The reward model: never trained, run only under the loop's autocast."""
        return [self.model]

    @torch.no_grad()
    def __call__(self, samples: list[Sample]) -> torch.Tensor:
        scores = []
        for start in range(0, len(samples), self.batch_size):
            rows = [self._ids(s) for s in samples[start:start + self.batch_size]]
            if self.limit is not None and max(len(r) for r in rows) > self.limit:
                raise HonelmError(f"reward model input of {max(len(r) for r in rows)} tokens is longer than its "
                                  f"max_position_embeddings={self.limit}; shorten the prompts or ppo.response_length")
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, r in enumerate(rows):  # right padding: the sequence ends at its last real token
                ids[i, :len(r)] = torch.tensor(r)
                mask[i, :len(r)] = 1
            with self.autocast():
                out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            scores.append(out[:, 0].float().cpu())
        return torch.cat(scores)


def _reward_labels(path: str) -> int:
    """A reward model has one output; anything else is refused with the count found."""
    config = Path(path) / "config.json"
    if config.is_file():
        data = json.loads(config.read_text(encoding="utf-8"))
        n = data.get("num_labels") or len(data.get("id2label") or {}) or None
        if n is not None and n != 1:
            raise HonelmError(f"reward.model: {path} has {n} outputs; a reward model has exactly one (num_labels=1)")
    return 1


class PenalisedScorer:
    """A scorer minus `penalty` for every response that hit the length limit without EOS."""

    def __init__(self, base: Scorer, penalty: float):
        self.base, self.penalty = base, penalty

    def frozen_models(self) -> list[torch.nn.Module]:
        return scorer_models(self.base)

    def __call__(self, samples: list[Sample]) -> torch.Tensor:
        ended = torch.tensor([s.ended for s in samples])
        return self.base(samples) - self.penalty * (~ended).float()


def scorer_models(scorer: Scorer) -> list[torch.nn.Module]:
    """The frozen models `scorer` runs (a reward model); none for a programmatic reward."""
    found = getattr(scorer, "frozen_models", None)
    return list(found()) if callable(found) else []


def make_scorer(cfg: RewardConfig, policy_tokenizer: Any, device: torch.device, autocast: Callable[[], Any],
                batch_size: int, trust_remote_code: bool = False) -> Scorer:
    """The scorer the config asks for, with the missing-EOS penalty applied after it."""
    base: Scorer
    if cfg.function:
        base = function_scorer(cfg.function, len(policy_tokenizer))
    else:
        base = RewardModelScorer(cfg.model, policy_tokenizer, device, autocast, batch_size, trust_remote_code)
    if cfg.missing_eos_penalty == 0:
        return base
    return PenalisedScorer(base, cfg.missing_eos_penalty)
