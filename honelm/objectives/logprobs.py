"""Summed completion log-probabilities of a causal LM: the quantity DPO (and PPO) compare between models.

For token ids x (B, T) and labels y (B, T) (y = x on the completion, -100 on the prompt and on
padding), the log-probability of row b's completion is

    log π(y_b | x_b) = sum_{t : y[b,t+1] != -100} log softmax(W h[b,t])[y[b,t+1]]

summed (not averaged) over its completion tokens, in fp32 whatever the autocast dtype: a long
completion adds hundreds of per-token terms, and bf16 (8 bits of mantissa) would lose the small
differences between chosen and rejected that DPO trains on (METHODS.md §4.3, pitfall 4).

`sequence_logps` does not build the (B, T, V) logits when it can avoid it: it runs the model
with its output layer switched off (so `.logits` are the final hidden states h, (B, T, d)), keeps
the N completion positions, and scores them with `HeadLogProbs`, which projects through W chunk
by chunk, keeps only each row's log-sum-exp, and recomputes a chunk's logits in the backward
pass. Prompt and padding positions never reach the vocabulary projection, and memory holds one
(chunk, V) block instead of (B, T, V) logits, their fp32 copy and their softmax. Models whose
head is not a plain bias-free Linear (a LoRA-adapted head, logit scaling or soft-capping) take the
plain path: full logits, then `completion_logps`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100
MODEL_KEYS = ("input_ids", "inputs_embeds", "attention_mask", "position_ids")
CHUNK_ELEMENTS = 1 << 23  # logits per chunk (rows x V): 32 MiB in fp32


def completion_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) summed fp32 log-probs of each row's target tokens and (B,) their counts. logits (B, T, V), labels (B, T).

    As in `honelm.objectives.lm`, the labels are shifted left (position t is scored against
    labels[t+1]) instead of slicing the logits, which would copy the (B, T-1, V) tensor.
    """
    b, t, v = logits.shape
    target = F.pad(labels[:, 1:], (0, 1), value=IGNORE)  # (B, T)
    nll = F.cross_entropy(logits.reshape(-1, v).float(), target.reshape(-1), ignore_index=IGNORE,
                          reduction="none")  # (B*T,), 0 where ignored
    return -nll.view(b, t).sum(dim=1), (target != IGNORE).sum(dim=1)


