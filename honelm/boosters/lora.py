"""LoRA (and rsLoRA, DoRA) as a model transform, built on `peft`; adapter directories in and out.

This module owns:

* `LoraConfig`: the `lora` section of a stage config (honelm's names; peft's class is `peft.LoraConfig`).
* `apply_lora`: freeze the model and wrap it in a `peft.PeftModel` with LoRA on the chosen modules.
  Heads the task adds (a classifier's `score`/`classifier`) and every weight the loader had to
  initialise afresh train fully (`modules_to_save`), so they are saved with the adapter.
* `save_adapter`: what `honelm.checkpoint.save_pretrained_atomic` calls for a PeftModel: the
  standard PEFT directory (adapter_config.json + adapter_model.safetensors) whose
  `base_model_name_or_path` points to a directory holding exactly the weights LoRA was applied to.
  When no such directory exists (random init, a merged adapter, a re-headed checkpoint, or an
  init that rewrites the base), the base is written once to `RUN/base/`.
* `load_for_carry` + `apply_lora` (`lora.carry`): an adapter directory → its base, re-headed for
  the task, and the same adapter attached again with its weights, to keep training it.
* `load_merged`: an adapter directory → base model + adapter, merged (`merge_and_unload`), for the
  task asked. `honelm.models.load_model` calls it, so `model.init_from`, `honelm test`,
  `honelm generate` and `honelm export --merge` all accept adapter directories.

The maths (METHODS.md §1): h = W0 x + (alpha/r) B A x with B = 0 at init, so the adapted model
equals the base before the first step; rsLoRA scales by alpha/sqrt(r); DoRA rescales each
output row by a learned magnitude. All of it is peft's code; nothing here reimplements a layer.
"""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import torch
from torch import nn

from honelm.errors import ConfigError, HonelmError

# init_lora_weights values honelm passes through. "default" is peft's True (kaiming-uniform A,
# B = 0). pissa/olora rewrite the base weights (W0 -> W0 - scaling*B0*A0) so the sum is unchanged;
# the rewritten base is then saved with the run (see save_adapter).
_INIT_NAMES = ("default", "gaussian", "orthogonal", "pissa", "pissa_niter_<N>", "olora")
_BASE_MUTATING = ("pissa", "olora")
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
    r: int = 8
    """Rank of each update B·A (A: r x d_in, B: d_out x r)."""
    alpha: float = 16.0
    """Scaling numerator: the update is multiplied by alpha/r (alpha/sqrt(r) with rslora)."""
    dropout: float = 0.0
    """Dropout on the input of the LoRA branch only. 0 (peft's default) by default: peft keeps one dropped-out copy of the input per adapted module, which costs memory and time (benchmarks/lora_memory.py); with dora it also costs an extra matmul."""
    target_modules: str = "all-linear"
    """Modules that get an adapter: all-linear (every Linear except the output/head layer), a comma-separated list of module names or name suffixes (q_proj,v_proj), or a regex over full module names prefixed with re: (re:.*\\.(q|v)_proj)."""
    rslora: bool = False
    """Rank-stabilised LoRA: scale by alpha/sqrt(r) instead of alpha/r (peft use_rslora)."""
    dora: bool = False
    """DoRA: a learned per-row magnitude times the normalised W0 + BA direction (peft use_dora); slower, merge for inference."""
    init: str = "default"
    """Adapter init: default (kaiming A, B = 0), gaussian, orthogonal (even r), pissa, pissa_niter_N, olora. pissa/olora rewrite the base weights, so the run saves its own base/ copy."""
    bias: Literal["none", "lora_only", "all"] = "none"
    """Also train biases: none, those of adapted modules (lora_only), or all (saved with the adapter)."""
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


def mutates_base(init: str) -> bool:
    """True for inits that rewrite the frozen base weights (the saved base must be this run's own)."""
    return init.strip().lower().startswith(_BASE_MUTATING)


