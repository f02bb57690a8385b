"""What a PPO or GRPO rollout is scored with: a frozen reward model, programmatic checks, or both.

This module owns the `reward` section of `honelm ppo` and turns it into a `Scorer`: a callable
from a list of finished `Sample`s to a (B,) tensor of scores, one per response.

* `reward.model`: a directory (or run) holding a sequence-classification model with one output
  (`num_labels=1`, what `honelm reward` writes). It reads [prompt | response], right-padded, and
  its output at the last real token is the score (transformers' sequence-classification
  pooling). A chat prompt and its decoded reply are rendered with the reward model's chat
  template and tokenised exactly as `honelm reward` encodes a pair (a reply cut at the length
  limit is closed by the template too: see `missing_eos_penalty`); a plain-text prompt passes
  the policy's token ids when the vocabularies agree, else its text re-tokenised.
* `reward.function` / `reward.checks`: programmatic rewards, no model needed
  (`honelm.rl.checks`): fixed strings (contains:TEXT, regex:PATTERN, token:ID), answers checked
  against each prompt row's own reference (exact, numeric[:TOL], capture:PATTERN, label[:A|B]),
  json[:SCHEMA], penalties (max_length:N, format:PATTERN) and a Python function
  (python:MODULE:FUNCTION). `reward.checks` lists several, each with an optional weight
  (`0.2*max_length:32`); `reward.function` is one more of weight 1. A reward model may be mixed
  in: its score times `reward.model_weight` is added to theirs.

The checks' scorer also says which responses are *correct* (`score_and_correct`): those every
reference check scores positively, the accuracy logged beside the reward.

`scorer_models(scorer)` lists the frozen models a scorer runs (the reward model), so that the
training loop can hold them in bf16 under bf16 autocast (`train.bf16_frozen`) like the policy's
other frozen weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable

import torch

from honelm.bounds import at_least
from honelm.checkpoint import resolve_model_dir
from honelm.data.chat import ensure_template, render
from honelm.errors import ConfigError, DataError, HonelmError
from honelm.models import load_checkpoint
from honelm.rl.checks import Check, Response, parse_check, parse_weighted
from honelm.tokenizer import load_tokenizer


@dataclass
class RewardConfig:
    """Where the score of a response comes from: a reward model, programmatic checks, or both (weighted sum)."""

    model: str = ""
    """Reward model: a `honelm reward` run or a directory holding a sequence-classification model with num_labels=1."""
    function: str = ""
    """Programmatic reward: contains:TEXT, regex:PATTERN, token:ID, exact, numeric[:TOL], capture:PATTERN, label[:A|B|..], json[:SCHEMA], max_length:N, format:PATTERN or python:MODULE:FUNCTION (docs/grpo.md); weight 1."""
    checks: list[str] = field(default_factory=list)
    """More programmatic rewards, summed: each [WEIGHT*]KIND[:ARG] as in reward.function (e.g. [numeric, 0.1*max_length:32])."""
    model_weight: Annotated[float, at_least(0)] = 1.0
    """Weight of the reward model's score when checks are mixed in (score = model_weight x model + sum of weighted checks)."""
    missing_eos_penalty: Annotated[float, at_least(0)] = 0.0
    """Subtracted from the score of a response that hit the length limit without EOS (0 = off); discourages endless answers."""

    def validate(self) -> None:
        if not (self.model or self.function or self.checks):
            raise ConfigError("reward: set reward.model (a reward model directory or run), reward.function "
                              "(contains:TEXT, regex:PATTERN, token:ID, exact, numeric, ...) or reward.checks")
        if self.function:
            parse_function(self.function)
        for item in self.checks:
            parse_weighted(item)
        if self.missing_eos_penalty < 0:
            raise ConfigError(f"reward.missing_eos_penalty must be >= 0 (it is subtracted), got {self.missing_eos_penalty}")

    def checks_answers(self) -> bool:
        """Whether a check compares responses with reference answers (then an accuracy is reported)."""
        specs = ([self.function] if self.function else []) + list(self.checks)
        return any(parse_weighted(x).needs_reference for x in specs)

    def describe(self) -> str:
        """The reward in one line, for the run's log."""
        parts = [f"{self.model_weight:g} x model {self.model}" if self.model and (self.function or self.checks)
                 else f"model {self.model}" if self.model else ""]
        parts += [f"function {self.function}" if self.function else "", *self.checks]
        penalty = f", minus {self.missing_eos_penalty} without EOS" if self.missing_eos_penalty else ""
        return " + ".join(p for p in parts if p) + penalty


@dataclass
class Sample:
    """One finished rollout sequence, as the scorers see it."""

    prompt: list[dict[str, str]] | str  # chat messages, or the plain-text prompt
    query_ids: list[int]  # the prompt tokens (no padding)
    response_ids: list[int]  # the real response tokens, up to and including the first EOS
    response_text: str  # the response decoded without special tokens
    ended: bool  # whether the response ended with EOS (False: cut at the length limit)
    reference: str | None = None  # the prompt row's reference answer, if it has one
    row: dict[str, Any] = field(default_factory=dict)  # the prompt row's fields (`answer` = the reference)
    source: str = ""
    line: int = 0

    def response(self) -> Response:
        """What a check sees of this sample."""
        return Response(self.prompt, self.response_text, self.response_ids, self.ended, self.reference, self.row,
                        self.source, self.line)