def sum_by_row(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) per-row sums of `values` (N,), one value per True of the (B, T) `mask`, in its row-major order.

    The values are laid into a (B, T) zero tensor and summed over T: the same order of additions on every run and
    device. `index_add` adds them with atomics on CUDA, in an order (and so to last bits) that changes from run to run:
    on an H200 that made resumed runs' validation losses differ near the 9th digit, and this sum made them bit-identical
    (docs/reliability.md, "On a GPU")."""
    dense = values.new_zeros(mask.shape)
    dense[mask] = values
    return dense.sum(dim=1)


class HeadLogProbs(torch.autograd.Function):
    """log softmax(h W^T)[target] per row, h (N, d), W (V, d), targets (N,) → (N,) fp32, chunk by chunk.

    Forward:  z = h W^T (a chunk of rows at a time, in `dtype`), lse = logsumexp(z), out = z[target] - lse.
    Backward: d out / d z = onehot(target) - softmax(z), so with g = grad_out (N,):
              G = g ⊙ (onehot - exp(z - lse))  (chunk, V),  dh = G W,  dW = G^T h,
              z recomputed per chunk from h and W (saved: h, W, targets, lse (N,); never z).
    """

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,  # type: ignore[override]
                dtype: torch.dtype) -> torch.Tensor:
        n, v = h.size(0), weight.size(0)
        chunk = max(1, CHUNK_ELEMENTS // v)
        w = weight.to(dtype)
        out = torch.empty(n, dtype=torch.float32, device=h.device)
        lse = torch.empty(n, dtype=torch.float32, device=h.device)
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, n, chunk):
                z = (h[s:s + chunk].to(dtype) @ w.t()).float()  # (c, V)
                lse[s:s + chunk] = torch.logsumexp(z, dim=-1)
                out[s:s + chunk] = z.gather(1, targets[s:s + chunk, None]).squeeze(1) - lse[s:s + chunk]
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.dtype, ctx.chunk = dtype, chunk
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor  # type: ignore[override]
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        h, weight, targets, lse = ctx.saved_tensors
        dtype, chunk = ctx.dtype, ctx.chunk
        w = weight.to(dtype)
        dh = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        grad = grad.float()
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, h.size(0), chunk):
                hc, gc = h[s:s + chunk].to(dtype), grad[s:s + chunk, None]  # (c, d), (c, 1)
                p = torch.exp((hc @ w.t()).float() - lse[s:s + chunk, None])  # softmax (c, V)
                g = (-gc * p).scatter_add_(1, targets[s:s + chunk, None], gc).to(dtype)  # g ⊙ (onehot - p)
                if dh is not None:
                    dh[s:s + chunk] = (g @ w).to(h.dtype)
                if dw is not None:
                    dw += (g.t() @ hc).float()
        return dh, (dw.to(weight.dtype) if dw is not None else None), None, None


class HeadNLLSum(torch.autograd.Function):
    """sum_i -log softmax(h_i W^T)[target_i] for h (N, d), W (V, d), targets (N,) → fp32 scalar, chunk by chunk,
    with the gradient computed in the forward pass (a fused linear cross-entropy).

    The output is one scalar, so its gradient is one number g and
        d loss / d h = g (softmax(z) - onehot) W,    d loss / d W = g (softmax(z) - onehot)^T h
    can be formed while each chunk's logits z = h W^T are at hand, with g applied in the backward
    pass. Against the plain path (B, T, V) logits, their fp32 copy and their log-softmax are never
    stored, and unlike `HeadLogProbs` (per-row outputs, whose gradient must wait for the backward)
    no chunk's logits are computed twice. Per chunk: z in `dtype` (the autocast dtype, as the plain
    path's head would produce), log-softmax in fp32, the gradient cast to `dtype` for its two
    matmuls, d W accumulated in fp32. `need_h` / `need_w` (the caller knows whether a gradient will
    be wanted; inside forward grad mode is off) skip the gradient work nobody reads: a frozen head
    under LoRA, or evaluation.
    """

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,  # type: ignore[override]
                dtype: torch.dtype, need_h: bool, need_w: bool) -> torch.Tensor:
        n, v = h.size(0), weight.size(0)
        chunk = max(1, CHUNK_ELEMENTS // v)
        w = weight.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        dh = torch.empty_like(h) if need_h else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, n, chunk):
                hc, tc = h[s:s + chunk].to(dtype), targets[s:s + chunk, None]  # (c, d), (c, 1)
                logp = torch.log_softmax(hc @ w.t(), dim=-1, dtype=torch.float32)  # (c, V)
                total -= logp.gather(1, tc).sum()
                if dh is None and dw is None:
                    continue
                g = logp.exp_().scatter_add_(1, tc, torch.full_like(tc, -1, dtype=logp.dtype)).to(dtype)  # p - onehot
                if dh is not None:
                    dh[s:s + chunk] = (g @ w).to(h.dtype)
                if dw is not None:
                    dw += (g.t() @ hc).float()
        ctx.save_for_backward(*(t for t in (dh, dw) if t is not None))
        ctx.has = (dh is not None, dw is not None)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor  # type: ignore[override]
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None, None]:
        saved = list(ctx.saved_tensors)
        dh = saved.pop(0) if ctx.has[0] else None
        dw = saved.pop(0) if ctx.has[1] else None
        if (ctx.needs_input_grad[0] and dh is None) or (ctx.needs_input_grad[1] and dw is None):
            raise RuntimeError("HeadNLLSum: a gradient was asked for that the forward pass was told not to compute")
        g = grad.float()
        return ((dh * g.to(dh.dtype)) if dh is not None else None,
                (dw * g).to(ctx.weight_dtype) if dw is not None else None, None, None, None, None)


def head_nll_sum(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Summed next-token NLL of rows h (N, d) through a bias-free output layer W (V, d) (see `HeadNLLSum`)."""
    grad = torch.is_grad_enabled()
    return HeadNLLSum.apply(h, weight, targets, dtype, grad and h.requires_grad, grad and weight.requires_grad)


