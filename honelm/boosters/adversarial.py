"""Adversarial and noise training on the word-embedding output: one objective wrapper for all methods.

`Adversarial(inner, cfg, special_ids)` wraps any objective (classification, causal LM, masked LM,
SFT, distillation, and the pairwise losses of reward and dpo) and overrides its per-micro-batch
`step`; the loop does not know it is there. Every method perturbs the *activation* e = Emb(x) (the
word-embedding output, before position/type embeddings and LayerNorm) through a forward hook on
the model's input-embedding module, never the embedding weight matrix, so it works with LoRA and
frozen embeddings, with decoders that find the last real token from `input_ids`, and under DDP.

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

Each method is a registered `Method`: a frozen dataclass whose fields are the `adversarial.*` keys
it reads, at its own defaults, with its per-micro-batch `step` (and an optional `check`). The
wrapper looks the configured method up in `REGISTRY` and calls its `step` with itself, whose
helpers (`mask`, `_loss`, `_pass`, `_ascent_grad`, `_result`, ...) run the passes. Adding a method
is one such class and one `@register(name, cost)` line above it; its name also goes into the
`Literal` of `AdversarialConfig.method` (config validation, did-you-mean and `--help` read that
type; a unit test keeps the two in step), and a new key it reads into `AdversarialConfig`.

Pairwise losses (reward, dpo: stages whose config offers `PAIRS`). A batch is P pairs as 2P rows
[chosen; rejected]; every row is an example with its own ball (its own norm, its own real
length), so chosen and rejected are perturbed alike and padding never moves. Before any perturbed
pass the wrapper asks the objective for what must stay clean (`Objective.unperturbed`): DPO's
reference log-probs, so only the policy sees δ (a LoRA policy's reference is the same model with
its adapters off, whose embedding output the hook would otherwise perturb too). fgm, pgd and
freelb need only a differentiable loss, which both are. smart, r3f and vat compare each pair's
output rows, [r_c, r_r] for reward and the implicit rewards [r̂_c, r̂_r] for dpo, whose softmax is
the pair's (implicit) Bradley-Terry preference probability: the regulariser keeps that
probability stable under the perturbation. neftune is refused: its noise is a regulariser of
instruction tuning's generated answers (its only evidence, Jain et al. 2023), a reward model
generates nothing, and in dpo noise on the policy alone is not regularisation but a bias of the
implicit reward (h ≠ 0 at step 0, with policy = reference). plae needs labelled examples.

SKL(p, q) = KL(p‖q) + KL(q‖p) = Σ (p − q)(log p − log q) per unit row (squared error for
regression outputs). Peak memory does not grow with K: every pass either back-propagates at once
(θ-gradients accumulate in `.grad`) or differentiates w.r.t. δ alone, so at most two graphs (a
clean one and a perturbed one, for the consistency regularisers) are alive at a time.
"""

from __future__ import annotations

import abc
import contextlib
import math
from dataclasses import dataclass, fields, replace
from typing import Annotated, Any, Callable, ClassVar, Iterator, Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from honelm.boosters.base import LABELS, PAIRS, Space
from honelm.bounds import at_least
from honelm.errors import ConfigError, HonelmError
from honelm.objectives.base import Loss, Objective

Norm = Literal["l2", "linf"]
Stored = Callable[[dict[str, Any], torch.Tensor], torch.Tensor]
"""plae's `stored(batch, like)`: the stored perturbations (B, T, d) of a batch's examples."""

# The config's fields a method may read: the sizes, None = the method's default (each checked >= 0), and
# the choices, whose config default is also every method's (set away from it, a method must read it).
SIZES = ("epsilon", "steps", "step_size", "init_mag", "weight")
CHOICES = ("norm", "noise", "copies", "teacher")