def check_config(cfg: LoraConfig) -> bool | str:
    """Validate the section; return peft's init_lora_weights value."""
    if cfg.r < 1:
        raise ConfigError(f"lora.r must be >= 1, got {cfg.r}")
    if cfg.alpha <= 0:
        raise ConfigError(f"lora.alpha must be > 0, got {cfg.alpha}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"lora.dropout must be in [0, 1), got {cfg.dropout}")
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


def resolve_targets(model: nn.Module, spec: str, exclude: Sequence[str] = ()) -> list[str]:
    """Full names of the modules `spec` selects (see LoraConfig.target_modules), minus `exclude` subtrees.

    Resolving here, not in peft, lets a spec that selects nothing (or a list entry that selects
    nothing: usually a typo) fail with the model's own module names, and makes the saved
    adapter_config.json list exactly what was adapted.
    """
    spec = spec.strip()
    candidates = [(n, m) for n, m in model.named_modules() if n and _is_target_type(m) and not _under(n, exclude)]
    if spec.lower() == "all-linear":
        # the output layer (tied to the input embedding in honelm's decoders) is not a target
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        chosen = [n for n, m in candidates if _is_linear(m) and m is not out]
        if not chosen:
            raise _no_match(model, spec, "all-linear finds")
        return chosen
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
        hits = [n for n, _ in candidates if n == entry or n.endswith("." + entry)]  # peft's rule for a list
        if not hits:
            raise _no_match(model, spec, f"{entry!r} names")
        listed.extend(h for h in hits if h not in listed)
    return listed


def modules_to_save(model: nn.Module, task: str) -> list[str]:
    """Modules that train fully and are saved with the adapter.

    For a classifier: every top-level child with parameters other than the trunk
    (`base_model_prefix`): `score` for LlamaForSequenceClassification, `classifier` for BERT,
    `pre_classifier` + `classifier` for DistilBERT. A frozen random head would cap what LoRA can learn.
    For any task: the largest modules whose weights the loader all initialised afresh
    (`honelm_new_weights`), e.g. BERT's pooler when an MLM checkpoint becomes a classifier, or an
    MLM head's transform on a bare encoder. A module that also holds loaded weights is never
    wrapped: an MLM head's decoder is the tied input embedding, and training a copy of it would
    untie it and train vocab x hidden weights. New weights of such mixed modules (an MLM output
    bias) stay at their init; see `uncovered_new_weights`.
    """
    names: list[str] = []
    if task == "classify":
        trunk = getattr(model, "base_model_prefix", "")
        names += [n for n, child in model.named_children() if n != trunk and any(True for _ in child.parameters())]
    new = set(getattr(model, "honelm_new_weights", None) or [])
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


def uncovered_new_weights(model: nn.Module, heads: Sequence[str]) -> list[str]:
    """Freshly initialised weights that no fully trained module holds (they stay at their init)."""
    new = getattr(model, "honelm_new_weights", None) or []
    return [w for w in new if not _under(w.rsplit(".", 1)[0], heads) and not _under(w, heads)]


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """peft 0.21 reads an attribute transformers 5 deprecated: a FutureWarning that is not the user's concern."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _task_type(task: str, model: nn.Module) -> Any:
    from peft import TaskType

    if task == "classify":
        return TaskType.SEQ_CLS  # PeftModelForSequenceClassification; AutoPeftModelForSequenceClassification loads it
    if task == "lm":
        from honelm.models import model_kind

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


def peft_config(model: nn.Module, cfg: LoraConfig, task: str) -> Any:
    """The `peft.LoraConfig` for `model`: validated section, resolved targets, heads to train fully."""
    import peft

    init = check_config(cfg)
    heads = modules_to_save(model, task)
    targets = resolve_targets(model, cfg.target_modules, exclude=heads)
    task_type = _task_type(task, model)
    # peft adds classifier/score itself for SEQ_CLS; pass only the others so the saved list has no repeats
    extra_heads = [h for h in heads if task_type is None or h not in ("classifier", "score")]
    alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha  # adapter_config.json shows 16, not 16.0
    return peft.LoraConfig(
        r=cfg.r, lora_alpha=alpha, lora_dropout=cfg.dropout, target_modules=targets,
        modules_to_save=extra_heads or None, bias=cfg.bias, use_rslora=cfg.rslora, use_dora=cfg.dora,
        init_lora_weights=init, task_type=task_type)


def apply_lora(model: nn.Module, cfg: LoraConfig, task: str, say: Callable[[str], None]) -> nn.Module:
    """Freeze `model` and return it wrapped as a peft PeftModel with LoRA per `cfg`.

    `task` is the stage's model task ("lm", "mlm", "classify", ...): a classifier's head trains
    fully. The model's `honelm_source` (set by `honelm.models.load_model`) is the directory whose
    weights the model holds; it becomes the adapter's `base_model_name_or_path`. Without one, the
    base is saved into the run when the adapter is first saved.
    """
    import peft

    if isinstance(model, peft.PeftModel):
        raise HonelmError("the model already carries a peft adapter; load it merged (model.init_from does) first")
    carried = getattr(model, "honelm_carry", None)
    config = peft_config(model, cfg, task) if carried is None else carried_config(model, cfg, task, carried)
    heads = modules_to_save(model, task)
    try:
        # The adapter init draws from its own stream seeded by the run seed (torch.initial_seed() is what
        # seed_everything set), so it does not depend on what consumed random numbers before, and adding
        # LoRA leaves the global stream (dropout) as it was.
        with _quiet_peft(), torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(torch.initial_seed())  # CPU only: CUDA streams stay as they are
            wrapped = peft.get_peft_model(model, config)
    except (ValueError, NotImplementedError) as e:  # peft's own checks (e.g. DoRA on a layer type it lacks)
        raise ConfigError(f"peft could not apply LoRA: {e}") from None
    source = getattr(model, "honelm_source", None)
    pending = source is None or mutates_base(cfg.init)
    wrapped.peft_config["default"].base_model_name_or_path = None if pending else source
    wrapped.honelm_base_pending = pending  # save_adapter writes RUN/base/ once
    if carried is not None:
        say(load_carried(wrapped, carried))
    say(_summary(wrapped, cfg, sorted(config.target_modules), heads))
    frozen_new = uncovered_new_weights(model, heads)
    if frozen_new:
        say(f"lora: note: newly initialised {', '.join(frozen_new)} share a module with loaded weights and stay at their init")
    return wrapped


def carried_config(model: nn.Module, cfg: LoraConfig, task: str, carried: dict[str, Any]) -> Any:
    """The `peft.LoraConfig` that re-creates a carried adapter on `model` (see `load_for_carry`).

    Rank, alpha, targets and variant are the adapter's: a stage setting that contradicts them is an
    error rather than silently ignored. Dropout is this stage's (it is a training choice, not part
    of the weights). The heads to train fully are this task's.
    """
    import peft

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
    heads = modules_to_save(model, task)
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
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

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
            + f"; {trainable:,} trainable of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)")


# ----------------------------------------------------------------------------------------------
# save


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen base weights of a PeftModel under their original names (no copies).

    peft moves each adapted layer's original into `<name>.base_layer` and keeps a fully trained
    module's original as `<name>.original_module`; adapter tensors all carry `lora_` in their
    names, and trained head copies sit under `.modules_to_save.`.
    """
    out = {}
    for key, tensor in model.get_base_model().state_dict().items():
        if "lora_" in key or ".modules_to_save." in key:
            continue
        out[key.replace(".base_layer.", ".").replace(".original_module.", ".")] = tensor
    return out


