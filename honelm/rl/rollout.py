"""The rollout stream: PPO's minibatches, fed to the one training loop (`honelm.loop.fit`).

PPO is not a second loop. `RolloutStream` has the interface `fit` reads from a `BatchStream`
(`next_step`, `position`, `n`, `step_items`, `epoch`, `bs`, `accum`, `probe_batch`), and each
optimizer step of `fit` is one PPO minibatch. When the minibatches of the current rollout are
used up (ppo_epochs passes, each cut into rollout_batch / (batch_size × grad_accum)
minibatches), the stream samples a new rollout with the current policy under no_grad:

  1. sample a response for each of rollout_batch prompts at temperature T (no top-k/top-p: the
     log-probabilities must be those of softmax(logits / T), which the loss recomputes);
  2. one forward of the policy (log π_old, V_old) and of the frozen reference (log π_ref), both
     at temperature T, under the precision the loop trains in;
  3. score each response (`honelm.rl.rewards`);
  4. per-token rewards (KL penalty on every real token, score on the last), optional reward
     whitening, GAE, whitened advantages (`honelm.rl.advantages`).

Everything after the first EOS of a response is masked out. Determinism and resume: rollout k
samples with a seed derived from (run seed, k, rank) and minibatch e of it uses a permutation
seeded by (run seed, k, e), so the stream is a pure function of the step and the weights. Each
rollout is saved under RUN/rollouts/ when it is made, so `--resume` from a checkpoint in the
middle of a rollout trains on exactly the same minibatches; files no checkpoint can need are
deleted. With several processes each one samples its own rollout_batch prompts (whitening is
per process), as TRL does.

Held-out prompts are sampled with fixed seeds: `validate_policy` (the val_* metrics) and
`write_samples` (the final policy's responses, samples.jsonl).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

import torch

from honelm.bounds import PROBABILITY, above, at_least
from honelm.checkpoint import STEP_DIR, list_checkpoints
from honelm.errors import ConfigError, HonelmError
from honelm.generate import rng_devices
from honelm.loop import BatchStream
from honelm.objectives.ppo import response_logits, token_logprobs
from honelm.rl.advantages import gae, kl_estimate, masked_whiten, response_mask, token_rewards
from honelm.rl.policy import PolicyWithValue, Reference
from honelm.rl.prompts import EncodedPrompt
from honelm.rl.rewards import Sample, Scorer, scorer_models

Batch = dict[str, Any]


@dataclass
class PPOOptions:
    """PPO: rollouts, the KL penalty, advantages, clipping and the value function."""

    rollout_batch: Annotated[int, at_least(1)] = 32
    """Prompts sampled per rollout (per process); a multiple of train.batch_size x train.grad_accum (the minibatch)."""
    ppo_epochs: Annotated[int, at_least(1)] = 4
    """Passes over each rollout; each pass is cut into rollout_batch / minibatch optimizer steps."""
    response_length: Annotated[int, at_least(1)] = 48
    """Most tokens sampled per response; a response stops earlier at EOS."""
    temperature: Annotated[float, above(0)] = 0.7
    """Sampling temperature T (> 0); the loss recomputes log-probabilities of softmax(logits / T), so both agree."""
    kl_coef: Annotated[float, at_least(0)] = 0.05
    """beta of the per-token KL penalty -beta * KL_t to the reference (the starting policy)."""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """Per-token KL estimate: k1 = log pi - log pi_ref (unbiased, can be negative) or k3 = (r - 1) - log r, r = pi_ref/pi (never negative)."""
    clip: Annotated[float, above(0)] = 0.2
    """Policy ratio clip epsilon: the surrogate ignores ratios beyond 1 +- clip in the direction the advantage favours."""
    clip_value: Annotated[float, above(0)] = 0.2
    """Value clip: the value loss also scores V_old + clip(V - V_old, +-clip_value) and takes the larger loss."""
    vf_coef: Annotated[float, at_least(0)] = 0.1
    """Weight of the value loss in the total loss."""
    gamma: Annotated[float, PROBABILITY] = 1.0
    """Discount of GAE (1 = none, as InstructGPT and TRL)."""
    lam: Annotated[float, PROBABILITY] = 0.95
    """lambda of GAE (bias-variance trade-off of the advantage estimate)."""
    whiten_rewards: bool = False
    """Whiten the per-token rewards of each rollout (scale only: the mean is kept) before GAE; advantages are always whitened."""
    value_model: Literal["shared", "separate"] = "shared"
    """Value function: shared = a scalar head on the policy's last hidden states; separate = its own trunk and head (twice the compute, no interference)."""
    value_init: str = ""
    """Separate value model: the checkpoint it starts from (a reward model or any decoder); empty = reward.model when set, else the policy's start."""

    def validate(self) -> None:
        """The range of every number is declared on its field (honelm.bounds); this checks what spans fields."""
        if self.value_init and self.value_model != "separate":
            raise ConfigError("ppo.value_init applies to ppo.value_model=separate only")


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across runs and platforms, unlike hash())."""
    digest = hashlib.sha256(",".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), each (B, W), W the longest row: a decoder continues from the last column."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids, mask


# ----------------------------------------------------------------------------------------------
# one batch of samples: generate, forward, score


@dataclass
class Sampled:
    """Responses to a batch of prompts with everything measured on them (CPU tensors).

    input_ids / attention_mask / position_ids: (B, Q+R) [left-padded query | response];
    response, mask, logprobs, ref_logprobs, values: (B, R); scores, ended: (B,).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    query_width: int
    response: torch.Tensor
    mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    ended: torch.Tensor  # (B,) bool: the response ended with EOS (else it hit the length limit)