@dataclass
class AdversarialConfig:
    """Adversarial / noise training on the word-embedding output (a field left empty takes the method's default)."""

    method: Literal["none", "fgm", "pgd", "freelb", "smart", "r3f", "vat", "neftune", "plae"] = "none"
    """none, fgm, pgd, freelb, smart, r3f, vat, neftune or plae (docs/adversarial.md: papers, defaults, cost)."""
    epsilon: Annotated[float | None, at_least(0)] = None
    """Size of the perturbation. fgm/pgd/smart/vat/plae: radius of the per-example ball (0.2; pgd and plae 0.05); freelb: projection radius (inf = none, the reference default); r3f: noise half-width (1e-5); neftune: alpha (5). 0 turns the method off."""
    steps: Annotated[int | None, at_least(0)] = None
    """Passes K: ascent steps (pgd 3, smart 1, plae 3), freelb passes (2), vat power iterations (1); fgm is 1. 0 turns the method off."""
    step_size: Annotated[float | None, at_least(0)] = None
    """Ascent step α (pgd 0.025, freelb 0.1 = adv_lr, smart 0.2, plae 0.025), along g/‖g‖ (l2) or sign(g) (linf; freelb: g/max|g| as its reference)."""
    init_mag: Annotated[float | None, at_least(0)] = None
    """Random start: freelb initial magnitude (0.2; 0 = clean first pass), pgd/plae random-start radius (0 = none), smart noise std per entry (1e-3), vat probe size ξ (0.02)."""
    norm: Literal["l2", "linf"] = "l2"
    """Per-example norm of steps and projection: l2 (Frobenius over the example's tokens x dims) or linf."""
    weight: Annotated[float | None, at_least(0)] = None
    """λ: weight of the adversarial loss (fgm, plae) or of the regulariser (smart, r3f, vat); 1.0. pgd trains on the adversarial loss alone."""
    noise: Literal["uniform", "normal"] = "uniform"
    """r3f noise: U(-ε, ε) or N(0, ε²)."""
    perturb_special: bool = False
    """Also perturb special tokens ([CLS], [SEP], BOS/EOS); padding never moves."""
    copies: Annotated[int, at_least(1)] = 1
    """plae: adversarial embeddings stored per training example (each from its own random start when > 1)."""
    teacher: Literal["pgd", "plain"] = "pgd"
    """plae: how the teacher that generates the adversarial embeddings is fine-tuned (pgd adversarial training, as the paper's abstract says, or plain)."""
    relative: bool = False
    """Sizes in units of the model's typical word embedding: epsilon, step_size and init_mag are multiplied by the mean L2 norm of the embedding rows of the perturbable tokens of the first 256 training examples, measured once on the starting model (the log says the factor), so one setting means the same on models whose embeddings differ in scale."""

    def settings(self) -> Method | None:
        """The configured method with its settings: the fields it reads, each one left empty at its default.

        None for `none`. ConfigError for an unknown method, a field the method does not read set
        explicitly, a negative or NaN size, or what the method's own `check` rejects.
        """
        if self.method not in ("none", *REGISTRY):
            raise ConfigError(f"adversarial.method: {self.method!r} is not one of {', '.join(('none', *REGISTRY))}")
        if self.method == "none":
            return None
        kind = REGISTRY[self.method]
        reads, unset = kind.reads(), AdversarialConfig()
        for name in CHOICES:
            if getattr(self, name) != getattr(unset, name) and name not in reads:
                raise _not_read(name, self.method, reads)
        given = {name: getattr(self, name) for name in CHOICES if name in reads}
        for name in SIZES:
            value = getattr(self, name)
            if value is None:
                continue
            if name not in reads:
                raise _not_read(name, self.method, reads)
            if value < 0 or (isinstance(value, float) and math.isnan(value)):
                raise ConfigError(f"adversarial.{name} must be >= 0, got {value}")
            given[name] = value
        method = replace(kind(), **given)
        method.check()
        return method

    def resolved(self) -> AdversarialConfig:
        """A copy with the method's defaults filled in; checks ranges and fields the method ignores."""
        method = self.settings()
        if method is None:
            return replace(self)
        return replace(self, **{name: getattr(method, name) for name in method.reads()})

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


def _not_read(name: str, method: str, reads: tuple[str, ...]) -> ConfigError:
    """The error for a key set explicitly that `method` does not read."""
    return ConfigError(f"adversarial.{name} does not apply to method {method} (it reads: {', '.join(sorted(reads))})")


def describe(cfg: AdversarialConfig) -> str:
    """One log line: the method and the values it runs with (the keys it reads, in the order it declares them)."""
    if not cfg.active:
        return f"adversarial: {cfg.method} is off (epsilon=0 or steps=0): plain training"
    kind = REGISTRY[cfg.method]
    shown = ", ".join(f"{name}={getattr(cfg, name)}" for name in kind.reads())
    special = "perturbed" if cfg.perturb_special else "fixed"
    return f"adversarial: {cfg.method} ({shown}; special tokens {special}; {kind.cost})"


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
        compiled = getattr(model, "_orig_mod", None)
        if isinstance(compiled, nn.Module):
            model = compiled
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
# The registry of methods


