"""LoRA (and rsLoRA, DoRA) as a model transform, built on `peft`.

This module owns:

* `LoraConfig`: the `lora` section of a stage config (honelm's names; peft's class is `peft.LoraConfig`).
* `apply_lora`: freeze a loaded model and wrap it in a `peft.PeftModel` with LoRA on the chosen
  modules, returning a new `honelm.models.LoadedModel`. Heads the task adds (a classifier's
  `score`/`classifier`) and every weight the loader had to initialise afresh train fully
  (`modules_to_save`), so they are saved with the adapter. The record's `source` (the directory
  holding exactly the weights LoRA is applied to) becomes the adapter's `base_model_name_or_path`;
  without one (random init, a merged adapter, a re-headed checkpoint, or an init that rewrites
  the base) the returned record has `base_pending` set and the first save writes the base to
  `RUN/base/` (`honelm.checkpoint.save_adapter`).
* `carried_config` + `load_carried` (`lora.carry`): the adapter recorded by
  `honelm.models.load_for_carry` attached again, with its weights, to keep training it.

Reading adapter directories and merging them is `honelm.adapters` / `honelm.models.load_merged`;
saving them is `honelm.checkpoint`.

The maths (METHODS.md §1): h = W0 x + (alpha/r) B A x with B = 0 at init, so the adapted model
equals the base before the first step; rsLoRA scales by alpha/sqrt(r); DoRA rescales each
output row by a learned magnitude. All of it is peft's code; nothing here reimplements a layer.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Sequence

import peft
import torch
from peft import TaskType
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from honelm.adapters import mutates_base, quiet_peft
from honelm.boosters.base import ADAPTER_REFERENCE, Booster, Space, range_around, widen_range
from honelm.bounds import DROPOUT, above, at_least, between
from honelm.checkpoint import is_peft_model
from honelm.errors import ConfigError, HonelmError
from honelm.models import LoadedModel, model_kind

# init_lora_weights values honelm passes through. "default" is peft's True (kaiming-uniform A,
# B = 0). pissa/olora rewrite the base weights (W0 -> W0 - scaling*B0*A0) so the sum is unchanged;
# the rewritten base is then saved with the run (`honelm.adapters.mutates_base`).
_INIT_NAMES = ("default", "gaussian", "orthogonal", "pissa", "pissa_niter_<N>", "olora")
# Why the other peft inits are refused (one line each, shown in the error).
_INIT_REFUSED = {
    "false": "random A and B: the model is not the base model before training (peft keeps it for debugging)",
    "eva": "needs a pass over the training data that honelm does not wire up",
    "corda": "needs a pass over the training data that honelm does not wire up",
    "lora_ga": "needs gradients from the training data that honelm does not wire up",
    "loftq": "quantises the base model",
    "mica": "freezes B, which honelm's parameter accounting does not expect",
}
# Module types peft's LoRA can wrap; anything else matched by a target spec is not a target.
_LINEAR_TYPE_NAMES = ("Linear", "Conv1D")  # torch.nn.Linear; transformers' GPT-2 style Conv1D
_OTHER_TARGET_TYPES: tuple[type[nn.Module], ...] = (nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class LoraConfig:
    """LoRA: train low-rank updates of the chosen weight matrices (and new heads) with the base frozen."""

    enabled: bool = False
    """Train a LoRA adapter instead of every weight; best/ is then a PEFT adapter directory (+ tokenizer)."""
    r: Annotated[int, at_least(1)] = 8
    """Rank of each update B·A (A: r x d_in, B: d_out x r)."""
    alpha: Annotated[float, above(0)] = 16.0
    """Scaling numerator: the update is multiplied by alpha/r (alpha/sqrt(r) with rslora)."""
    dropout: Annotated[float, DROPOUT] = 0.0
    """Dropout on the input of the LoRA branch only. 0 (peft's default) by default: peft keeps one dropped-out copy of the input per adapted module, which costs memory and time (benchmarks/lora_memory.py); with dora it also costs an extra matmul."""
    target_modules: str = "auto"
    """Modules that get an adapter: auto (the default: a decoder-based classifier's every Linear and its input embedding, otherwise every Linear; docs/benchmarks.md, "Why LoRA lost"), all-linear (every Linear except the output/head layer), embeddings (the input token embedding; not when it is tied to the output layer), module names or name suffixes (q_proj,v_proj), comma-separated and combinable (all-linear,embeddings), or a regex over full module names prefixed with re: (re:.*\\.(q|v)_proj)."""
    rslora: bool = False
    """Rank-stabilised LoRA: scale by alpha/sqrt(r) instead of alpha/r (peft use_rslora)."""
    dora: bool = False
    """DoRA: a learned per-row magnitude times the normalised W0 + BA direction (peft use_dora); slower, merge for inference."""
    init: str = "default"
    """Adapter init: default (kaiming A, B = 0), gaussian, orthogonal (even r), pissa, pissa_niter_N, olora. pissa/olora rewrite the base weights, so the run saves its own base/ copy."""
    bias: Literal["none", "lora_only", "all"] = "none"
    """Also train biases: none, those of adapted modules (lora_only), or all (saved with the adapter)."""
    lr_ratio: Annotated[float, above(0)] = 1.0
    """LoRA+ (Hayou et al. 2024): the B matrices train at lr_ratio × train.lr, the A matrices and the fully trained heads at train.lr (the paper suggests 16 for a ratio; 1 = plain LoRA)."""
    head_first: Annotated[float, between(0, 1, open_hi=True)] = 0.0
    """Fraction of the run's optimizer steps at its start in which only the fully trained heads (a new classifier head, say) and, with lora.bias, the biases learn: the adapters (DoRA's magnitudes too) are held at learning rate 0 and join when it ends, at the schedule's rate of that step. Linear probing, then LoRA (LP-FT, Kumar et al. 2022): the adapters then start from a head that already reads the frozen features instead of one still random. MiniLM/ChemProt, lr 1e-3, 0.1: with the pooler adapted (lora.train_pooler=false) +3.1 and +6.0 points on two seeds and a collapse on the third; with the pooler trained (the default) −0.2, −0.2 and +1.7 (docs/lora.md, "A head first"). Needs a head that trains fully (refused otherwise); 0 = off."""
    train_pooler: bool = True
    """A classifier's (or reward model's) pooler, BERT's dense + tanh on the [CLS] state that only the head reads, trains fully as part of the head, as the same layer does inside RoBERTa's, ELECTRA's and DeBERTa's classifier (and in LoRA's paper, Hu et al. 2021). false: a pretrained pooler is adapted with LoRA like any Linear (one the loader initialised afresh trains fully either way, as any new weights do). A pooler the checkpoint never trained for its sentence task (all-MiniLM-L6-v2's outputs stay within ±0.27) then holds a fresh head at the class prior: MiniLM/ChemProt, lr 1e-3, 3 epochs, 3 seeds, dev accuracy 0.648 with it adapted, 0.777 with it trained, full fine-tuning 0.763 (docs/lora.md, "The pooler is part of the head"). Models without a pooler, and other tasks, ignore it."""
    carry: bool = False
    """When model.init_from is a LoRA run: keep training its adapter (its weights, targets, r, alpha, rslora/dora, on the base it was trained on) instead of merging it and starting a fresh one; this section's r/alpha/rslora/dora must match it. New heads still train fully. Not for dpo/ppo (their reference is the policy with adapters off)."""


# ----------------------------------------------------------------------------------------------
# validation and target resolution


def peft_init(init: str, r: int) -> bool | str:
    """honelm's `lora.init` → peft's `init_lora_weights`, or ConfigError saying what is accepted."""
    key = init.strip().lower()
    if key in ("default", "true"):
        return True
    if key in ("gaussian", "pissa", "olora"):
        return key
    if key == "orthogonal":
        if r % 2:
            raise ConfigError(f"lora.init=orthogonal needs an even lora.r, got {r}")
        return key
    if re.fullmatch(r"pissa_niter_\d+", key):
        return key
    why = _INIT_REFUSED.get(key.split("_niter")[0] if key.startswith("pissa") else key)
    reason = f" ({why})" if why else ""
    raise ConfigError(f"lora.init={init!r} is not supported{reason}; choose one of {', '.join(_INIT_NAMES)}")


def check_config(cfg: LoraConfig) -> bool | str:
    """Validate the section; return peft's init_lora_weights value."""
    if cfg.r < 1:
        raise ConfigError(f"lora.r must be >= 1, got {cfg.r}")
    if cfg.alpha <= 0:
        raise ConfigError(f"lora.alpha must be > 0, got {cfg.alpha}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"lora.dropout must be in [0, 1), got {cfg.dropout}")
    if not cfg.lr_ratio > 0:
        raise ConfigError(f"lora.lr_ratio must be > 0, got {cfg.lr_ratio}")
    if not 0.0 <= cfg.head_first < 1.0:
        raise ConfigError(f"lora.head_first must be in [0, 1), got {cfg.head_first}")
    if not cfg.target_modules.strip():
        raise ConfigError("lora.target_modules is empty: use all-linear, names like q_proj,v_proj, or re:REGEX")
    return peft_init(cfg.init, cfg.r)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ in _LINEAR_TYPE_NAMES


def _is_target_type(module: nn.Module) -> bool:
    return _is_linear(module) or isinstance(module, _OTHER_TARGET_TYPES)


def _under(name: str, roots: Sequence[str]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


def linear_suffixes(model: nn.Module) -> list[str]:
    """Deduplicated last name parts of the model's linear modules (q_proj, k_proj, ...), in model order."""
    seen: dict[str, None] = {}
    for name, module in model.named_modules():
        if name and _is_linear(module):
            seen.setdefault(name.rsplit(".", 1)[-1], None)
    return list(seen)


def _no_match(model: nn.Module, spec: str, what: str) -> ConfigError:
    return ConfigError(
        f"lora.target_modules={spec!r}: {what} no Linear/Embedding/Conv module of {type(model).__name__}; "
        f"its linear modules are: {', '.join(linear_suffixes(model))} "
        "(use all-linear, a comma-separated list of these names, or a regex over full names as re:REGEX)")


def auto_targets(model: nn.Module, task: str) -> str:
    """What `lora.target_modules=auto` means for this model and task.

    A decoder-based classifier (or reward model) adapts its input embedding as well as every Linear:
    on honelm's small pre-trained decoders all-linear LoRA stayed near chance while LoRA with the
    embedding matched full fine-tuning (demo decoder 0.575 vs 0.992; tests' decoder 0.60 vs 0.775).
    An encoder classifier keeps all-linear: on MiniLM/SST-2 the embedding adapters cost 3.3 points
    at the same learning rate (0.800 vs 0.833, one seed). A language model keeps all-linear too: its
    embedding is usually tied to the output layer, which an embedding adapter's merge would change.
    Measurements: docs/benchmarks.md, "Why LoRA lost".
    """
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = out is not None and emb is not None and getattr(out, "weight", None) is getattr(emb, "weight", None)
    try:
        decoder = model_kind(model) == "decoder"
    except ConfigError:
        decoder = False
    return "all-linear,embeddings" if task == "classify" and decoder and emb is not None and not tied else "all-linear"


def resolve_targets(model: nn.Module, spec: str, exclude: Sequence[str] = ()) -> list[str]:
    """Full names of the modules `spec` selects (see LoraConfig.target_modules), minus `exclude` subtrees.

    Resolving here, not in peft, lets a spec that selects nothing (or a list entry that selects
    nothing: usually a typo) fail with the model's own module names, and makes the saved
    adapter_config.json list exactly what was adapted.
    """
    spec = spec.strip()
    candidates = [(n, m) for n, m in model.named_modules() if n and _is_target_type(m) and not _under(n, exclude)]
    if spec.startswith("re:"):
        try:
            pattern = re.compile(spec[3:])
        except re.error as e:
            raise ConfigError(f"lora.target_modules={spec!r}: invalid regex: {e}") from None
        chosen = [n for n, _ in candidates if pattern.fullmatch(n)]  # peft's own rule for a string: fullmatch
        if not chosen:
            raise _no_match(model, spec, "the regex (matched against full module names) matches")
        return chosen
    listed: list[str] = []
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        if entry.lower() == "all-linear":
            # the output layer (tied to the input embedding in honelm's decoders) is not a target
            out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            hits = [n for n, m in candidates if _is_linear(m) and m is not out]
        elif entry.lower() == "embeddings":
            hits = [_input_embeddings(model, spec, candidates)]
        else:
            hits = [n for n, _ in candidates if n == entry or n.endswith("." + entry)]  # peft's rule for a list
        if not hits:
            raise _no_match(model, spec, f"{entry!r} finds" if entry.lower() == "all-linear" else f"{entry!r} names")
        listed.extend(h for h in hits if h not in listed)
    return listed


def _input_embeddings(model: nn.Module, spec: str, candidates: list[tuple[str, nn.Module]]) -> str:
    """The full name of the model's input (token) embedding, for the `embeddings` target.

    Refused when the output layer shares its weight: LoRA on the embedding changes only the input
    lookup while training, but merging it would change the tied output layer as well.
    """
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    name = next((n for n, m in candidates if m is emb), None)
    if emb is None or name is None:
        raise ConfigError(f"lora.target_modules={spec!r}: {type(model).__name__} has no input embedding to adapt")
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None and getattr(out, "weight", None) is emb.weight:
        raise ConfigError(f"lora.target_modules={spec!r}: the input embedding of {type(model).__name__} is tied to its "
                          "output layer, so a merged embedding adapter would change the output layer too; leave "
                          "'embeddings' out for this model (a classifier's head is not tied)")
    return name


def modules_to_save(model: nn.Module, task: str, new_weights: Sequence[str], pooler: bool) -> list[str]:
    """Modules that train fully and are saved with the adapter.

    For a classifier: every top-level child with parameters other than the trunk
    (`base_model_prefix`): `score` for LlamaForSequenceClassification, `classifier` for BERT,
    `pre_classifier` + `classifier` for DistilBERT. A frozen random head would cap what LoRA can learn.
    With `pooler` (`lora.train_pooler`), also the trunk's `pooler` (BERT's dense + tanh on [CLS]): it is
    the classification head's first layer in all but name (RoBERTa, ELECTRA and DeBERTa hold that layer
    inside `classifier`), and a pretrained pooler left frozen under LoRA can make its outputs too small
    for a fresh head to read (all-MiniLM-L6-v2's stay within ±0.27; docs/lora.md).
    For any task: the largest modules whose weights the loader all initialised afresh
    (`new_weights`, `LoadedModel.new_weights`), e.g. BERT's pooler when an MLM checkpoint becomes a
    classifier, or an MLM head's transform on a bare encoder. A module that also holds loaded
    weights is never wrapped: an MLM head's decoder is the tied input embedding, and training a copy
    of it would untie it and train vocab x hidden weights. New weights of such mixed modules (an MLM
    output bias) stay at their init; see `uncovered_new_weights`.
    """
    names: list[str] = []
    if task == "classify":
        trunk = getattr(model, "base_model_prefix", "")
        names += [n for n, child in model.named_children() if n != trunk and any(True for _ in child.parameters())]
        pooling = getattr(getattr(model, trunk, None), "pooler", None) if trunk else None
        if pooler and isinstance(pooling, nn.Module) and any(True for _ in pooling.parameters()):
            names.append(f"{trunk}.pooler")
    new = set(new_weights)
    if new:
        for name, module in model.named_modules():
            params = [p for p, _ in module.named_parameters(prefix=name)]
            if name and params and all(p in new for p in params) and not _under(name, names):
                names.append(name)
    out: list[str] = []
    for n in sorted(set(names), key=lambda s: (s.count("."), s)):  # parents first, then drop their children
        if not _under(n, out):
            out.append(n)
    return out


def trained_heads(model: nn.Module, cfg: LoraConfig, task: str, new_weights: Sequence[str],
                  carried: dict[str, Any] | None = None) -> list[str]:
    """`modules_to_save` for this `lora` section. A carried adapter keeps its own split: a module it holds
    adapter tensors for (the pooler of an adapter trained with `lora.train_pooler=false`) stays adapted."""
    heads = modules_to_save(model, task, new_weights, cfg.train_pooler)
    if carried is None:
        return heads
    path = Path(carried["dir"]) / "adapter_model.safetensors"
    if not path.is_file():
        return heads  # load_carried says what is missing
    with safe_open(str(path), framework="pt") as f:
        adapted = ["." + k for k in f.keys() if ".lora_" in k]
    return [h for h in heads if not any(f".{h}." in k for k in adapted)]


def uncovered_new_weights(new_weights: Sequence[str], heads: Sequence[str]) -> list[str]:
    """Freshly initialised weights that no fully trained module holds (they stay at their init)."""
    return [w for w in new_weights if not _under(w.rsplit(".", 1)[0], heads) and not _under(w, heads)]


def _task_type(task: str, model: nn.Module) -> Any:

    if task == "classify":
        return TaskType.SEQ_CLS  # PeftModelForSequenceClassification; AutoPeftModelForSequenceClassification loads it
    if task == "lm":
        try:
            if model_kind(model) == "decoder":
                return TaskType.CAUSAL_LM
        except ConfigError:
            pass
    return None  # plain PeftModel (e.g. masked LM: peft has no task type for it)


# ----------------------------------------------------------------------------------------------
# apply


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) of a PeftModel, each tensor once; the frozen copy of a fully trained head
    (`original_module`) is not counted, since it is neither trained nor part of the adapted model."""
    trainable = total = 0
    for name, p in model.named_parameters():
        if ".original_module." in name:
            continue
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def peft_config(model: nn.Module, cfg: LoraConfig, task: str, new_weights: Sequence[str]) -> Any:
    """The `peft.LoraConfig` for `model`: validated section, resolved targets, heads to train fully."""

    init = check_config(cfg)
    heads = trained_heads(model, cfg, task, new_weights)
    spec = auto_targets(model, task) if cfg.target_modules.strip().lower() == "auto" else cfg.target_modules
    targets = resolve_targets(model, spec, exclude=heads)
    task_type = _task_type(task, model)
    # peft adds classifier/score itself for SEQ_CLS; pass only the others so the saved list has no repeats
    extra_heads = [h for h in heads if task_type is None or h not in ("classifier", "score")]
    alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha  # adapter_config.json shows 16, not 16.0
    return peft.LoraConfig(
        r=cfg.r, lora_alpha=alpha, lora_dropout=cfg.dropout, target_modules=targets,
        modules_to_save=extra_heads or None, bias=cfg.bias, use_rslora=cfg.rslora, use_dora=cfg.dora,
        init_lora_weights=init, task_type=task_type)


def apply_lora(loaded: LoadedModel, cfg: LoraConfig, task: str, say: Callable[[str], None]) -> LoadedModel:
    """Freeze `loaded.model` and return a record whose model is it wrapped as a peft PeftModel with LoRA per `cfg`.

    `task` is the stage's model task ("lm", "mlm", "classify", ...): a classifier's head trains
    fully. `loaded.source` is the directory whose weights the model holds; it becomes the adapter's
    `base_model_name_or_path`. Without one (or with an init that rewrites the base), the returned
    record's `base_pending` is set: the base is saved into the run when the adapter is first saved.
    `loaded.carry` (`honelm.models.load_for_carry`) attaches that adapter again with its weights.
    """

    model, carried = loaded.model, loaded.carry
    if is_peft_model(model):
        raise HonelmError("the model already carries a peft adapter; load it merged (model.init_from does) first")
    config = (peft_config(model, cfg, task, loaded.new_weights) if carried is None
              else carried_config(model, cfg, task, carried, loaded.new_weights))
    heads = trained_heads(model, cfg, task, loaded.new_weights, carried)
    if cfg.head_first > 0 and not heads:
        raise ConfigError(f"lora.head_first={cfg.head_first:g} holds the adapters back while only the fully trained "
                          f"heads learn, but LoRA on this {type(model).__name__} trains no head (nothing would learn "
                          "in those steps); set lora.head_first=0")
    try:
        # The adapter init draws from its own stream seeded by the run seed (torch.initial_seed() is what
        # seed_everything set), so it does not depend on what consumed random numbers before, and adding
        # LoRA leaves the global stream (dropout) as it was.
        with quiet_peft(), torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(torch.initial_seed())  # CPU only: CUDA streams stay as they are
            wrapped = peft.get_peft_model(model, config)
    except (ValueError, NotImplementedError) as e:  # peft's own checks (e.g. DoRA on a layer type it lacks)
        raise ConfigError(f"peft could not apply LoRA: {e}") from None
    pending = loaded.source is None or mutates_base(cfg.init)
    wrapped.peft_config["default"].base_model_name_or_path = None if pending else loaded.source
    if carried is not None:
        say(load_carried(wrapped, carried))
    say(_summary(wrapped, cfg, sorted(config.target_modules), heads))
    frozen_new = uncovered_new_weights(loaded.new_weights, heads)
    if frozen_new:
        say(f"lora: note: newly initialised {', '.join(frozen_new)} share a module with loaded weights and stay at their init")
    return dataclasses.replace(loaded, model=wrapped, base_pending=pending)  # the first save writes RUN/base/ if pending


def carried_config(model: nn.Module, cfg: LoraConfig, task: str, carried: dict[str, Any],
                   new_weights: Sequence[str]) -> Any:
    """The `peft.LoraConfig` that re-creates a carried adapter on `model` (see `honelm.models.load_for_carry`).

    Rank, alpha, targets and variant are the adapter's: a stage setting that contradicts them is an
    error rather than silently ignored. Dropout is this stage's (it is a training choice, not part
    of the weights). The heads to train fully are this task's.
    """

    saved, where = carried["config"], carried["dir"]
    check_config(cfg)
    theirs = {"r": saved.get("r"), "alpha": saved.get("lora_alpha"), "rslora": bool(saved.get("use_rslora")),
              "dora": bool(saved.get("use_dora")), "bias": saved.get("bias", "none")}
    mine = {"r": cfg.r, "alpha": cfg.alpha, "rslora": cfg.rslora, "dora": cfg.dora, "bias": cfg.bias}
    wrong = [f"lora.{k}={mine[k]} but the adapter has {theirs[k]}" for k in mine
             if (float(mine[k]) != float(theirs[k]) if k in ("r", "alpha") else mine[k] != theirs[k])]
    if cfg.init.strip().lower() not in ("default", "true"):
        wrong.append(f"lora.init={cfg.init} would be overwritten by the adapter's trained weights (leave it default)")
    if wrong:
        raise ConfigError(f"lora.carry=true continues the adapter in {where}: {'; '.join(wrong)} (set them to match, "
                          "or lora.carry=false to merge it into the base and start a fresh adapter)")
    targets = saved.get("target_modules")
    if not targets:
        raise HonelmError(f"{where}/adapter_config.json: no target_modules, so there is no adapter to carry on")
    heads = trained_heads(model, cfg, task, new_weights, carried)
    task_type = _task_type(task, model)
    extra_heads = [h for h in heads if task_type is None or h not in ("classifier", "score")]
    return peft.LoraConfig(
        r=int(saved["r"]), lora_alpha=saved["lora_alpha"], lora_dropout=cfg.dropout,
        target_modules=sorted(targets) if isinstance(targets, list) else targets, modules_to_save=extra_heads or None,
        bias=theirs["bias"], use_rslora=theirs["rslora"], use_dora=theirs["dora"], init_lora_weights=True,
        task_type=task_type)


def load_carried(wrapped: nn.Module, carried: dict[str, Any]) -> str:
    """Copy a carried adapter's weights into `wrapped`; returns the log line saying what was carried.

    Every adapter tensor of a module this model has must load (same name, same shape), or it is an
    error. Tensors of modules the new task lacks (an MLM head's adapter when a classifier continues
    from a DAPT run) and heads of another shape (a classifier with other labels) stay behind, and
    the line names them.
    """

    where = Path(carried["dir"])
    path = where / "adapter_model.safetensors"
    if not path.is_file():
        raise HonelmError(f"{where}: no adapter_model.safetensors to carry on")
    saved = load_file(str(path))
    mine = get_peft_model_state_dict(wrapped)
    absent = sorted(k for k in mine if "lora_" in k and k not in saved)
    if absent:
        raise HonelmError(f"{path}: no weights for {len(absent)} adapter tensors this model needs "
                          f"(first: {absent[0]}); the adapter does not fit this model")
    wrong = sorted(k for k in mine if "lora_" in k and saved[k].shape != mine[k].shape)
    if wrong:
        raise HonelmError(f"{path}: {wrong[0]} has shape {tuple(saved[wrong[0]].shape)}, this model needs "
                          f"{tuple(mine[wrong[0]].shape)}; the adapter does not fit this model")
    take = {k: v for k, v in saved.items() if k in mine and v.shape == mine[k].shape}
    # peft looks up every module-to-save it knows: the heads not carried keep their current (fresh) values
    result = set_peft_model_state_dict(wrapped, {**mine, **take})
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise HonelmError(f"{path}: peft did not place {unexpected[0]} (and {len(unexpected) - 1} more)")
    left = sorted(k.removeprefix("base_model.model.") for k in set(saved) - set(take))
    heads = sorted({k for k in take if "lora_" not in k})
    line = (f"lora: carried on the adapter of {where}: {sum(1 for k in take if 'lora_' in k)} adapter tensors"
            + (f" and {len(heads)} head tensors" if heads else ""))
    if left:
        shown = ", ".join(left[:4]) + (f" and {len(left) - 4} more" if len(left) > 4 else "")
        line += f"; left behind (no such module of that shape in this model): {shown}"
    return line


def _summary(wrapped: nn.Module, cfg: LoraConfig, targets: list[str], heads: list[str]) -> str:
    trainable, total = parameter_counts(wrapped)
    scaling = cfg.alpha / (cfg.r ** 0.5 if cfg.rslora else cfg.r)
    variant = "DoRA" if cfg.dora else "rsLoRA" if cfg.rslora else "LoRA"
    # count the modules that really carry an adapter: peft may have folded the target list into suffixes
    adapted = sum(1 for m in wrapped.modules() if hasattr(m, "lora_A") and len(getattr(m, "lora_A")) > 0)
    kinds = [k for k in linear_suffixes(wrapped.get_base_model()) if any(t.rsplit(".", 1)[-1] == k for t in targets)]
    kinds += sorted({t.rsplit(".", 1)[-1] for t in targets} - set(kinds))  # embeddings, convs
    return (f"lora: {variant} r={cfg.r} alpha={cfg.alpha:g} (scaling {scaling:.4g}), init {cfg.init}, "
            f"on {adapted} modules ({', '.join(kinds)})" + (f"; trained fully: {', '.join(heads)}" if heads else "")
            + f"; {trainable:,} trainable of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)"
            + (f"; the heads first: adapters held for the first {cfg.head_first:.0%} of the steps"
               if cfg.head_first else ""))


# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# the booster's hooks (honelm.boosters.base.Booster)


def check(cfg: LoraConfig, capabilities: frozenset[str], stage: str) -> None:
    """Refuse, at config time, LoRA settings the stage cannot honour.

    A stage whose reference is its own policy with the adapters disabled (ADAPTER_REFERENCE: dpo,
    ppo) needs that to be the starting policy: a carried adapter would make it the model before
    that adapter, and pissa/olora rewrite the base weights.
    """
    if cfg.carry and not cfg.enabled:
        raise ConfigError("lora.carry=true needs lora.enabled=true (it keeps training the init_from run's adapter)")
    if not cfg.enabled:
        return
    check_config(cfg)
    if ADAPTER_REFERENCE not in capabilities:
        return
    if cfg.carry:
        raise ConfigError(f"lora.carry=true is not available for {stage}: its reference is the policy with adapters "
                          "disabled, which would then be the model before the carried adapter; leave lora.carry=false "
                          "(the init_from adapter is merged, and a fresh adapter trains on top)")
    if mutates_base(cfg.init):
        raise ConfigError(f"{stage} with lora.init={cfg.init}: that init rewrites the base weights, so the "
                          f"adapter-disabled model is not the starting policy ({stage}'s reference); use the default init")


def carries(cfg: LoraConfig) -> bool:
    """`lora.carry`: the loader keeps init_from's adapter (its base is loaded, the adapter attached again)."""
    return cfg.enabled and cfg.carry


def transform(loaded: LoadedModel, cfg: LoraConfig, task: str, say: Callable[[str], None]) -> LoadedModel:
    """The booster's model transform: LoRA on the loaded model when `lora.enabled`."""
    return apply_lora(loaded, cfg, task, say) if cfg.enabled else loaded


def lr_scale(cfg: LoraConfig) -> Callable[[str], float] | None:
    """LoRA+: the B matrices' learning-rate multiplier (`lora.lr_ratio`), by parameter name; None when it is 1."""
    if not cfg.enabled or cfg.lr_ratio == 1.0:
        return None
    return lambda name: cfg.lr_ratio if ".lora_B." in name or ".lora_embedding_B." in name else 1.0


def lr_hold(cfg: LoraConfig) -> tuple[Callable[[str], bool], float] | None:
    """`lora.head_first`: (which parameters wait: the adapters', by name; the share of the steps they wait), or
    None when nothing waits."""
    if not cfg.enabled or cfg.head_first == 0:
        return None
    return (lambda name: ".lora_" in name), cfg.head_first


# LoRA trains a few adapter weights from zero (B = 0) on a frozen base and often wants a higher learning rate than
# full fine-tuning: about an order of magnitude for RoBERTa-base (Hu et al. 2021 searched 4e-4 to 5e-4 where full
# fine-tuning uses 1e-5 to 3e-5). On MiniLM/ChemProt, with the pooler trained as part of the head, 3x to 12x full
# fine-tuning's searched rate all end at or above it, and 19x is 3 points behind (docs/lora.md); on the demo's decoder
# 1-3x. So its search range is the baseline's widened up to this factor.
LR_FACTOR = 10.0
LR_AROUND = 3.0  # no learning-rate range to widen: start from a factor of 3 either side of the config's lr


def space(cfg: LoraConfig, stage_cfg: Any, base: Space) -> Space:
    """With LoRA on, the baseline's learning-rate range widened to reach LR_FACTOR times higher (or, when the
    baseline searches no learning rate, a log range from the stage config's lr / LR_AROUND to LR_FACTOR x LR_AROUND
    times it)."""
    if not cfg.enabled:
        return base
    lr = base.ranges.get("train.lr")
    moved = widen_range(lr if lr is not None else range_around(stage_cfg.train.lr, LR_AROUND), LR_FACTOR)
    return Space({**base.ranges, "train.lr": moved}, dict(base.fixed))


BOOSTER = Booster("lora", "lora", check=check, transform=transform, carries=carries, space=space,
                  lr_scale=lr_scale, lr_hold=lr_hold)