@dataclass
class Sampler:
    """What sampling and scoring need: the models, the scorer, token ids and settings."""

    model: PolicyWithValue
    reference: Reference
    scorer: Scorer
    tokenizer: Any
    opts: PPOOptions
    eos_id: int | None
    pad_id: int
    autocast: Callable[[], Any]
    chunk: int  # rows per forward pass

    def frozen_models(self) -> list[torch.nn.Module]:
        """The models sampling runs but never trains (a reference copy, a reward model): `TrainPlan.frozen_models`."""
        return [*self.reference.frozen_models(), *scorer_models(self.scorer)]

    def generate(self, query: torch.Tensor, query_mask: torch.Tensor, seed: int) -> torch.Tensor:
        """(B, R') sampled response tokens, R' <= response_length (HF stops when every row has ended)."""
        device = next(self.model.parameters()).device
        device_type, devices = rng_devices(device)
        with torch.random.fork_rng(devices=devices, device_type=device_type), torch.no_grad(), self.autocast():
            torch.manual_seed(seed)
            out = self.model.generate(input_ids=query.to(device), attention_mask=query_mask.to(device), do_sample=True,
                                      temperature=self.opts.temperature, top_k=0, top_p=1.0, num_beams=1,
                                      max_new_tokens=self.opts.response_length, eos_token_id=self.eos_id,
                                      pad_token_id=self.pad_id)
        return out[:, query.size(1):].cpu()

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, q: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """log π_old, log π_ref (tempered) and V_old of the response tokens, each (B, R), in chunks."""
        device = next(self.model.parameters()).device
        T = self.opts.temperature
        logp, ref_logp, values = [], [], []
        for start in range(0, ids.size(0), self.chunk):
            i, m, p = (t[start:start + self.chunk].to(device) for t in (ids, mask, pos))
            response = i[:, q:]
            with self.autocast():
                logits, v = self.model(input_ids=i, attention_mask=m, position_ids=p)
            logp.append(token_logprobs(response_logits(logits, q, T), response).cpu())
            values.append(v[:, q - 1:-1].float().cpu())
            ref = self.reference.logits(i, m, p, self.autocast)
            ref_logp.append(token_logprobs(response_logits(ref, q, T), response).cpu())
        return torch.cat(logp), torch.cat(ref_logp), torch.cat(values)

    def sample(self, prompts: list[EncodedPrompt], seed: int) -> Sampled:
        was_training = self.model.training
        self.model.eval()
        try:
            query, query_mask = left_pad([p.ids for p in prompts], self.pad_id)
            response = self.generate(query, query_mask, seed)
            mask = response_mask(response, self.eos_id)  # (B, R): up to and including the first EOS
            response = response.masked_fill(mask == 0, self.pad_id)
            ids = torch.cat([query, response], 1)
            attention = torch.cat([query_mask, mask.long()], 1)
            position = (attention.cumsum(1) - 1).clamp_min(0)  # as generate numbered them: pads don't count
            q = query.size(1)
            logp, ref_logp, values = self.forward(ids, attention, position, q)
        finally:
            self.model.train(was_training)
        samples = []
        for b, p in enumerate(prompts):
            n = int(mask[b].sum())
            tokens = response[b, :n].tolist()
            samples.append(Sample(p.prompt, p.ids, tokens, self.tokenizer.decode(tokens, skip_special_tokens=True),
                                  self.eos_id is not None and tokens[-1] == self.eos_id, p.reference, p.fields,
                                  p.source, p.line))
        scores = self.scorer(samples).float().cpu()
        if scores.shape != (len(prompts),):
            raise HonelmError(f"the reward returned shape {tuple(scores.shape)} for {len(prompts)} responses")
        ended = torch.tensor([x.ended for x in samples])
        return Sampled(ids, attention, position, q, response, mask, logp * mask, ref_logp * mask, values * mask, scores,
                       ended)