def save_base(model: nn.Module, directory: Path) -> None:
    """Write the frozen base of `model` as a plain Hugging Face model directory."""
    base = model.get_base_model()
    directory.mkdir(parents=True, exist_ok=True)
    base.save_pretrained(directory, state_dict=base_state_dict(model), safe_serialization=True)


def save_adapter(model: nn.Module, directory: Path, run_dir: Path) -> None:
    """`model.save_pretrained(directory)` for a PeftModel, with a loadable `base_model_name_or_path`.

    When the base is not on disk as such (`honelm_base_pending`), it is written once to
    `run_dir/base/` (a resumed run finds it there) and the adapter points at its absolute path.
    """
    config = model.peft_config["default"]
    init = config.init_lora_weights
    if getattr(model, "honelm_base_pending", False):
        base_dir = (run_dir / "base").resolve()
        if not (base_dir / "config.json").is_file():
            from honelm.checkpoint import atomic_directory

            with atomic_directory(base_dir) as tmp:
                save_base(model, tmp)
        config.base_model_name_or_path = str(base_dir)
        if isinstance(init, str) and mutates_base(init):
            # The saved base is already the residual W0 - s*B0*A0; an adapter config still saying pissa/olora
            # would make peft decompose it a second time on load. On that base it is a plain LoRA.
            config.init_lora_weights = True
    try:
        model.save_pretrained(str(directory), safe_serialization=True)
    finally:
        config.init_lora_weights = init


# ----------------------------------------------------------------------------------------------
# load


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def native_task(task_type: str | None, base_config: Any) -> str:
    """The task the adapter was trained for: from peft's task_type, else the base's architecture."""
    if task_type == "CAUSAL_LM":
        return "lm"
    if task_type == "SEQ_CLS":
        return "classify"
    for name in getattr(base_config, "architectures", None) or []:
        if name.endswith(("ForCausalLM", "LMHeadModel")):
            return "lm"
        if name.endswith("ForMaskedLM"):
            return "mlm"
        if name.endswith("ForSequenceClassification"):
            return "classify"
    return "base"