@dataclass(frozen=True)
class Method(abc.ABC):
    """An adversarial method: its settings (the subclass's fields) and its step on one micro-batch.

    A subclass is a frozen dataclass whose fields are the `adversarial.*` keys the method reads, in
    the order its log line shows them, each at the method's default (docs/adversarial.md,
    "Methods, keys and costs", has the table and the reasons); any other key set explicitly is an error, not silently ignored.
    An instance is the method with its resolved settings (`AdversarialConfig.settings()`).

    ε is a per-example radius in raw word-embedding space, except: r3f's noise half-width,
    neftune's α, freelb's optional projection. 0.2 matches the size FreeLB's published settings
    reach (adv_lr 0.1 from an init of 0.2/√3: ‖δ‖ ≈ 0.15-0.3); an example's whole embedding has norm
    ≈ 5 in MiniLM (≈ 1.1 per token), and fgm at ε = 1 made MiniLM on 500 SST-2 examples collapse to
    one class on validation (docs/benchmarks.md).
    """

    name: ClassVar[str] = ""
    """Its `adversarial.method` value (`register` sets it)."""
    cost: ClassVar[str] = ""
    """Forward+backward passes per micro-batch, plain = 1 (docs/adversarial.md's cost column; `register` sets it)."""
    needs_stored: ClassVar[bool] = False
    """It trains on perturbations that a run before the main one stored (plae): the wrapper needs `stored`."""
    not_pairwise: ClassVar[str] = ""
    """Why it does not apply to a pairwise loss (a stage offering `PAIRS`: reward, dpo); empty: it does."""

    @classmethod
    def reads(cls) -> tuple[str, ...]:
        """The config keys this method reads, in the order it declares them."""
        return tuple(f.name for f in fields(cls))

    def check(self) -> None:
        """Constraints on the resolved settings beyond `>= 0` (ConfigError); most methods have none."""

    @abc.abstractmethod
    def step(self, adv: Adversarial, model: nn.Module, batch: dict[str, Any], scale: float, autocast: Any) -> Loss:
        """One training micro-batch: its passes, every θ-backward scaled by `scale`; the Loss to log (`adv._result`)."""


REGISTRY: dict[str, type[Method]] = {}
"""Every adversarial method by its `adversarial.method` name, in the order they are registered."""

M = TypeVar("M", bound="type[Method]")


def register(name: str, cost: str) -> Callable[[M], M]:
    """Class decorator: list a method under `name`, with its cost line (the log line shows it)."""
    def add(kind: M) -> M:
        kind.name, kind.cost = name, cost
        REGISTRY[name] = kind
        return kind
    return add


# ---------------------------------------------------------------------------------------------
# The wrapper


