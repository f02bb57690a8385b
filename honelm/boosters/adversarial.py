"""Adversarial and noise training on the word-embedding output: one objective wrapper for all methods.

`Adversarial(inner, cfg, special_ids)` wraps any objective (classification, causal LM, masked LM,
and later SFT and reward) and overrides its per-micro-batch `step`; the loop does not know it is
there. Every method perturbs the *activation* e = Emb(x) (the word-embedding output, before
position/type embeddings and LayerNorm) through a forward hook on the model's input-embedding
module, never the embedding weight matrix, so it works with LoRA and frozen embeddings, with
decoders that find the last real token from `input_ids`, and under DDP.

Notation (METHODS.md §3): δ is the perturbation (B, T, d), kept in fp32 whatever the autocast;
m the perturbable positions (attention mask, minus special tokens unless `perturb_special`);
norms are per example: ‖δ_i‖₂ over its (T_i × d) slice, or max |δ_i| for linf. Every loss is a
SUM over the inner objective's units, scaled by the loop's `scale`, so gradient accumulation and
clipping stay exact.

  fgm      L(e) + λ·L(e + ε·g/‖g‖),  g = ∇_e L(e) taken from the clean backward (Miyato et al. 2017).
  pgd      L(e + δ_K) (the min-max of Madry et al. 2018): K ascent steps δ ← Π_ε(δ + α·ĝ)
           (ĝ = g/‖g‖₂, or sign(g) for linf) from 0 or a random start, each differentiating
           w.r.t. δ only; then one backward into θ.
  freelb   (1/K)·Σ_t L(e + δ_t): K passes, θ-gradients averaged over them, δ ← Π_ε(δ + α·g/‖g‖)
           between passes, δ₀ ~ U(-1,1)·init/√(T_i·d) (l2) or U(-init, init) (linf), the same
           dropout masks in every pass; ε = inf means no projection (Zhu et al. 2020).
  smart    L(e) + λ·SKL(f(e), f(e + δ)), δ from K ascent steps on KL(f(e+δ) ‖ f(e)) from
           N(0, σ²) noise, projected to an explicit radius ε (Jiang et al. 2020).
  r3f      L(e) + λ·SKL(f(e), f(e + z)), z ~ U(-ε, ε) or N(0, ε²), gradient through both sides
           (Aghajanyan et al. 2021). On language modelling the rows are target tokens only.
  vat      L(e) + λ·KL(p ‖ f(e + ε·d/‖d‖)), p = f(e) held fixed, d from K power iterations from a
           random probe of size ξ (Miyato et al. 2016/2017). Needs no labels.
  neftune  L(e + U(-1,1)·α/√(T_i·d)) on real tokens only, T_i the example's real length (Jain et
           al. 2023; their hook uses the padded length and also noises padding).
  plae     L(e) + λ·L(e + δ_stored): δ from PGD against a fine-tuned teacher, stored per training
           example (Kim and Kang 2022; the two-stage flow is in `honelm.boosters.plae`).

SKL(p, q) = KL(p‖q) + KL(q‖p) = Σ (p − q)(log p − log q) per unit row (squared error for
regression outputs). Peak memory does not grow with K: every pass either back-propagates at once
(θ-gradients accumulate in `.grad`) or differentiates w.r.t. δ alone, so at most two graphs (a
clean one and a perturbed one, for the consistency regularisers) are alive at a time.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn

from honelm.boosters.base import LABELS
from honelm.errors import ConfigError, HonelmError
from honelm.objectives.base import Loss, Objective

METHODS = ("none", "fgm", "pgd", "freelb", "smart", "r3f", "vat", "neftune", "plae")

# Per-method defaults for the fields left at None (README "Adversarial training" has the table and
# the reasons). ε is a per-example radius in raw word-embedding space, except: r3f's noise
# half-width, neftune's α, freelb's optional projection. 0.2 matches the size FreeLB's published
# settings reach (adv_lr 0.1 from an init of 0.2/√3: ‖δ‖ ≈ 0.15-0.3); an example's whole embedding
# has norm ≈ 5 in MiniLM (≈ 1.1 per token), and fgm at ε = 1 made MiniLM on 500 SST-2 examples
# collapse to one class on validation (docs/benchmarks.md).
DEFAULTS: dict[str, dict[str, Any]] = {
    "fgm": {"epsilon": 0.2, "steps": 1, "weight": 1.0},
    # pgd trains on L(e + δ_K) alone: at ε 0.2 (with α 0.1, K 3) MiniLM on 500 or 2,000 SST-2 examples stayed at
    # the majority class on all six runs (as plae's teacher); at ε 0.05 it trained to plain's validation accuracy.
    "pgd": {"epsilon": 0.05, "step_size": 0.025, "steps": 3, "init_mag": 0.0},
    "freelb": {"epsilon": math.inf, "step_size": 0.1, "steps": 2, "init_mag": 0.2},
    "smart": {"epsilon": 0.2, "step_size": 0.2, "steps": 1, "init_mag": 1e-3, "weight": 1.0},
    "r3f": {"epsilon": 1e-5, "weight": 1.0},
    "vat": {"epsilon": 0.2, "steps": 1, "init_mag": 0.02, "weight": 1.0},
    "neftune": {"epsilon": 5.0},
    # plae's teacher is pgd training, and its δ then augments a student that has not learned the task yet: at
    # ε 0.2 the teacher never learned and the students lost up to 18 points on SST-2; ε 0.05 was the best of
    # 0.05 / 0.1 / 0.2 on validation (docs/benchmarks.md, "Choosing plae's ε").
    "plae": {"epsilon": 0.05, "step_size": 0.025, "steps": 3, "init_mag": 0.0, "weight": 1.0},
}
# Which fields each method reads (anything else set explicitly is an error, not silently ignored).
USES: dict[str, set[str]] = {
    "fgm": {"epsilon", "steps", "weight", "norm"},
    "pgd": {"epsilon", "step_size", "steps", "init_mag", "norm"},
    "freelb": {"epsilon", "step_size", "steps", "init_mag", "norm"},
    "smart": {"epsilon", "step_size", "steps", "init_mag", "weight", "norm"},
    "r3f": {"epsilon", "weight", "noise"},
    "vat": {"epsilon", "steps", "init_mag", "weight"},
    "neftune": {"epsilon"},
    "plae": {"epsilon", "step_size", "steps", "init_mag", "weight", "norm", "copies", "teacher"},
}


@dataclass
class AdversarialConfig:
    """Adversarial / noise training on the word-embedding output (a field left empty takes the method's default)."""

    method: Literal["none", "fgm", "pgd", "freelb", "smart", "r3f", "vat", "neftune", "plae"] = "none"
    """none, fgm, pgd, freelb, smart, r3f, vat, neftune or plae (README: papers, defaults, cost)."""
    epsilon: float | None = None
    """Size of the perturbation. fgm/pgd/smart/vat/plae: radius of the per-example ball (0.2; pgd and plae 0.05); freelb: projection radius (inf = none, the reference default); r3f: noise half-width (1e-5); neftune: alpha (5). 0 turns the method off."""
    steps: int | None = None
    """Passes K: ascent steps (pgd 3, smart 1, plae 3), freelb passes (2), vat power iterations (1); fgm is 1. 0 turns the method off."""
    step_size: float | None = None
    """Ascent step α (pgd 0.025, freelb 0.1 = adv_lr, smart 0.2, plae 0.025), along g/‖g‖ (l2) or sign(g) (linf; freelb: g/max|g| as its reference)."""
    init_mag: float | None = None
    """Random start: freelb initial magnitude (0.2; 0 = clean first pass), pgd/plae random-start radius (0 = none), smart noise std per entry (1e-3), vat probe size ξ (0.02)."""
    norm: Literal["l2", "linf"] = "l2"
    """Per-example norm of steps and projection: l2 (Frobenius over the example's tokens x dims) or linf."""
    weight: float | None = None
    """λ: weight of the adversarial loss (fgm, plae) or of the regulariser (smart, r3f, vat); 1.0. pgd trains on the adversarial loss alone."""
    noise: Literal["uniform", "normal"] = "uniform"
    """r3f noise: U(-ε, ε) or N(0, ε²)."""
    perturb_special: bool = False
    """Also perturb special tokens ([CLS], [SEP], BOS/EOS); padding never moves."""
    copies: int = 1
    """plae: adversarial embeddings stored per training example (each from its own random start when > 1)."""
    teacher: Literal["pgd", "plain"] = "pgd"
    """plae: how the teacher that generates the adversarial embeddings is fine-tuned (pgd adversarial training, as the paper's abstract says, or plain)."""

    def resolved(self) -> "AdversarialConfig":
        """A copy with the method's defaults filled in; checks ranges and fields the method ignores."""
        if self.method not in METHODS:
            raise ConfigError(f"adversarial.method: {self.method!r} is not one of {', '.join(METHODS)}")
        out = AdversarialConfig(**{f.name: getattr(self, f.name) for f in fields(self)})
        if self.method == "none":
            return out
        base = AdversarialConfig()
        for name in ("norm", "noise", "copies", "teacher"):
            if getattr(self, name) != getattr(base, name) and name not in USES[self.method]:
                raise ConfigError(f"adversarial.{name} does not apply to method {self.method} "
                                  f"(it reads: {', '.join(sorted(USES[self.method]))})")
        for name in ("epsilon", "steps", "step_size", "init_mag", "weight"):
            value = getattr(self, name)
            if value is None:
                setattr(out, name, DEFAULTS[self.method].get(name))
            elif name not in USES[self.method]:
                raise ConfigError(f"adversarial.{name} does not apply to method {self.method} "
                                  f"(it reads: {', '.join(sorted(USES[self.method]))})")
            elif value < 0 or (isinstance(value, float) and math.isnan(value)):
                raise ConfigError(f"adversarial.{name} must be >= 0, got {value}")
        if self.method == "fgm" and out.steps not in (0, 1):
            raise ConfigError("adversarial.steps: fgm takes one step (1, or 0 to turn it off); use pgd for several")
        if self.copies < 1:
            raise ConfigError(f"adversarial.copies must be >= 1, got {self.copies}")
        return out

    def validate(self) -> None:
        """Called when a stage config is built: a bad combination fails before any work starts."""
        self.resolved()

    @property
    def active(self) -> bool:
        """False when the (resolved) settings make the method a no-op: then training is plain, exactly."""
        if self.method == "none":
            return False
        if self.epsilon == 0 or self.steps == 0:
            return False
        return True


COST = {  # forward+backward passes per micro-batch, plain = 1 (the README's cost column)
    "fgm": "2 passes", "pgd": "K+1 passes, K of them gradients w.r.t. δ only",
    "freelb": "K passes", "smart": "K+2 forwards, K+1 backwards (K of them w.r.t. δ only)",
    "r3f": "2 forwards, 1 backward", "vat": "K+2 forwards and backwards (K w.r.t. δ only)",
    "neftune": "1 pass", "plae": "2 passes, after a teacher run and one PGD generation pass",
}


def describe(cfg: AdversarialConfig) -> str:
    """One log line: the method and the values it runs with."""
    if not cfg.active:
        return f"adversarial: {cfg.method} is off (epsilon=0 or steps=0): plain training"
    shown = [f"{k}={getattr(cfg, k)}" for k in ("epsilon", "steps", "step_size", "init_mag", "weight", "norm",
                                                   "noise", "copies", "teacher") if k in USES[cfg.method]]
    return f"adversarial: {cfg.method} ({', '.join(shown)}; special tokens {'perturbed' if cfg.perturb_special else 'fixed'}; {COST[cfg.method]})"


# ---------------------------------------------------------------------------------------------
# Norms, projections, directions (pure functions on (B, T, d) tensors and a (B, T) mask)


def example_norms(x: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-example norm (B,) of x (B, T, d): Frobenius over T x d (l2) or max |x| (linf), in fp32."""
    flat = x.float().flatten(1)
    return flat.norm(dim=1) if norm == "l2" else flat.abs().amax(dim=1)


def project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Π_ε: the closest point of the per-example ball of radius ε (rescale for l2, clamp for linf)."""
    if math.isinf(eps):
        return delta
    if norm == "linf":
        return delta.clamp(-eps, eps)
    n = example_norms(delta, "l2").clamp_min(1e-12)
    factor = (eps / n).clamp(max=1.0)
    return delta * factor.view(-1, *([1] * (delta.dim() - 1)))


def direction(g: torch.Tensor, norm: str, linf_style: str = "sign") -> torch.Tensor:
    """Steepest-ascent direction of unit size per example: g/‖g‖₂ (l2); sign(g) or g/max|g| (linf)."""
    g = g.float()
    if norm == "l2":
        n = example_norms(g, "l2").clamp_min(1e-12)
        return g / n.view(-1, *([1] * (g.dim() - 1)))
    if linf_style == "sign":
        return g.sign()
    n = example_norms(g, "linf").clamp_min(1e-12)
    return g / n.view(-1, *([1] * (g.dim() - 1)))


def random_start(shape: torch.Size, mask: torch.Tensor, mag: float, norm: str, device: torch.device) -> torch.Tensor:
    """FreeLB's start: U(-1,1)·mag/√(T_i·d) on the example's positions (l2), or U(-mag, mag) (linf)."""
    u = (torch.rand(shape, device=device) * 2 - 1) * mask.unsqueeze(-1)
    if norm == "linf":
        return u * mag
    lengths = mask.sum(1).clamp_min(1).float()  # T_i
    return u * (mag / torch.sqrt(lengths * shape[-1])).view(-1, 1, 1)


def sym_kl(a: torch.Tensor, b: torch.Tensor, continuous: bool = False) -> torch.Tensor:
    """Σ_rows KL(p_a‖p_b) + KL(p_b‖p_a) = Σ (p_a − p_b)(log p_a − log p_b) ≥ 0, in fp32.

    Written as that product, every term is ≥ 0 even after rounding (exp is monotone).

    For regression outputs (`continuous`), the squared difference, as SMART does for regression.
    """
    a, b = a.float(), b.float()
    if continuous:
        return ((a - b) ** 2).sum()
    la, lb = F.log_softmax(a, -1), F.log_softmax(b, -1)
    return ((la.exp() - lb.exp()) * (la - lb)).sum()


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor, continuous: bool = False) -> torch.Tensor:
    """Σ_rows KL(p‖q) in fp32 (p from `p_logits`); squared difference for regression outputs."""
    p_logits, q_logits = p_logits.float(), q_logits.float()
    if continuous:
        return ((p_logits - q_logits) ** 2).sum()
    lp, lq = F.log_softmax(p_logits, -1), F.log_softmax(q_logits, -1)
    # each row's KL is >= 0; rounding can leave a nearly equal pair at -1e-9, which must not count
    return (lp.exp() * (lp - lq)).sum(-1).clamp_min(0).sum()


# ---------------------------------------------------------------------------------------------
# Where δ goes in: a forward hook on the input-embedding module


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod  # type: ignore[assignment]
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def input_embeddings(model: nn.Module) -> nn.Module:
    inner = unwrap(model)
    get = getattr(inner, "get_input_embeddings", None)
    emb = get() if get is not None else None
    if emb is None:
        raise HonelmError(f"adversarial training: {type(inner).__name__} has no input-embedding module "
                          "(get_input_embeddings)")
    return emb


@contextlib.contextmanager
def perturbed(model: nn.Module, delta: torch.Tensor | Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within the block, the word-embedding output e becomes e + δ (δ a tensor, or a function of e).

    e keeps its graph, so trainable embeddings get the gradient of the perturbed loss too (as in
    FreeLB, which re-embeds every pass); frozen ones (LoRA) are untouched.
    """
    emb = input_embeddings(model)

    def hook(_module: nn.Module, _inputs: Any, out: torch.Tensor) -> torch.Tensor:
        d = delta(out) if callable(delta) else delta
        if d.shape != out.shape:
            raise HonelmError(f"adversarial training: perturbation {tuple(d.shape)} does not match the "
                              f"embedding output {tuple(out.shape)}")
        return out + d.to(out.dtype)

    handle = emb.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def same_randomness(device: torch.device) -> Iterator[Callable[[], None]]:
    """Yield `rewind()`: it puts the RNG back where it was on entry, so dropout draws the same masks.

    FreeLB holds the dropout masks fixed across its K passes; replaying the random stream gives
    every pass the same masks without patching the model's dropout layers.
    """
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def rewind() -> None:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)

    yield rewind


# ---------------------------------------------------------------------------------------------
# The wrapper


class Adversarial(Objective):
    """Wrap `inner` so each training micro-batch is perturbed by `cfg.method`; evaluation stays clean.

    `special_ids` are the tokenizer's special-token ids (not perturbed unless `perturb_special`).
    `stored(batch, like)` supplies plae's stored perturbations (B, T, d) for a batch.
    """

    def __init__(self, inner: Objective, cfg: AdversarialConfig, special_ids: list[int] | None = None,
                 stored: Callable[[dict[str, Any], torch.Tensor], torch.Tensor] | None = None):
        self.inner = inner
        self.cfg = cfg.resolved()
        self.special_ids = sorted(set(special_ids or []))
        self._special: dict[torch.device, torch.Tensor] = {}
        self.stored = stored
        self.default_metric = inner.default_metric
        self.continuous = bool(getattr(inner, "continuous", False))
        if self.cfg.method == "plae" and stored is None and self.cfg.active:
            raise HonelmError("adversarial.method=plae needs stored adversarial embeddings (run it through a stage)")

    # evaluation and unit counting are the inner objective's
    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> Loss:
        return self.inner(model, batch)

    def outputs(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Loss, torch.Tensor]:
        return self.inner.outputs(model, batch)

    def units(self, batch: dict[str, Any]) -> int:
        return self.inner.units(batch)

    def frozen_models(self) -> list[nn.Module]:
        return self.inner.frozen_models()

    def mask(self, batch: dict[str, Any]) -> torch.Tensor:
        """(B, T) float: 1 where δ may be non-zero (real, and non-special unless asked)."""
        ids = batch["input_ids"]
        m = batch.get("attention_mask")
        m = torch.ones_like(ids, dtype=torch.bool) if m is None else m.bool()
        if not self.cfg.perturb_special and self.special_ids:
            special = self._special.get(ids.device)
            if special is None:  # one small copy per device, not one per step
                special = self._special[ids.device] = torch.tensor(self.special_ids, device=ids.device)
            m = m & ~torch.isin(ids, special)
        return m.float()

    def step(self, model: nn.Module, batch: dict[str, Any], scale: float, autocast: Any) -> Loss:
        cfg = self.cfg
        if not cfg.active:
            return self.inner.step(model, batch, scale, autocast)
        if "input_ids" not in batch:
            raise HonelmError("adversarial training needs input_ids in the batch (it perturbs their embeddings)")
        fn = getattr(self, f"_{cfg.method}")
        return fn(model, batch, scale, autocast)

    # -- helpers ------------------------------------------------------------------------------

    def _shape(self, model: nn.Module, batch: dict[str, Any]) -> torch.Size:
        ids = batch["input_ids"]
        emb = input_embeddings(model)
        d = getattr(emb, "embedding_dim", None) or emb.weight.shape[1]  # type: ignore[union-attr]
        return torch.Size((*ids.shape, d))

    def _pass(self, model: nn.Module, batch: dict[str, Any], delta: torch.Tensor, autocast: Any,
              sync: bool = True) -> tuple[Loss, torch.Tensor]:
        """Forward at e + δ, returning the loss and its unit rows.

        Under DDP each backward must follow exactly one forward through the DDP wrapper; a second
        forward that joins the same backward (the clean side of a consistency regulariser) runs
        on the unwrapped module (`sync=False`); its parameter gradients are still reduced, since
        DDP's hooks sit on the parameters, not on the forward.
        """
        target = model if sync else unwrap(model)
        with perturbed(target, delta), autocast():
            return self.inner.outputs(target, batch)

    def _loss(self, model: nn.Module, batch: dict[str, Any], delta: torch.Tensor, autocast: Any) -> Loss:
        with perturbed(model, delta), autocast():
            return self.inner(model, batch)

    def _ascent_grad(self, model: nn.Module, batch: dict[str, Any], delta: torch.Tensor, autocast: Any,
                     target: Callable[[torch.Tensor, Loss], torch.Tensor] | None = None) -> tuple[torch.Tensor, Loss]:
        """∇_δ of the loss (or of `target(outputs, loss)`) at δ, without touching θ-gradients.

        Runs on the unwrapped model: a pass that back-propagates into no parameter must not go
        through DDP, whose reducer expects every forward to be followed by parameter gradients.
        """
        d = delta.detach().requires_grad_(True)
        inner = unwrap(model)
        with perturbed(inner, d), autocast():
            loss, out = self.inner.outputs(inner, batch)
        value = loss.value if target is None else target(out, loss)
        (g,) = torch.autograd.grad(value.float(), d)
        return g, loss

    def _result(self, clean: Loss, adv_value: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor,
                norm: str) -> Loss:
        """The Loss the loop logs: clean value, plus adv_loss and delta_norm as unit-weighted sums."""
        units = clean.units if isinstance(clean.units, torch.Tensor) else torch.tensor(float(clean.units))
        units = units.detach().float().to(delta.device)
        per_example = example_norms(delta.detach() * mask.unsqueeze(-1), norm)
        metrics = {k: v.detach() for k, v in clean.metrics.items()}
        metrics["adv_loss"] = adv_value.detach().float()
        metrics["delta_norm"] = per_example.mean() * units  # logged as a units-weighted mean ‖δ‖
        return Loss(value=clean.value.detach(), units=clean.units, metrics=metrics)

    def _clean_with_grad(self, model: nn.Module, batch: dict[str, Any], shape: torch.Size, scale: float,
                         autocast: Any) -> tuple[Loss, torch.Tensor]:
        """Clean forward + backward into θ, returning g = ∇_e L from the same backward (δ = 0 leaf)."""
        zero = torch.zeros(shape, device=batch["input_ids"].device, requires_grad=True)
        clean = self._loss(model, batch, zero, autocast)
        (clean.value.float() * scale).backward()
        assert zero.grad is not None
        return clean, zero.grad

    # -- methods ------------------------------------------------------------------------------

    def _fgm(self, model: nn.Module, batch: dict[str, Any], scale: float, autocast: Any) -> Loss:
        cfg, mask = self.cfg, self.mask(batch)
        clean, g = self._clean_with_grad(model, batch, self._shape(model, batch), scale, autocast)
        delta = cfg.epsilon * direction(g * mask.unsqueeze(-1), cfg.norm)  # type: ignore[operator]
        adv = self._loss(model, batch, delta, autocast)
        (adv.value.float() * (cfg.weight * scale)).backward()  # type: ignore[operator]
        return self._result(clean, adv.value, delta, mask, cfg.norm)

    def _pgd(self, model: nn.Module, batch: dict[str, Any], scale: float, autocast: Any) -> Loss:
        """Madry et al.'s min-max: θ trains on L(e + δ_K) alone; the K ascent passes touch δ only.

        Without a random start the first ascent pass is at δ = 0, so its loss is the clean loss
        (logged as `loss`); with one, `loss` is the loss at the random start.
        """
        cfg, mask = self.cfg, self.mask(batch)
        first: list[Loss] = []
        delta = self._ascend(model, batch, mask, autocast, None, first)
        adv = self._loss(model, batch, delta, autocast)
        (adv.value.float() * scale).backward()
        return self._result(first[0], adv.value, delta, mask, cfg.norm)

    def _ascend(self, model: nn.Module, batch: dict[str, Any], mask: torch.Tensor, autocast: Any,
                g0: torch.Tensor | None, losses: list[Loss] | None = None) -> torch.Tensor:
        """δ_K after K projected ascent steps δ ← Π_ε(δ + α·ĝ) (pgd, and plae's generator).

        Starts at 0 with `g0` = ∇_e L(e) when given (so only K-1 more passes), else at a random
        point of radius init_mag (or 0) with K passes. The loss of each pass goes to `losses`.
        """
        cfg, m3 = self.cfg, mask.unsqueeze(-1)
        shape = self._shape(model, batch)
        eps, alpha, steps = float(cfg.epsilon), float(cfg.step_size), int(cfg.steps)  # type: ignore[arg-type]
        delta = torch.zeros(shape, device=mask.device)
        if g0 is not None:
            delta = project(alpha * direction(g0 * m3, cfg.norm), eps, cfg.norm) * m3
            steps -= 1
        elif cfg.init_mag:
            delta = project(random_start(shape, mask, cfg.init_mag, cfg.norm, mask.device), eps, cfg.norm)
        for _ in range(steps):
            g, loss = self._ascent_grad(model, batch, delta, autocast)
            if losses is not None:
                losses.append(loss)
            delta = project(delta + alpha * direction(g * m3, cfg.norm), eps, cfg.norm) * m3
        return delta

    def _freelb(self, model: nn.Module, batch: dict[str, Any], scale: float, autocast: Any) -> Loss:
        cfg, mask = self.cfg, self.mask(batch)
        shape, m3, k = self._shape(model, batch), mask.unsqueeze(-1), int(cfg.steps)  # type: ignore[arg-type]
        eps = float(cfg.epsilon)  # type: ignore[arg-type]
        if cfg.init_mag:
            delta = project(random_start(shape, mask, cfg.init_mag, cfg.norm, mask.device), eps, cfg.norm)
        else:
            delta = torch.zeros(shape, device=mask.device)
        first: Loss | None = None
        total = torch.zeros((), device=mask.device)
        with same_randomness(mask.device) as rewind:
            for t in range(k):
                rewind()  # identical dropout masks in every pass
                d = delta.detach().requires_grad_(True)
                loss = self._loss(model, batch, d, autocast)
                (loss.value.float() * (scale / k)).backward()  # θ-gradients accumulate: their mean over K
                total = total + loss.value.detach().float()
                first = first or loss
                if t == k - 1:
                    break
                assert d.grad is not None
                delta = project(delta + cfg.step_size * direction(d.grad * m3, cfg.norm, "max"), eps, cfg.norm) * m3  # type: ignore[operator]
        assert first is not None
        return self._result(first, total / k, delta, mask, cfg.norm)

    def _smart(self, model: nn.Module, batch: dict[str, Any], scale: float, autocast: Any) -> Loss:
        cfg, mask = self.cfg, self.mask(batch)
        shape, m3 = self._shape(model, batch), mask.unsqueeze(-1)
        eps, cont = float(cfg.epsilon), self.continuous  # type: ignore[arg-type]
        zero = torch.zeros(shape, device=mask.device)
        clean, clean_out = self._pass(model, batch, zero, autocast, sync=False)
        target = clean_out.detach()
        delta = project(torch.randn(shape, device=mask.device) * cfg.init_mag * m3, eps, cfg.norm)  # type: ignore[operator]
        for _ in range(int(cfg.steps)):  # type: ignore[arg-type]
            g, _ = self._ascent_grad(model, batch, delta, autocast, lambda out, _l: kl(out, target, cont))
            # KL's gradient is ~Hessian·δ: from tiny noise it can underflow to exactly 0 in fp32; such an
            # example steps along its noise instead (the reference's normalisation does the same)
            flat = (example_norms(g * m3, "l2") == 0).view(-1, 1, 1)
            g = torch.where(flat, delta, g)
            delta = project(delta + cfg.step_size * direction(g * m3, cfg.norm), eps, cfg.norm) * m3  # type: ignore[operator]
        _, adv_out = self._pass(model, batch, delta, autocast)
        # mt-dnn's SymKlCriterion: each KL term trains one side against the other held fixed
        reg = kl(adv_out, clean_out.detach(), cont) + kl(clean_out, adv_out.detach(), cont)
        ((clean.value.float() + cfg.weight * reg) * scale).backward()  # type: ignore[operator]
        return self._result(clean, reg, delta, mask, cfg.norm)

    def _r3f(self, model: nn.Module, batch: dict[str, Any], scale: float, autocast: Any) -> Loss:
        cfg, mask = self.cfg, self.mask(batch)
        shape, m3 = self._shape(model, batch), mask.unsqueeze(-1)
        eps = float(cfg.epsilon)  # type: ignore[arg-type]
        if cfg.noise == "uniform":
            z = (torch.rand(shape, device=mask.device) * 2 - 1) * eps * m3
        else:
            z = torch.randn(shape, device=mask.device) * eps * m3
        clean, clean_out = self._pass(model, batch, torch.zeros(shape, device=mask.device), autocast, sync=False)
        _, noisy_out = self._pass(model, batch, z, autocast)
        reg = sym_kl(clean_out, noisy_out, self.continuous)  # gradient through both sides
        ((clean.value.float() + cfg.weight * reg) * scale).backward()  # type: ignore[operator]
        return self._result(clean, reg, z, mask, "linf" if cfg.noise == "uniform" else "l2")

    def _vat(self, model: nn.Module, batch: dict[str, Any], scale: float, autocast: Any) -> Loss:
        cfg, mask = self.cfg, self.mask(batch)
        shape, m3, cont = self._shape(model, batch), mask.unsqueeze(-1), self.continuous
        clean, clean_out = self._pass(model, batch, torch.zeros(shape, device=mask.device), autocast)
        (clean.value.float() * scale).backward()  # p is a constant below: the clean graph can go now
        p = clean_out.detach()
        d = torch.randn(shape, device=mask.device) * m3
        for _ in range(int(cfg.steps)):  # type: ignore[arg-type]
            probe = cfg.init_mag * direction(d, "l2")  # type: ignore[operator]
            d, _ = self._ascent_grad(model, batch, probe, autocast, lambda out, _l: kl(p, out, cont))
            d = d * m3
        r = cfg.epsilon * direction(d, "l2")  # type: ignore[operator]
        _, adv_out = self._pass(model, batch, r, autocast)
        reg = kl(p, adv_out, cont)
        (reg * (cfg.weight * scale)).backward()  # type: ignore[operator]
        return self._result(clean, reg, r, mask, "l2")

    def _neftune(self, model: nn.Module, batch: dict[str, Any], scale: float, autocast: Any) -> Loss:
        mask = self.mask(batch)
        real = batch.get("attention_mask")
        lengths = (mask if real is None else real.float()).sum(1).clamp_min(1)  # T_i: real tokens
        shape = self._shape(model, batch)
        scale_i = float(self.cfg.epsilon) / torch.sqrt(lengths * shape[-1])  # type: ignore[arg-type]
        noise = (torch.rand(shape, device=mask.device) * 2 - 1) * mask.unsqueeze(-1) * scale_i.view(-1, 1, 1)
        loss = self._loss(model, batch, noise, autocast)
        (loss.value.float() * scale).backward()
        return self._result(loss, loss.value, noise, mask, "l2")

    def _plae(self, model: nn.Module, batch: dict[str, Any], scale: float, autocast: Any) -> Loss:
        cfg, mask = self.cfg, self.mask(batch)
        shape = self._shape(model, batch)
        assert self.stored is not None
        delta = self.stored(batch, torch.empty(shape, device=mask.device)).float() * mask.unsqueeze(-1)
        clean = self._loss(model, batch, torch.zeros(shape, device=mask.device), autocast)
        (clean.value.float() * scale).backward()
        adv = self._loss(model, batch, delta, autocast)
        (adv.value.float() * (cfg.weight * scale)).backward()  # type: ignore[operator]
        return self._result(clean, adv.value, delta, mask, cfg.norm)

    def generate(self, model: nn.Module, batch: dict[str, Any], autocast: Any) -> torch.Tensor:
        """plae stage A: δ_K (B, T, d) for a batch against `model` by PGD ascent (θ-gradients untouched).

        With init_mag > 0 every call starts from its own random point, so repeated calls give
        distinct copies.
        """
        return self._ascend(model, batch, self.mask(batch), autocast, None)


# ---------------------------------------------------------------------------------------------
# the booster's hooks (honelm.boosters.base.Booster; plae's run before the main one: honelm.boosters.plae)


def check(cfg: AdversarialConfig, capabilities: frozenset[str], stage: str) -> None:
    """plae retrains on labelled adversarial embeddings: only a stage with labelled examples (LABELS) has them."""
    if cfg.method == "plae" and LABELS not in capabilities:
        raise ConfigError(f"adversarial.method=plae works with classify only (a stage with labelled examples), not "
                          f"{stage}: it retrains on labelled adversarial embeddings (for language modelling use fgm, "
                          "pgd, freelb, smart, r3f, vat or neftune)")


def wrap(inner: Objective, cfg: AdversarialConfig, tokenizer: Any, say: Callable[[str], None],
         stored: Callable[[dict[str, Any], torch.Tensor], torch.Tensor] | None = None) -> Objective:
    """`inner`, or `inner` wrapped by the configured method (plae needs the lookup its run before prepared)."""
    if cfg.method == "none":
        return inner
    if cfg.method == "plae" and stored is None:
        raise ConfigError("adversarial.method=plae needs its teacher run first: it retrains on labelled adversarial "
                          "embeddings (for language modelling use fgm, pgd, freelb, smart, r3f, vat or neftune)")
    wrapped = Adversarial(inner, cfg, special_ids=list(getattr(tokenizer, "all_special_ids", []) or []), stored=stored)
    say(describe(wrapped.cfg))
    return wrapped