def unwrap(model: nn.Module) -> nn.Module:
    """The module under a DDP / torch.compile wrapper (the peft model itself, if any)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model


def transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model under DDP / torch.compile / peft wrappers."""
    model = unwrap(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def plain_head(model: nn.Module) -> tuple[nn.Module, str] | None:
    """(the transformers model, its output layer's attribute name) when the head is a bias-free nn.Linear
    applied as is (no LoRA on it, no logit scaling or soft-capping); else None."""
    base = transformers_model(model)
    get = getattr(base, "get_output_embeddings", None)
    head = get() if get is not None else None
    config = getattr(base, "config", None)
    if type(head) is not nn.Linear or head.bias is not None or config is None:
        return None
    if any(getattr(config, k, None) not in (None, 1.0) for k in ("final_logit_softcapping", "logit_scale",
                                                                  "logits_scaling", "output_multiplier")):
        return None
    name = next((n for n, m in base.named_children() if m is head), None)
    return (base, name) if name is not None else None


@contextlib.contextmanager
def head_switched_off(base: nn.Module, name: str) -> Iterator[nn.Linear]:
    """Replace the output layer by an identity for the block, so `.logits` are the final hidden states."""
    head = getattr(base, name)
    setattr(base, name, nn.Identity())
    try:
        yield head
    finally:
        setattr(base, name, head)


def final_hidden(model: nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, nn.Linear, torch.dtype] | None:
    """(final hidden states (B, T, d), the output layer, the dtype its matmul would run in) from one
    forward pass with the output layer switched off; None when the head is not a plain Linear (see
    `plain_head`) or the model is compiled (swapping a module would make it recompile), in which
    case the caller runs the model as is."""
    found = None if hasattr(model, "_orig_mod") else plain_head(model)
    if found is None:
        return None
    base, name = found
    with head_switched_off(base, name) as head:
        hidden = model(**inputs).logits  # (B, T, d): the head is an identity here
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else head.weight.dtype
    return hidden, head, dtype


def sequence_logps(model: nn.Module, batch: dict[str, Any], right_padded: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a causal LM on `batch`; (B,) summed fp32 completion log-probs of its `labels`, and (B,) counts.

    `right_padded=True` (every row's padding at its end) leaves the attention mask out: under the
    causal mask no real token can see a later pad, so real positions are unchanged (exactly), pad
    positions carry no label, and attention runs as plain causal attention (SDPA's is_causal path,
    no (B, heads, T, T) mask).
    """
    keys = MODEL_KEYS if not right_padded else tuple(k for k in MODEL_KEYS if k != "attention_mask")
    return target_logps(model, {k: v for k, v in batch.items() if k in keys}, batch["labels"])


def target_logps(model: nn.Module, inputs: dict[str, Any], labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`model(**inputs)`'s (B,) summed fp32 log-probs of each row's target tokens (`labels` shifted, as
    `completion_logps`) and (B,) their counts, without the (B, T, V) logits when the head allows."""
    found = final_hidden(model, inputs)
    if found is None:
        return completion_logps(model(**inputs).logits, labels)  # (B, T, V) logits
    hidden, head, dtype = found
    target = F.pad(labels[:, 1:], (0, 1), value=IGNORE)  # (B, T): position t predicts labels[t+1]
    mask = target != IGNORE
    per_token = HeadLogProbs.apply(hidden[mask], head.weight, target[mask], dtype)  # (N,)
    return sum_by_row(per_token, mask), mask.sum(dim=1)
