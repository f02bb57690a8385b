"""Answers of a policy to prompts, sampled or greedy, and greedy answers scored by the reward.

This module owns the generation GRPO's rollouts and every evaluation of a policy's answers share:

* `generate_responses`: responses to left-padded prompts, sampled at temperature T from exactly
  softmax(logits / T) (no top-k/top-p; the generation settings a checkpoint saved are ignored), or
  greedy; the RNG is forked and seeded, so the global RNG never moves.
* `answer_metrics`: greedy answers to held-out prompts scored by the run's reward (its checks
  and/or reward model): `{split}_reward`, `{split}_accuracy` (when a check compares with reference
  answers), `{split}_response_length`, `{split}_ended`, and one score record per prompt (prompt,
  response, reference) for `best/val_predictions.jsonl` and `test_predictions.jsonl`. GRPO's
  validation and `honelm test` on GRPO and PPO runs are this one function.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from honelm.generate import neutral_generation_config, rng_devices
from honelm.predictions import score_records
from honelm.rl.advantages import response_mask
from honelm.rl.prompts import EncodedPrompt
from honelm.rl.rewards import Sample, Scorer, check_rows, score_and_correct
from honelm.rl.rollout import left_pad


def generate_responses(model: nn.Module, query: torch.Tensor, query_mask: torch.Tensor, length: int,
                       eos_id: int | None, pad_id: int, autocast: Callable[[], Any], temperature: float | None,
                       seed: int = 0) -> torch.Tensor:
    """(B, R') response tokens (R' <= length; HF stops when every row has ended), on CPU.

    temperature None: greedy; else sampled from softmax(logits / T) with `seed`, under a forked RNG.
    """
    device = next(model.parameters()).device
    device_type, devices = rng_devices(device)
    sampling: dict[str, Any] = ({"do_sample": False} if temperature is None else
                                {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0})
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=devices, device_type=device_type), torch.no_grad(), autocast(), \
                neutral_generation_config(model):
            torch.manual_seed(seed)
            out = model.generate(input_ids=query.to(device), attention_mask=query_mask.to(device), num_beams=1,
                                 max_new_tokens=length, eos_token_id=eos_id, pad_token_id=pad_id, **sampling)
    finally:
        model.train(was_training)
    return out[:, query.size(1):].cpu()


def to_samples(prompts: list[EncodedPrompt], response: torch.Tensor, mask: torch.Tensor, tokenizer: Any,
               eos_id: int | None) -> list[Sample]:
    """What the scorer reads: each prompt with its real response tokens (up to and including EOS), decoded."""
    samples = []
    for b, p in enumerate(prompts):
        tokens = response[b, :int(mask[b].sum())].tolist()
        samples.append(Sample(p.prompt, p.ids, tokens, tokenizer.decode(tokens, skip_special_tokens=True),
                              eos_id is not None and bool(tokens) and tokens[-1] == eos_id, p.reference, p.fields,
                              p.source, p.line))
    return samples


def greedy_samples(model: nn.Module, tokenizer: Any, prompts: list[EncodedPrompt], length: int,
                   autocast: Callable[[], Any], batch_size: int) -> list[Sample]:
    """Greedy answers to `prompts`, in batches of `batch_size`."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    out: list[Sample] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        query, qmask = left_pad([p.ids for p in chunk], pad)
        response = generate_responses(model, query, qmask, length, eos, pad, autocast, None)
        out.extend(to_samples(chunk, response, response_mask(response, eos), tokenizer, eos))
    return out


def answer_metrics(model: nn.Module, tokenizer: Any, prompts: list[EncodedPrompt], scorer: Scorer, length: int,
                   autocast: Callable[[], Any], batch_size: int, split: str
                   ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """`{split}_*` metrics of greedy answers to `prompts` scored by `scorer`, and one score record per prompt."""
    check_rows(scorer, prompts)
    samples = greedy_samples(model, tokenizer, prompts, length, autocast, batch_size)
    scores, correct = score_and_correct(scorer, samples)
    lengths = [len(s.response_ids) for s in samples]
    sums = dict(reward=scores.tolist())  # the per-example metric `honelm ablate` compares
    metrics = {f"{split}_reward": float(scores.mean()), f"{split}_response_length": sum(lengths) / len(lengths),
               f"{split}_ended": sum(s.ended for s in samples) / len(samples)}
    if correct is not None:
        sums["accuracy"] = correct.float().tolist()
        metrics[f"{split}_accuracy"] = float(correct.float().mean())
    records = score_records([1] * len(samples), sums, prompt=[s.prompt for s in samples],
                            response=[s.response_text for s in samples], reference=[s.reference for s in samples],
                            source=[s.source for s in samples], line=[s.line for s in samples])
    return metrics, records