class Adversarial(Objective):
    """Wrap `inner` so each training micro-batch is perturbed by `cfg.method`; evaluation stays clean.

    `special_ids` are the tokenizer's special-token ids (not perturbed unless `perturb_special`).
    `stored(batch, like)` supplies plae's stored perturbations (B, T, d) for a batch.
    """

    def __init__(self, inner: Objective, cfg: AdversarialConfig, special_ids: list[int] | None = None,
                 stored: Stored | None = None):
        self.inner = inner
        self.cfg = cfg.resolved()
        self.method = self.cfg.settings()
        self.special_ids = sorted(set(special_ids or []))
        self._special: dict[torch.device, torch.Tensor] = {}
        self.stored = stored
        self.default_metric = inner.default_metric
        self.continuous = bool(getattr(inner, "continuous", False))
        if self.cfg.relative and self.method is not None:
            raise HonelmError("adversarial.relative: the sizes are not measured yet (the runner's `calibrate` turns them "
                              "into absolute ones on the starting model before training)")
        if self.method is not None and self.method.needs_stored and stored is None and self.cfg.active:
            raise HonelmError(f"adversarial.method={self.method.name} needs stored adversarial embeddings "
                              "(run it through a stage)")

    # evaluation and unit counting are the inner objective's
    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> Loss:
        return self.inner(model, batch)

    def outputs(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Loss, torch.Tensor]:
        return self.inner.outputs(model, batch)

    def units(self, batch: dict[str, Any]) -> int:
        return self.inner.units(batch)

    def frozen_models(self) -> list[nn.Module]:
        return self.inner.frozen_models()

    def unperturbed(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        return self.inner.unperturbed(model, batch)

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
        if self.method is None or not self.cfg.active:
            return self.inner.step(model, batch, scale, autocast)
        if "input_ids" not in batch:
            raise HonelmError("adversarial training needs input_ids in the batch (it perturbs their embeddings)")
        with autocast():  # what must stay clean (DPO's reference log-probs), as plain training computes it
            batch = self.inner.unperturbed(model, batch)
        return self.method.step(self, model, batch, scale, autocast)

    def generate(self, model: nn.Module, batch: dict[str, Any], autocast: Any) -> torch.Tensor:
        """plae stage A: δ_K (B, T, d) for a batch against `model` by PGD ascent (θ-gradients untouched).

        The wrapper's method must be pgd. With init_mag > 0 every call starts from its own random
        point, so repeated calls give distinct copies.
        """
        if not isinstance(self.method, Pgd):
            raise HonelmError(f"adversarial: perturbations are generated by pgd, not {self.cfg.method}")
        return self.method.ascend(self, model, batch, self.mask(batch), autocast)

    # -- helpers ------------------------------------------------------------------------------

    def _shape(self, model: nn.Module, batch: dict[str, Any]) -> torch.Size:
        ids = batch["input_ids"]
        emb = input_embeddings(model)
        d = getattr(emb, "embedding_dim", None) or emb.get_parameter("weight").shape[1]
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


# ---------------------------------------------------------------------------------------------
# The methods (REGISTRY order is the order `adversarial.method`'s error message lists them in)


@register("fgm", cost="2 passes")
@dataclass(frozen=True)
class Fgm(Method):
    """L(e) + λ·L(e + ε·g/‖g‖), g = ∇_e L(e) taken from the clean backward."""

    epsilon: float = 0.2
    steps: int = 1
    weight: float = 1.0
    norm: Norm = "l2"

    def check(self) -> None:
        if self.steps not in (0, 1):
            raise ConfigError("adversarial.steps: fgm takes one step (1, or 0 to turn it off); use pgd for several")

    def step(self, adv: Adversarial, model: nn.Module, batch: dict[str, Any], scale: float, autocast: Any) -> Loss:
        mask = adv.mask(batch)
        clean, g = adv._clean_with_grad(model, batch, adv._shape(model, batch), scale, autocast)
        delta = self.epsilon * direction(g * mask.unsqueeze(-1), self.norm)
        perturbed_loss = adv._loss(model, batch, delta, autocast)
        (perturbed_loss.value.float() * (self.weight * scale)).backward()
        return adv._result(clean, perturbed_loss.value, delta, mask, self.norm)


# pgd trains on L(e + δ_K) alone: at ε 0.2 (with α 0.1, K 3) MiniLM on 500 or 2,000 SST-2 examples stayed at
# the majority class on all six runs (as plae's teacher); at ε 0.05 it trained to plain's validation accuracy.
@register("pgd", cost="K+1 passes, K of them gradients w.r.t. δ only")
@dataclass(frozen=True)
class Pgd(Method):
    """Madry et al.'s min-max: θ trains on L(e + δ_K) alone; the K ascent passes touch δ only.

    Without a random start the first ascent pass is at δ = 0, so its loss is the clean loss
    (logged as `loss`); with one, `loss` is the loss at the random start.
    """

    epsilon: float = 0.05
    steps: int = 3
    step_size: float = 0.025
    init_mag: float = 0.0
    norm: Norm = "l2"

    def step(self, adv: Adversarial, model: nn.Module, batch: dict[str, Any], scale: float, autocast: Any) -> Loss:
        mask = adv.mask(batch)
        first: list[Loss] = []
        delta = self.ascend(adv, model, batch, mask, autocast, first)
        perturbed_loss = adv._loss(model, batch, delta, autocast)
        (perturbed_loss.value.float() * scale).backward()
        return adv._result(first[0], perturbed_loss.value, delta, mask, self.norm)

    def ascend(self, adv: Adversarial, model: nn.Module, batch: dict[str, Any], mask: torch.Tensor, autocast: Any,
               losses: list[Loss] | None = None) -> torch.Tensor:
        """δ_K after K projected ascent steps δ ← Π_ε(δ + α·ĝ) (pgd, and plae's generator).

        Starts at a random point of radius init_mag (or 0). The loss of each pass goes to `losses`.
        """
        m3, shape = mask.unsqueeze(-1), adv._shape(model, batch)
        eps, alpha = float(self.epsilon), float(self.step_size)
        delta = torch.zeros(shape, device=mask.device)
        if self.init_mag:
            delta = project(random_start(shape, mask, self.init_mag, self.norm, mask.device), eps, self.norm)
        for _ in range(int(self.steps)):
            g, loss = adv._ascent_grad(model, batch, delta, autocast)
            if losses is not None:
                losses.append(loss)
            delta = project(delta + alpha * direction(g * m3, self.norm), eps, self.norm) * m3
        return delta


@register("freelb", cost="K passes")
@dataclass(frozen=True)
class FreeLB(Method):
    """(1/K)·Σ_t L(e + δ_t) with the same dropout masks in every pass; ε = inf means no projection."""

    epsilon: float = math.inf
    steps: int = 2
    step_size: float = 0.1
    init_mag: float = 0.2
    norm: Norm = "l2"

    def step(self, adv: Adversarial, model: nn.Module, batch: dict[str, Any], scale: float, autocast: Any) -> Loss:
        mask = adv.mask(batch)
        shape, m3, k = adv._shape(model, batch), mask.unsqueeze(-1), int(self.steps)
        eps = float(self.epsilon)
        if self.init_mag:
            delta = project(random_start(shape, mask, self.init_mag, self.norm, mask.device), eps, self.norm)
        else:
            delta = torch.zeros(shape, device=mask.device)
        first: Loss | None = None
        total = torch.zeros((), device=mask.device)
        with same_randomness(mask.device) as rewind:
            for t in range(k):
                rewind()  # identical dropout masks in every pass
                d = delta.detach().requires_grad_(True)
                loss = adv._loss(model, batch, d, autocast)
                (loss.value.float() * (scale / k)).backward()  # θ-gradients accumulate: their mean over K
                total = total + loss.value.detach().float()
                first = first or loss
                if t == k - 1:
                    break
                assert d.grad is not None
                delta = project(delta + self.step_size * direction(d.grad * m3, self.norm, "max"), eps, self.norm) * m3
        assert first is not None
        return adv._result(first, total / k, delta, mask, self.norm)


@register("smart", cost="K+2 forwards, K+1 backwards (K of them w.r.t. δ only)")
@dataclass(frozen=True)
class Smart(Method):
    """L(e) + λ·SKL(f(e), f(e + δ)), δ from K ascent steps on KL(f(e+δ) ‖ f(e)) from N(0, σ²) noise."""

    epsilon: float = 0.2
    steps: int = 1
    step_size: float = 0.2
    init_mag: float = 1e-3
    weight: float = 1.0
    norm: Norm = "l2"

    def step(self, adv: Adversarial, model: nn.Module, batch: dict[str, Any], scale: float, autocast: Any) -> Loss:
        mask = adv.mask(batch)
        shape, m3 = adv._shape(model, batch), mask.unsqueeze(-1)
        eps, cont = float(self.epsilon), adv.continuous
        zero = torch.zeros(shape, device=mask.device)
        clean, clean_out = adv._pass(model, batch, zero, autocast, sync=False)
        target = clean_out.detach()
        delta = project(torch.randn(shape, device=mask.device) * self.init_mag * m3, eps, self.norm)
        for _ in range(int(self.steps)):
            g, _ = adv._ascent_grad(model, batch, delta, autocast, lambda out, _l: kl(out, target, cont))
            # KL's gradient is ~Hessian·δ: from tiny noise it can underflow to exactly 0 in fp32; such an
            # example steps along its noise instead (the reference's normalisation does the same)
            flat = (example_norms(g * m3, "l2") == 0).view(-1, 1, 1)
            g = torch.where(flat, delta, g)
            delta = project(delta + self.step_size * direction(g * m3, self.norm), eps, self.norm) * m3
        _, adv_out = adv._pass(model, batch, delta, autocast)
        # mt-dnn's SymKlCriterion: each KL term trains one side against the other held fixed
        reg = kl(adv_out, clean_out.detach(), cont) + kl(clean_out, adv_out.detach(), cont)
        ((clean.value.float() + self.weight * reg) * scale).backward()
        return adv._result(clean, reg, delta, mask, self.norm)


@register("r3f", cost="2 forwards, 1 backward")
@dataclass(frozen=True)
class R3f(Method):
    """L(e) + λ·SKL(f(e), f(e + z)), z ~ U(-ε, ε) or N(0, ε²), gradient through both sides."""

    epsilon: float = 1e-5
    weight: float = 1.0
    noise: Literal["uniform", "normal"] = "uniform"

    def step(self, adv: Adversarial, model: nn.Module, batch: dict[str, Any], scale: float, autocast: Any) -> Loss:
        mask = adv.mask(batch)
        shape, m3 = adv._shape(model, batch), mask.unsqueeze(-1)
        eps = float(self.epsilon)
        if self.noise == "uniform":
            z = (torch.rand(shape, device=mask.device) * 2 - 1) * eps * m3
        else:
            z = torch.randn(shape, device=mask.device) * eps * m3
        clean, clean_out = adv._pass(model, batch, torch.zeros(shape, device=mask.device), autocast, sync=False)
        _, noisy_out = adv._pass(model, batch, z, autocast)
        reg = sym_kl(clean_out, noisy_out, adv.continuous)  # gradient through both sides
        ((clean.value.float() + self.weight * reg) * scale).backward()
        return adv._result(clean, reg, z, mask, "linf" if self.noise == "uniform" else "l2")


@register("vat", cost="K+2 forwards and backwards (K w.r.t. δ only)")
@dataclass(frozen=True)
class Vat(Method):
    """L(e) + λ·KL(p ‖ f(e + ε·d/‖d‖)), p = f(e) held fixed, d from K power iterations from a probe of size ξ."""

    epsilon: float = 0.2
    steps: int = 1
    init_mag: float = 0.02
    weight: float = 1.0

    def step(self, adv: Adversarial, model: nn.Module, batch: dict[str, Any], scale: float, autocast: Any) -> Loss:
        mask = adv.mask(batch)
        shape, m3, cont = adv._shape(model, batch), mask.unsqueeze(-1), adv.continuous
        clean, clean_out = adv._pass(model, batch, torch.zeros(shape, device=mask.device), autocast)
        (clean.value.float() * scale).backward()  # p is a constant below: the clean graph can go now
        p = clean_out.detach()
        d = torch.randn(shape, device=mask.device) * m3
        for _ in range(int(self.steps)):
            probe = self.init_mag * direction(d, "l2")
            d, _ = adv._ascent_grad(model, batch, probe, autocast, lambda out, _l: kl(p, out, cont))
            d = d * m3
        r = self.epsilon * direction(d, "l2")
        _, adv_out = adv._pass(model, batch, r, autocast)
        reg = kl(p, adv_out, cont)
        (reg * (self.weight * scale)).backward()
        return adv._result(clean, reg, r, mask, "l2")


@register("neftune", cost="1 pass")
@dataclass(frozen=True)
class Neftune(Method):
    """L(e + U(-1,1)·α/√(T_i·d)) on real tokens only, T_i the example's real length; α is `epsilon`."""

    epsilon: float = 5.0
    not_pairwise: ClassVar[str] = ("its noise regularises instruction tuning's generated answers; a reward model "
                                   "generates nothing, and noise on dpo's policy alone biases the implicit reward "
                                   "(h != 0 with policy = reference) rather than regularising")

    def step(self, adv: Adversarial, model: nn.Module, batch: dict[str, Any], scale: float, autocast: Any) -> Loss:
        mask = adv.mask(batch)
        real = batch.get("attention_mask")
        lengths = (mask if real is None else real.float()).sum(1).clamp_min(1)  # T_i: real tokens
        shape = adv._shape(model, batch)
        scale_i = float(self.epsilon) / torch.sqrt(lengths * shape[-1])
        noise = (torch.rand(shape, device=mask.device) * 2 - 1) * mask.unsqueeze(-1) * scale_i.view(-1, 1, 1)
        loss = adv._loss(model, batch, noise, autocast)
        (loss.value.float() * scale).backward()
        return adv._result(loss, loss.value, noise, mask, "l2")


# plae's teacher is pgd training, and its δ then augments a student that has not learned the task yet: at
# ε 0.2 the teacher never learned and the students lost up to 18 points on SST-2; ε 0.05 was the best of
# 0.05 / 0.1 / 0.2 on validation (docs/benchmarks.md, "Choosing plae's ε").
@register("plae", cost="2 passes, after a teacher run and one PGD generation pass")
@dataclass(frozen=True)
class Plae(Method):
    """L(e) + λ·L(e + δ_stored); δ from PGD (ε, K, α, init_mag, norm) against the teacher (`honelm.boosters.plae`)."""

    epsilon: float = 0.05
    steps: int = 3
    step_size: float = 0.025
    init_mag: float = 0.0
    weight: float = 1.0
    norm: Norm = "l2"
    copies: int = 1
    teacher: Literal["pgd", "plain"] = "pgd"
    needs_stored: ClassVar[bool] = True
    not_pairwise: ClassVar[str] = "it retrains on labelled adversarial embeddings (classify only)"

    def check(self) -> None:
        if self.copies < 1:
            raise ConfigError(f"adversarial.copies must be >= 1, got {self.copies}")

    def step(self, adv: Adversarial, model: nn.Module, batch: dict[str, Any], scale: float, autocast: Any) -> Loss:
        mask = adv.mask(batch)
        shape = adv._shape(model, batch)
        assert adv.stored is not None  # the wrapper refuses to build without it
        delta = adv.stored(batch, torch.empty(shape, device=mask.device)).float() * mask.unsqueeze(-1)
        clean = adv._loss(model, batch, torch.zeros(shape, device=mask.device), autocast)
        (clean.value.float() * scale).backward()
        perturbed_loss = adv._loss(model, batch, delta, autocast)
        (perturbed_loss.value.float() * (self.weight * scale)).backward()
        return adv._result(clean, perturbed_loss.value, delta, mask, self.norm)


# ---------------------------------------------------------------------------------------------
# Sizes relative to the model at hand (`adversarial.relative`), and each method's search range

UNITS = ("epsilon", "step_size", "init_mag")
"""The sizes measured in word-embedding units: `relative` multiplies them by the model's typical per-token norm."""
SCALE_EXAMPLES = 256
"""Training examples whose perturbable tokens the typical per-token norm is measured on."""

SEARCH_RANGES: dict[str, tuple[str, float, float]] = {
    "fgm": ("epsilon", 0.003, 0.3), "pgd": ("epsilon", 0.002, 0.1), "freelb": ("step_size", 0.003, 0.3),
    "smart": ("epsilon", 0.003, 0.3), "r3f": ("weight", 0.1, 5.0), "vat": ("epsilon", 0.003, 0.3),
    "neftune": ("epsilon", 1.0, 15.0), "plae": ("epsilon", 0.002, 0.1),
}
"""Each method's searched key and its range (log scale), sizes in units of the typical per-token embedding norm.

Two decades around what worked: MiniLM (per-token norm about 1.1, so its absolute defaults are about the
same numbers) trained well with fgm/smart/vat at radius 0.2 and pgd/plae (the teacher's strength) at 0.05
on SST-2 (docs/benchmarks.md), while the demo's tiny pre-norm decoder (norm 0.86) trained fgm to 1.000
validation accuracy at 0.003-0.02 and fell to 0.60 at 0.05 and the majority class at 0.12-0.2 (same lr,
3 epochs). freelb: its ascent step (adv_lr 0.1; its radius is unbounded); r3f: its weight λ (its noise is
tiny by design; Aghajanyan et al. tried 0.1 to 5); neftune: α (Jain et al.: 5 to 15)."""


def embedding_scale(model: nn.Module, batches: Any, special_ids: list[int], perturb_special: bool) -> tuple[float, int]:
    """(mean L2 norm of the word-embedding output at the tokens `batches` would perturb, their count).

    The norm is that of the input-embedding module's output (a row of its weight for a plain
    embedding), taken at every `*input_ids` of a batch (pairs have two) on its real positions,
    special tokens excluded unless `perturb_special`: the vectors δ is added to.
    """
    emb = input_embeddings(model)
    device = emb.get_parameter("weight").device
    special = torch.tensor(sorted(set(special_ids)), dtype=torch.long)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            for key in [k for k in batch if k.endswith("input_ids")]:
                ids = batch[key]
                mask = batch.get(key[: -len("input_ids")] + "attention_mask")
                keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
                if not perturb_special and len(special):
                    keep &= ~torch.isin(ids, special)
                rows = emb(ids[keep].to(device)).float()
                total += float(rows.norm(dim=-1).sum())
                count += int(rows.shape[0])
    if count == 0:
        raise HonelmError("adversarial.relative: the first training examples have no token to perturb, so the "
                          "embedding norm cannot be measured")
    return total / count, count


def calibrate(cfg: AdversarialConfig, model: nn.Module, stream: Any, tokenizer: Any,
              say: Callable[[str], None]) -> AdversarialConfig:
    """The section with relative sizes made absolute on the starting `model` (unchanged when not `relative`).

    Measured on the first SCALE_EXAMPLES training examples in file order (`stream.n`, `stream.collate`),
    before any checkpoint is restored: a resumed run, and every process of a distributed one, measure
    the same factor.
    """
    if not cfg.relative:
        return cfg
    resolved = replace(cfg.resolved(), relative=False)
    if not resolved.active:
        return resolved
    if not (hasattr(stream, "collate") and hasattr(stream, "n")):
        raise ConfigError("adversarial.relative needs a stage that trains on examples (their embeddings set the scale)")
    size = getattr(stream, "bs", 32)
    last = min(stream.n, SCALE_EXAMPLES)
    batches = (stream.collate(list(range(i, min(i + size, last)))) for i in range(0, last, size))
    special = list(getattr(tokenizer, "all_special_ids", []) or [])
    scale, tokens = embedding_scale(model, batches, special, cfg.perturb_special)
    sizes = {n: getattr(resolved, n) * scale for n in UNITS if n in REGISTRY[cfg.method].reads()}
    say(f"adversarial: relative sizes × {scale:.4g} (the mean L2 norm of the word embeddings of {tokens:,} "
        f"perturbable tokens in the first {last} training examples): "
        + ", ".join(f"{n}={getattr(resolved, n):g} → {v:.4g}" for n, v in sizes.items()))
    return replace(resolved, **sizes)


def space(cfg: AdversarialConfig, stage_cfg: Any, base: Space) -> Space:
    """`base` plus the method's strength (SEARCH_RANGES), searched in relative units (`relative: true` fixed).

    Left as it is when the method is off, when the user set the searched key, or when they gave absolute
    sizes (an embedding-unit size set without `relative`): their numbers are theirs to keep.
    """
    if cfg.method == "none" or not cfg.active:
        return base
    key, low, high = SEARCH_RANGES[cfg.method]
    if getattr(cfg, key) is not None or (not cfg.relative and any(getattr(cfg, n) is not None for n in UNITS)):
        return base
    return Space({**base.ranges, f"adversarial.{key}": {"low": low, "high": high, "log": True}},
                 {**base.fixed, "adversarial.relative": True})


# ---------------------------------------------------------------------------------------------
# the booster's hooks (honelm.boosters.base.Booster; plae's run before the main one: honelm.boosters.plae)


def check(cfg: AdversarialConfig, capabilities: frozenset[str], stage: str) -> None:
    """plae retrains on labelled adversarial embeddings: only a stage with labelled examples (LABELS) has them. A
    pairwise loss (PAIRS) takes the methods whose `not_pairwise` is empty."""
    if cfg.method == "plae" and LABELS not in capabilities:
        raise ConfigError(f"adversarial.method=plae works with classify only (a stage with labelled examples), not "
                          f"{stage}: it retrains on labelled adversarial embeddings (for language modelling use fgm, "
                          "pgd, freelb, smart, r3f, vat or neftune)")
    kind = REGISTRY.get(cfg.method)
    if PAIRS in capabilities and kind is not None and kind.not_pairwise:
        fitting = ", ".join(name for name, k in REGISTRY.items() if not k.not_pairwise)
        raise ConfigError(f"adversarial.method={cfg.method} does not apply to {stage} (a pairwise loss on chosen and "
                          f"rejected): {kind.not_pairwise}. For {stage} use {fitting}")


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