def adapter_info(adapter_dir: str | Path) -> dict[str, Any]:
    """adapter_config.json, checked to be a LoRA adapter with a base to load."""
    path = Path(adapter_dir) / "adapter_config.json"
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise HonelmError(f"{path}: cannot read the adapter config: {e}") from None
    if info.get("peft_type") != "LORA":
        raise HonelmError(f"{path}: peft_type {info.get('peft_type')!r}; honelm loads LoRA adapters only")
    if not info.get("base_model_name_or_path"):
        raise HonelmError(f"{path}: no base_model_name_or_path, so there is no base model to attach the adapter to")
    return info


def load_for_carry(adapter_dir: str | Path, task: str, num_labels: int | None = None,
                   id2label: dict | None = None, trust_remote_code: bool = False,
                   problem_type: str | None = None) -> nn.Module:
    """The base an adapter was trained on, loaded for `task` (re-headed when needed), marked so that
    `apply_lora` attaches the same adapter again with its weights (`lora.carry`)."""
    from honelm.models import load_model

    info = adapter_info(adapter_dir)
    base = info["base_model_name_or_path"]
    if Path(base).is_absolute() and not Path(base).exists():
        raise HonelmError(f"{adapter_dir}: the adapter's base model {base} does not exist (moved or deleted?)")
    model = load_model(base, task, num_labels=num_labels, id2label=id2label, trust_remote_code=trust_remote_code,
                       problem_type=problem_type)
    model.honelm_carry = {"dir": str(Path(adapter_dir).resolve()), "config": info}
    return model


def load_merged(adapter_dir: str | Path, task: str | None = None, num_labels: int | None = None,
                id2label: dict | None = None, trust_remote_code: bool = False,
                torch_dtype: torch.dtype = torch.float32, problem_type: str | None = None) -> nn.Module:
    """Base + LoRA adapter from `adapter_dir`, merged into a plain transformers model (in `torch_dtype`).

    The base is loaded for the adapter's own task (a classifier with its own labels), the adapter
    attached and merged with `safe_merge` (a non-finite merged weight is an error). When `task`
    or the label count asked for differ, the merged model goes through a temporary directory
    and `load_model`, which re-heads it exactly as it would any checkpoint. task None = the
    adapter's own task.
    """
    from peft import PeftModel
    from transformers import AutoConfig

    from honelm.models import load_model

    info = adapter_info(adapter_dir)
    base = info["base_model_name_or_path"]
    if Path(base).is_absolute() and not Path(base).exists():
        raise HonelmError(f"{adapter_dir}: the adapter's base model {base} does not exist (moved or deleted?)")
    try:
        base_config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
    except Exception as e:  # IO and hub errors come in many types
        raise HonelmError(f"{adapter_dir}: cannot read the base model config from {base}: {e}") from None
    own = native_task(info.get("task_type"), base_config)
    labels: dict[str, Any] = {}
    if own == "classify":
        is_classifier = any(a.endswith("ForSequenceClassification") for a in base_config.architectures or [])
        if is_classifier or (task != "classify" or (num_labels is None and id2label is None)):
            labels = {"num_labels": base_config.num_labels, "id2label": base_config.id2label}
        else:  # an adapter trained on a re-headed LM: its head has the labels the caller asks for
            labels = {"num_labels": num_labels, "id2label": id2label, "problem_type": problem_type}
    model = load_model(base, own, trust_remote_code=trust_remote_code, torch_dtype=torch_dtype, **labels)
    try:
        with _quiet_peft():
            merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload(safe_merge=True)
    except (RuntimeError, ValueError, KeyError) as e:
        raise HonelmError(f"{adapter_dir}: cannot attach the adapter to its base {base}: {str(e)[:400]}") from None
    merged.honelm_source = None  # merged weights exist on no disk
    wanted = own if task is None else task
    same_head = own != "classify" or num_labels is None or num_labels == merged.config.num_labels
    if wanted == own and same_head:
        if own == "classify" and (num_labels is not None or id2label is not None):
            from honelm.models import _apply_labels

            _apply_labels(merged.config, num_labels, id2label, problem_type)
        merged.eval()
        return merged
    with tempfile.TemporaryDirectory(prefix="honelm-merged-") as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        del merged
        out = load_model(tmp, wanted, num_labels=num_labels, id2label=id2label, trust_remote_code=trust_remote_code,
                         torch_dtype=torch_dtype, problem_type=problem_type)
    out.honelm_source = None
    return out
