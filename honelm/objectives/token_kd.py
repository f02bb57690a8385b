"""Token-level knowledge distillation for causal LMs that share a vocabulary (Hinton et al. 2015;
GKD, Agarwal et al. 2024): the student matches the teacher's next-token distribution on the
response tokens, the teacher's side cached as its top-k.

At each target position (position t of a row whose shifted label y = labels[t+1] is not -100,
the positions `honelm.objectives.lm.CausalLM` trains):

    z          the student's logits (V,);  T the temperature;  log q = log_softmax(z / T) over the vocabulary
    I, l       the teacher's top-k token ids (k,) and its log-probs there, log_softmax(teacher logits)[I]
               at temperature 1 (what `honelm.objectives.lm_teacher` caches)
    p~         = softmax(l / T) over I: the teacher at temperature T renormalised over its top-k. Exact
               for any T from the cache: l / T = z_teacher[I] / T - lse / T and the constant cancels
               in the softmax; the top-k set is the same at every T.
    q~         = softmax(z[I] / T): the student renormalised over the same k ids

    forward    D = sum_I p~ (log p~ - log q[I])           q over the whole vocabulary: student mass
                                                         outside I is penalised through log q. D equals
                                                         KL(p~ || q~) - log sum_I q >= 0; with k = V it is
                                                         the exact KL(p_T || q_T).
    reverse    D = KL(q~ || p~) = sum_I q~ (log q~ - log p~)
    jsd        D = beta KL(p~ || m) + (1 - beta) KL(q~ || m),  m = beta p~ + (1 - beta) q~,  0 < beta < 1
               (GKD's generalized JSD: D / beta -> KL(p~ || q~) as beta -> 0, D / (1 - beta) -> KL(q~ || p~)
               as beta -> 1; beta = 0.5 is the Jensen-Shannon divergence, at most log 2)

    loss per target token = alpha * CE + (1 - alpha) * T^2 * D,     CE = -log softmax(z)[y]  (T = 1)

The formulas above are `tail="renormalise"`: the teacher is renormalised over its top-k, as if the rest
of the vocabulary had probability 0. With a confident teacher the difference is small; with a weak one
(perplexity in the hundreds, where the top-32 hold half the mass or less) forward KL then drives the
student's mass off every token outside the teacher's top-k, the gold token included whenever the
teacher ranked it below k, and the student's loss on the references climbs (measured: docs/distill.md).
The default, `tail="bucket"`, keeps the rest of the vocabulary as one more category:

    r          = 1 - sum_I exp(l): the teacher's mass outside its top-k, at T = 1 (exact from the cache)
    c_teacher  = (l, log r)                          (k + 1,) the teacher's log-probs on {I, the rest}
    c_student  = (log softmax(z)[I], log sum_{j not in I} softmax(z)_j)      the same partition
    p^, q^     = softmax(c_teacher / T), softmax(c_student / T)
    forward D  = KL(p^ || q^);   reverse D = KL(q^ || p^);   jsd as above with p^, q^

At T = 1 this is the exact KL between the two distributions seen through the partition {each of I, the
rest}, a lower bound of the full KL (data processing) that is 0 when the student matches the teacher
on I and in its total tail mass. The temperature is applied to both (k + 1)-category distributions
alike (the tail's own shape is not in the cache); with k = V the rest is empty and every divergence is
the exact one at any T, as with renormalisation.

T^2: the gradient of a divergence between tempered distributions scales as 1/T^2 (Hinton et al.
2015, section 2), so the factor keeps the distillation term's weight against the CE term the same
when T changes. `Loss.value` is the SUM over target tokens (units = their number, as CausalLM);
metrics `ce` and `kd` are the sums of CE and of D (no T^2, no alpha), logged per token.

Teacher tensors in the batch, a FLAT layout over target positions (no padding, memory bounded
by k): batch["teacher_ids"] (N, k) integer and batch["teacher_logprobs"] (N, k) float, where N is
the number of target positions of the batch and row j belongs to the j-th of them in row-major
(row, position) order, the order of `logits[target != -100]` (CausalLM.outputs' rows). Teacher
log-probs below LOGP_FLOOR (-inf of a masked token, fp16 underflow) are raised to it, so a zero
teacher probability gives 0 * finite = 0 rather than NaN.

Memory: the student's logits are projected for the target positions only, a chunk of rows at a
time under activation checkpointing (a chunk's (rows, V) logits are recomputed in the backward
pass instead of being kept), when the output layer is a plain bias-free Linear
(`honelm.objectives.logprobs.final_hidden`); other heads take the full logits.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from honelm.errors import ConfigError, HonelmError
from honelm.objectives.base import Loss, Objective
from honelm.objectives.lm import CausalLM
from honelm.objectives.logprobs import CHUNK_ELEMENTS, IGNORE, final_hidden

Divergence = Literal["forward", "reverse", "jsd"]
DIVERGENCES = ("forward", "reverse", "jsd")
Tail = Literal["bucket", "renormalise"]
TAILS = ("bucket", "renormalise")
LOGP_FLOOR = -1e4  # exp(LOGP_FLOOR / T) is 0 in fp32 for any T <= 100
TEACHER_KEYS = ("teacher_ids", "teacher_logprobs")


def teacher_log_probs(logprobs: torch.Tensor, temperature: float) -> torch.Tensor:
    """log p~ (N, k) in fp32: the cached top-k log-probs at temperature T, renormalised over the k ids."""
    return torch.log_softmax(logprobs.float().clamp(min=LOGP_FLOOR) / temperature, dim=-1)


def coarse_teacher(logprobs: torch.Tensor, temperature: float) -> torch.Tensor:
    """log p^ (N, k + 1) in fp32: the cached top-k log-probs and the rest of the vocabulary as one category,
    at temperature T (tail="bucket" in the module docstring)."""
    lp = logprobs.float().clamp(min=LOGP_FLOOR)
    rest = (1 - lp.exp().sum(-1, keepdim=True)).clamp(min=0)  # a half-precision cache can sum a hair above 1
    return torch.log_softmax(torch.cat([lp, torch.log(rest).clamp(min=LOGP_FLOOR)], -1) / temperature, dim=-1)


def coarse_student(logits: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """log q^ (N, k + 1) in fp32: the student's log-probs at the teacher's top-k ids and of all other tokens
    together, at temperature T."""
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    # the other tokens: the top-k ids filled with a constant far below any logit (exp underflows to 0, and no
    # gradient flows through a filled entry); with k = V every entry is filled and the rest's mass is ~0
    rest = torch.logsumexp(z.scatter(1, ids, LOGP_FLOOR), dim=-1, keepdim=True)
    return torch.log_softmax((torch.cat([z.gather(1, ids), rest], -1) - lse) / temperature, dim=-1)


def divergence(logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
               kind: Divergence = "forward", beta: float = 0.5, temperature: float = 1.0,
               tail: Tail = "renormalise") -> torch.Tensor:
    """D per target position (N,), fp32, of student logits (N, V) against the teacher's top-k (see the
    module docstring; `tail` picks the renormalised or the bucketed form); no T^2 factor here."""
    # with k = V there is no rest: renormalising is then exact, and it ignores the mass that a half-precision
    # cache's rounding would leave for an empty category (enough, against the student's ~0, to swamp the KL)
    if tail == "bucket" and teacher_ids.size(-1) < logits.size(-1):
        logp = coarse_teacher(teacher_logprobs, temperature)
        logq = coarse_student(logits, teacher_ids.long(), temperature)
        return _between(logp, logq, kind, beta)
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {', '.join(TAILS)}, got {tail!r}")
    z = logits.float() / temperature
    logp = teacher_log_probs(teacher_logprobs, temperature)  # (N, k)
    zi = z.gather(1, teacher_ids.long())  # (N, k)
    if kind == "forward":
        logq = zi - torch.logsumexp(z, dim=-1, keepdim=True)  # the student's full softmax at I
        return (logp.exp() * (logp - logq)).sum(-1)
    return _between(logp, torch.log_softmax(zi, dim=-1), kind, beta)  # the student renormalised on I


def _between(logp: torch.Tensor, logq: torch.Tensor, kind: Divergence, beta: float) -> torch.Tensor:
    """forward, reverse or jsd(beta) between two distributions given by their log-probs on one support."""
    p, q = logp.exp(), logq.exp()
    if kind == "forward":
        return (p * (logp - logq)).sum(-1)
    if kind == "reverse":
        return (q * (logq - logp)).sum(-1)
    if kind != "jsd":
        raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}, got {kind!r}")
    logm = torch.logaddexp(logp + math.log(beta), logq + math.log(1 - beta))
    return beta * (p * (logp - logm)).sum(-1) + (1 - beta) * (q * (logq - logm)).sum(-1)


class TokenKD(Objective):
    """alpha * CE(gold) + (1 - alpha) * T^2 * D(teacher top-k, student) summed over target tokens."""

    default_metric = "val_loss"

    def __init__(self, divergence: Divergence = "forward", beta: float = 0.5, temperature: float = 1.0,
                 alpha: float = 0.0, chunk_rows: int | None = None, tail: Tail = "bucket"):
        if divergence not in DIVERGENCES:
            raise ConfigError(f"token KD: divergence must be one of {', '.join(DIVERGENCES)}, got {divergence!r}")
        if tail not in TAILS:
            raise ConfigError(f"token KD: tail must be one of {', '.join(TAILS)}, got {tail!r}")
        if divergence == "jsd" and not 0 < beta < 1:
            raise ConfigError(f"token KD: jsd needs 0 < beta < 1 (beta 0 and 1 make it vanish; use forward or "
                              f"reverse), got {beta}")
        if not (0 < temperature <= 100 and math.isfinite(temperature)):
            raise ConfigError(f"token KD: temperature must be in (0, 100], got {temperature}")
        if not 0 <= alpha <= 1:
            raise ConfigError(f"token KD: alpha (the weight of CE on the gold token) must be in [0, 1], got {alpha}")
        if chunk_rows is not None and chunk_rows < 1:
            raise ConfigError(f"token KD: chunk_rows must be >= 1, got {chunk_rows}")
        self.kind, self.beta, self.temperature, self.alpha = divergence, beta, temperature, alpha
        self.chunk_rows, self.tail = chunk_rows, tail

    def rows_loss(self, logits: torch.Tensor, gold: torch.Tensor, teacher_ids: torch.Tensor,
                  teacher_logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(summed loss, summed CE, summed D) of target rows: logits (n, V), gold (n,), teacher (n, k)."""
        ce = F.cross_entropy(logits.float(), gold, reduction="none")
        d = divergence(logits, teacher_ids, teacher_logprobs, self.kind, self.beta, self.temperature, self.tail)
        total = self.alpha * ce + (1 - self.alpha) * self.temperature ** 2 * d
        return total.sum(), ce.detach().sum(), d.detach().sum()

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> Loss:
        inputs = CausalLM._inputs(batch)
        gold, mask = _targets(batch)
        ids, lps = _teacher(batch, int(mask.sum()))
        found = final_hidden(model, inputs)
        if found is None:  # a head that is not a plain Linear: full logits
            logits = model(**inputs).logits[mask]
            total, ce, d = self.rows_loss(logits, gold[mask], ids, lps)
            return Loss(value=total, units=mask.sum(), metrics={"ce": ce, "kd": d})
        hidden, head, dtype = found
        h, y = hidden[mask], gold[mask]  # (N, d), (N,)
        chunk = self.chunk_rows or max(1, CHUNK_ELEMENTS // head.weight.size(0))
        w = head.weight.to(dtype)
        total, ce, d = h.sum() * 0.0, torch.zeros((), device=h.device), torch.zeros((), device=h.device)
        for s in range(0, h.size(0), chunk):
            part = _chunk_loss(self.rows_loss, h.device.type, dtype)
            args = (h[s:s + chunk], w, y[s:s + chunk], ids[s:s + chunk], lps[s:s + chunk])
            # checkpointed only when a gradient is wanted (under no_grad it would just warn)
            t, c, k = checkpoint(part, *args, use_reentrant=False) if torch.is_grad_enabled() else part(*args)
            total, ce, d = total + t, ce + c, d + k
        return Loss(value=total, units=mask.sum(), metrics={"ce": ce, "kd": d})

    def outputs(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Loss, torch.Tensor]:
        gold, mask = _targets(batch)
        ids, lps = _teacher(batch, int(mask.sum()))
        logits = model(**CausalLM._inputs(batch)).logits[mask].float()  # (units, V), CausalLM.outputs' rows
        total, ce, d = self.rows_loss(logits, gold[mask], ids, lps)
        return Loss(value=total, units=mask.sum(), metrics={"ce": ce, "kd": d}), logits

    def units(self, batch: dict[str, Any]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())


def token_objective(d: Any) -> TokenKD:
    """The token-level KD objective of a `distill` section (honelm.objectives.distill.DistillOptions): every
    setting it has reaches the loss."""
    return TokenKD(d.divergence, d.beta, d.temperature, d.alpha, tail=d.tail)


def _targets(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) shifted labels (position t predicts labels[t+1]) and their target mask."""
    gold = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE)
    return gold, gold != IGNORE


def _teacher(batch: dict[str, Any], n_targets: int) -> tuple[torch.Tensor, torch.Tensor]:
    missing = [k for k in TEACHER_KEYS if k not in batch]
    if missing:
        raise HonelmError(f"token KD: the batch has no {' / '.join(missing)} (wrap the examples with the teacher's "
                          "top-k: honelm.objectives.lm_teacher.WithTeacher)")
    ids, lps = batch["teacher_ids"], batch["teacher_logprobs"]
    if ids.shape != lps.shape or ids.dim() != 2 or ids.size(0) != n_targets:
        raise HonelmError(f"token KD: teacher rows {tuple(ids.shape)} / {tuple(lps.shape)} do not line up with the "
                          f"batch's {n_targets} target tokens (N, k each): the teacher cache belongs to other examples")
    return ids, lps.detach()  # the teacher is a target: no gradient reaches it, whatever computed it


def _chunk_loss(rows_loss: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]], device: str,
                dtype: torch.dtype) -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One chunk's rows through the output layer (in the dtype its matmul would run in) and the loss."""

    def run(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, lps: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.autocast(device, enabled=False):
            return rows_loss((h.to(dtype) @ w.t()).float(), y, ids, lps)

    return run