Scorer = Callable[[list[Sample]], torch.Tensor]


def parse_function(spec: str) -> Callable[[Sample], float]:
    """A `reward.function` spec (`honelm.rl.checks` kinds) → a per-sample scoring function."""
    check = _named(spec)
    return lambda s: check.score(s.response())


def _named(spec: str) -> Check:
    try:
        return parse_check(spec)
    except ConfigError as e:
        raise ConfigError(f"reward.function={spec!r}: {e}") from None


class CheckScorer:
    """Weighted checks (and optionally a reward model's score times its weight) → one score per response."""

    def __init__(self, checks: list[Check], model: "RewardModelScorer | None" = None, model_weight: float = 1.0):
        self.checks, self.model, self.model_weight = checks, model, model_weight
        self.reference_checks = [c for c in checks if c.needs_reference]

    def frozen_models(self) -> list[torch.nn.Module]:
        return self.model.frozen_models() if self.model is not None else []

    def check_rows(self, prompts: list[Any]) -> None:
        """Refuse prompts a reference check cannot score: no reference, or one it cannot use (file and line)."""
        for p in prompts:
            for c in self.reference_checks:
                if p.reference is None:
                    raise DataError(p.source, p.line, "answer", f"is missing: reward check {c.spec} compares each "
                                    "response with its prompt row's answer (an `answer` field, or the row's reply)")
                if c.check_row is not None:
                    c.check_row(p.reference, p.source, p.line)

    def score_and_correct(self, samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B,) scores and (B,) bool: every reference check scored the response positively (None without any)."""
        responses = [s.response() for s in samples]
        values = torch.tensor([[c.score(r) for c in self.checks] for r in responses], dtype=torch.float32)
        values = values.reshape(len(samples), len(self.checks))
        weights = torch.tensor([c.weight for c in self.checks], dtype=torch.float32)
        scores = (values * weights).sum(1)
        if self.model is not None:
            scores = scores + self.model_weight * self.model(samples)
        if not self.reference_checks:
            return scores, None
        which = [i for i, c in enumerate(self.checks) if c.needs_reference]
        return scores, (values[:, which] > 0).all(1)

    def __call__(self, samples: list[Sample]) -> torch.Tensor:
        return self.score_and_correct(samples)[0]


def function_scorer(spec: str, vocab_size: int | None = None, checks: list[str] = ()) -> CheckScorer:
    """The checks of `reward.function` (weight 1) and `reward.checks`, token ids checked against the vocabulary."""
    parsed = ([_named(spec)] if spec else []) + [parse_weighted(item) for item in checks]
    for c in parsed:
        if vocab_size is not None and c.spec.startswith("token:") and int(c.spec[6:]) >= vocab_size:
            raise ConfigError(f"reward.function={c.spec!r}: token id is outside the vocabulary (size {vocab_size})")
    return CheckScorer(parsed)


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

    def score_and_correct(self, samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor | None]:
        scores, correct = score_and_correct(self.base, samples)
        ended = torch.tensor([s.ended for s in samples])
        return scores - self.penalty * (~ended).float(), correct

    def check_rows(self, prompts: list[Any]) -> None:
        check_rows(self.base, prompts)

    def __call__(self, samples: list[Sample]) -> torch.Tensor:
        return self.score_and_correct(samples)[0]


def score_and_correct(scorer: Scorer, samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A scorer's scores and, when it checks answers, which responses are correct."""
    found = getattr(scorer, "score_and_correct", None)
    return found(samples) if callable(found) else (scorer(samples), None)


def check_rows(scorer: Scorer, prompts: list[Any]) -> None:
    """Refuse, before training, prompt rows the scorer's reference checks cannot score."""
    found = getattr(scorer, "check_rows", None)
    if callable(found):
        found(prompts)


def scorer_models(scorer: Scorer) -> list[torch.nn.Module]:
    """The frozen models `scorer` runs (a reward model); none for a programmatic reward."""
    found = getattr(scorer, "frozen_models", None)
    return list(found()) if callable(found) else []


def make_scorer(cfg: RewardConfig, policy_tokenizer: Any, device: torch.device, autocast: Callable[[], Any],
                batch_size: int, trust_remote_code: bool = False) -> Scorer:
    """The scorer the config asks for, with the missing-EOS penalty applied after it."""
    base: Scorer
    model = (RewardModelScorer(cfg.model, policy_tokenizer, device, autocast, batch_size, trust_remote_code)
             if cfg.model else None)
    if cfg.function or cfg.checks:
        base = function_scorer(cfg.function, len(policy_tokenizer), cfg.checks)
        base.model, base.model_weight = model, cfg.model_weight
    else:
        assert model is not None  # RewardConfig.validate: a model, a function or checks
        base = model
    if cfg.missing_eos_penalty == 0:
        return base
    return PenalisedScorer(base, cfg.missing_eos_penalty)