def sample_stats(s: Sampled, opts: PPOOptions, prefix: str = "") -> dict[str, float]:
    """Per-sequence means of what a rollout (or a validation pass) measured."""
    kl = kl_estimate(s.logprobs, s.ref_logprobs, opts.kl_estimator) * s.mask
    kl_seq = kl.sum(1)  # (B,) summed over each response's real tokens
    lengths = s.mask.sum(1)
    stats = {"score": float(s.scores.mean()), "score_std": float(s.scores.std()) if len(s.scores) > 1 else 0.0,
             "kl": float(kl_seq.mean()), "non_score_reward": float((-opts.kl_coef * kl_seq).mean()),
             "response_length": float(lengths.mean()), "ended": float(s.ended.float().mean()),
             "sample_nll": float(-(s.logprobs.sum() / s.mask.sum().clamp_min(1)))}
    stats["rlhf_reward"] = stats["score"] + stats["non_score_reward"]
    return {f"{prefix}{k}": v for k, v in stats.items()}


# ----------------------------------------------------------------------------------------------
# a rollout: samples + advantages, cut into minibatches


@dataclass
class Rollout:
    """One rollout, ready for PPO: [query | response] rows and per-response-token targets, on CPU."""

    index: int
    input_ids: torch.Tensor  # (N, Q+R)
    attention_mask: torch.Tensor  # (N, Q+R)
    position_ids: torch.Tensor  # (N, Q+R)
    query_width: int
    response_mask: torch.Tensor  # (N, R)
    old_logprobs: torch.Tensor  # (N, R)
    old_values: torch.Tensor  # (N, R)
    advantages: torch.Tensor  # (N, R)
    returns: torch.Tensor  # (N, R)
    stats: dict[str, float] = field(default_factory=dict)

    _TENSORS = ("input_ids", "attention_mask", "position_ids", "response_mask", "old_logprobs", "old_values",
                "advantages", "returns")

    def __len__(self) -> int:
        return self.input_ids.size(0)

    def collate(self, rows: list[int]) -> Batch:
        """A micro-batch of these rows, cut to the columns any of them uses.

        Query columns that are padding in every row and response columns after every row's last
        real token are dropped; what is left is computed exactly as in the full rollout.
        """
        idx = torch.tensor(rows, dtype=torch.long)
        q = self.query_width
        lead = int((self.attention_mask[idx, :q].sum(0) == 0).sum())  # left padding shared by all rows
        width = int(self.response_mask[idx].sum(1).max())
        batch: Batch = {k: getattr(self, k)[idx, lead:q + width] for k in ("input_ids", "attention_mask", "position_ids")}
        batch.update({k: getattr(self, k)[idx, :width] for k in ("response_mask", "old_logprobs", "old_values",
                                                                 "advantages", "returns")})
        batch["query_width"] = q - lead
        return batch

    def save(self, path: Path) -> None:
        tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
        payload = {k: getattr(self, k) for k in self._TENSORS}
        payload.update(index=self.index, query_width=self.query_width, stats=dict(self.stats))
        torch.save(payload, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "Rollout":
        data = torch.load(path, weights_only=True)
        return cls(**data)


def build_rollout(index: int, s: Sampled, opts: PPOOptions) -> Rollout:
    """Per-token rewards, GAE and whitened advantages of a batch of samples (all (B, R), masked)."""
    kl = kl_estimate(s.logprobs, s.ref_logprobs, opts.kl_estimator) * s.mask
    rewards = token_rewards(s.scores, kl, s.mask, opts.kl_coef)
    if opts.whiten_rewards:
        rewards = masked_whiten(rewards, s.mask, shift_mean=False)
    advantages, returns = gae(rewards, s.values, s.mask, opts.gamma, opts.lam)
    advantages = masked_whiten(advantages, s.mask, shift_mean=True)
    return Rollout(index, s.input_ids, s.attention_mask, s.position_ids, s.query_width, s.mask, s.logprobs,
                   s.values, advantages, returns)


# ----------------------------------------------------------------------------------------------
# the stream fit() reads


class RolloutStream:
    """PPO minibatches for `fit`: one optimizer step = one minibatch; new rollouts as needed (see module doc)."""

    rollout_type: Any = Rollout
    """What `_build` makes and a resumed run loads (`load(path)`)."""

    def __init__(self, sampler: Any, prompts: list[EncodedPrompt], batch_size: int, grad_accum: int, seed: int,
                 world: int = 1, rank: int = 0, run_dir: Path | None = None, tracker: Any = None):
        opts = sampler.opts
        self.per_rollout, epochs, rows, what = self.shape(opts)
        minibatch = batch_size * grad_accum
        if rows % minibatch:
            raise ConfigError(f"{what} must be a multiple of the minibatch train.batch_size x train.grad_accum = "
                              f"{minibatch}")
        self.sampler, self.prompts, self.opts = sampler, prompts, opts
        self.bs, self.accum, self.seed, self.world, self.rank = batch_size, grad_accum, seed, world, rank
        self.minibatches = rows // minibatch  # optimizer steps per pass over a rollout
        self.steps_per_rollout = epochs * self.minibatches
        # one "item" is one sequence seen by one epoch: a pass over the prompts is n items
        self.n = len(prompts) * epochs * (rows // self.per_rollout)
        self.position = 0
        self.run_dir, self.tracker = run_dir, tracker
        self._order = BatchStream(len(prompts), lambda idx: idx, self.per_rollout, 1, seed, world, rank)
        self._current: Any = None
        self.rollout_times: list[float] = []

    @property
    def step_items(self) -> int:
        return self.bs * self.accum * self.world

    @property
    def epoch(self) -> float:
        """Passes over the prompts so far."""
        return self.position / self.n

    # -- rollouts ------------------------------------------------------------------------------

    def _path(self, index: int) -> Path | None:
        if self.run_dir is None:
            return None
        suffix = f"-rank{self.rank}" if self.rank else ""
        return self.run_dir / "rollouts" / f"rollout-{index:06d}{suffix}.pt"

    @staticmethod
    def shape(opts: Any) -> tuple[int, int, int, str]:
        """(prompts per rollout, epochs over it, sequences in it, the setting that sizes it) of `opts`."""
        return opts.rollout_batch, opts.ppo_epochs, opts.rollout_batch, f"ppo.rollout_batch={opts.rollout_batch}"

    def _build(self, index: int, chosen: list[EncodedPrompt], seed: int) -> Any:
        """A rollout of the chosen prompts, sampled with `seed`, with its statistics (PPO: `build_rollout`)."""
        sampled = self.sampler.sample(chosen, seed)
        rollout = build_rollout(index, sampled, self.opts)
        rollout.stats = sample_stats(sampled, self.opts)
        return rollout

    def _make(self, index: int, step: int) -> Any:
        started = time.perf_counter()
        self._order.position = index * self.per_rollout * self.world
        chosen = [self.prompts[i] for i in self._order.next_step()[0]]
        rollout = self._build(index, chosen, derived_seed(self.seed, index, self.rank, 1))
        rollout.stats = {**rollout.stats, "time_s": round(time.perf_counter() - started, 3)}
        self.rollout_times.append(rollout.stats["time_s"])
        path = self._path(index)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            rollout.save(path)
            self._prune(index)
        if self.tracker is not None:
            self.tracker.event("rollout", step, rollout=index, **rollout.stats)
        return rollout

    def _prune(self, current: int) -> None:
        """Delete saved rollouts that neither the current step nor any checkpoint can resume into."""
        assert self.run_dir is not None
        needed = {current}
        for ckpt in list_checkpoints(self.run_dir / "checkpoints"):
            step = int(STEP_DIR.match(ckpt.name).group(1))  # type: ignore[union-attr]
            k, j = divmod(step, self.steps_per_rollout)
            if j:
                needed.add(k)
        suffix = f"-rank{self.rank}" if self.rank else ""
        for f in (self.run_dir / "rollouts").glob(f"rollout-*{suffix}.pt"):
            stem = f.stem[len("rollout-"):]
            if self.rank == 0 and "-rank" in stem:
                continue
            index = int(stem.split("-")[0])
            if index not in needed:
                f.unlink(missing_ok=True)

    def rollout_for(self, index: int, fresh: bool, step: int) -> Any:
        if self._current is not None and self._current.index == index:
            return self._current
        if fresh:
            self._current = self._make(index, step)
        else:  # resumed in the middle of a rollout: train on exactly the one saved then
            path = self._path(index)
            if path is None or not path.is_file():
                raise HonelmError(f"resuming at step {step} needs rollout {index}, saved as {path}, which is missing")
            self._current = self.rollout_type.load(path)
        return self._current

    # -- the BatchStream interface -------------------------------------------------------------

    def next_step(self) -> list[Batch]:
        """The micro-batches of the next PPO minibatch (this process's share)."""
        step = self.position // self.step_items
        index, j = divmod(step, self.steps_per_rollout)
        rollout = self.rollout_for(index, fresh=j == 0, step=step)
        epoch, m = divmod(j, self.minibatches)
        g = torch.Generator().manual_seed(derived_seed(self.seed, index, epoch, 2))
        order = torch.randperm(len(rollout), generator=g).tolist()
        size = self.bs * self.accum
        chosen = order[m * size:(m + 1) * size]
        self.position += self.step_items
        return [rollout.collate(chosen[a * self.bs:(a + 1) * self.bs]) for a in range(self.accum)]

    def probe_batch(self) -> Batch:
        """A micro-batch of the shape training will see (prompts + a full-length response), for the
        loop's precision probe; made without sampling, so it neither costs a rollout nor moves an RNG."""
        prompts = [self.prompts[i % len(self.prompts)] for i in range(self.bs)]
        query, qmask = left_pad([p.ids for p in prompts], self.sampler.pad_id)
        width = self.opts.response_length
        response = torch.full((len(prompts), width), prompts[0].ids[-1], dtype=torch.long)
        attention = torch.cat([qmask, torch.ones_like(response)], 1)
        zeros = torch.zeros(len(prompts), width)
        fake = Rollout(-1, torch.cat([query, response], 1), attention, (attention.cumsum(1) - 1).clamp_min(0),
                       query.size(1), torch.ones(len(prompts), width), zeros, zeros, zeros, zeros)
        return fake.collate(list(range(len(prompts))))


def validate_policy(sampler: Sampler, prompts: list[EncodedPrompt], seed: int) -> dict[str, float]:
    """Score, KL to the reference and response length of samples on held-out prompts (val_* metrics).

    The sampling seed is fixed, so successive evaluations differ only by the policy.
    """
    parts = [sampler.sample(prompts[i:i + sampler.opts.rollout_batch], derived_seed(seed, i, 3))
             for i in range(0, len(prompts), sampler.opts.rollout_batch)]
    n = sum(len(p.scores) for p in parts)
    out: dict[str, float] = {}
    for p in parts:
        for k, v in sample_stats(p, sampler.opts, "val_").items():
            out[k] = out.get(k, 0.0) + v * len(p.scores) / n
    out.pop("val_score_std", None)  # a weighted mean of stds is not a std
    return out


def write_samples(path: Path, sampler: Sampler, prompts: list[EncodedPrompt], seed: int, limit: int = 16) -> None:
    """A few validation prompts with the final policy's responses and their scores (samples.jsonl)."""
    chosen = prompts[:limit]
    s = sampler.sample(chosen, derived_seed(seed, 4))
    with open(path, "w", encoding="utf-8") as handle:
        for b, p in enumerate(chosen):
            n = int(s.mask[b].sum())
            text = sampler.tokenizer.decode(s.response[b, :n].tolist(), skip_special_tokens=True)
            handle.write(json.dumps({"prompt": p.prompt, "response": text, "score": float(s.scores[b]),
                                     "ended": bool(s.ended[b]), "source": p.source, "line": p.line},
                                    ensure_ascii=False) + "\n")
