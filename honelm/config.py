"""Config sections as dataclasses, YAML presets, and `key.sub=value` overrides.

Precedence: dataclass defaults < YAML file < command-line overrides. Every field documents itself
with an attribute docstring (the string literal right below it), which `describe()` reads back
from the source so `honelm <verb> --help` can print type, default and doc for every field.
Unknown keys fail with a "did you mean" suggestion; values are checked against the annotations.
A preset may declare variables in a `vars:` block and use them as ${vars.NAME} in its values; `build`
fills them from `--var NAME=VALUE` or their defaults, and a missing one is an error saying what to pass and
where to get it (`resolve_vars`; docs/presets.md).

The files of `honelm pipeline`, `search` and `ablate` are config dataclasses too, read by
`from_mapping`: strict (no dotted paths: their `set` fields hold dotted keys as data), sections
nest one, a list or a mapping of named ones deep, and errors name the file, the line where the
section's YAML mapping starts (`LineLoader`) and the dotted field.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import os
import re
import textwrap
import types
import typing
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Collection, Literal, Union, get_args, get_origin

import yaml

from honelm.bounds import DROPOUT, PROBABILITY, above, allowed, at_least, between, check_bounds
from honelm.errors import ConfigError, HonelmError

# --------------------------------------------------------------------------------------------
# Sections shared by stages. Stage-specific sections live next to their stage in honelm/stages.
# --------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    """Where a run lives and how it is seeded."""

    out_dir: str = ""
    """Parent directory of the run; empty = runs/<stage>. A `latest` link there points to the newest run."""
    name: str = ""
    """Run directory name under out_dir; empty = a timestamp."""
    seed: Annotated[int, at_least(0)] = 0
    """Seed for model initialisation, data order and dropout (not for the split: see data.seed)."""
    overwrite: bool = False
    """Reuse the name of an existing honelm run that has no checkpoint to resume: its old files are removed first."""
    trackers: str = ""
    """Experiment trackers besides metrics.jsonl, comma-separated: mlflow, wandb, tensorboard (an asked-for tracker that is not installed is an error). See docs/export.md."""
    tracker_project: str = "honelm"
    """The MLflow experiment and the W&B project the run is logged to."""
    mlflow_uri: str = ""
    """MLflow tracking store; empty = sqlite:///OUT_DIR/mlflow.db, beside the run directory."""
    wandb_mode: Literal["offline", "online"] = "offline"
    """W&B mode: offline writes RUN/wandb/ only (upload later with `wandb sync`); online needs `wandb login`."""


@dataclass
class ModelConfig:
    """Which model to train: a from-scratch preset, an earlier run, or any Hugging Face checkpoint."""

    init_from: str = ""
    """Start from this: a run directory (its best/ model), a checkpoint directory, or a hub id (online only). Empty = random init from the preset."""
    arch: Literal["decoder", "encoder"] = "decoder"
    """From-scratch architecture: decoder (Llama-style) or encoder (BERT-style). Ignored with init_from."""
    size: Literal["test", "tiny", "small", "base"] = "tiny"
    """From-scratch preset size. Ignored with init_from."""
    tokenizer: str = ""
    """Tokenizer directory or `honelm tokenizer` run; empty = the init_from checkpoint's, or (from scratch) one trained on the train split."""
    vocab_size: Annotated[int, at_least(1)] = 8000
    """Vocabulary size of a tokenizer trained on the fly (from scratch without model.tokenizer)."""
    max_positions: Annotated[int, at_least(1)] = 512
    """Longest sequence a from-scratch model supports."""
    dropout: Annotated[float, DROPOUT] = 0.0
    """Dropout of a from-scratch model (hidden and attention); 0 is usual for pre-training, 0.1 for fine-tuning."""
    trust_remote_code: bool = False
    """Allow checkpoints that ship their own Python code (never on unless you trust the source)."""
    allow_pickle: bool = False
    """Load an init_from checkpoint whose weights are pickle files only (pytorch_model.bin), read with weights_only=True; false = safetensors only (such a checkpoint is refused with how to convert it)."""


@dataclass
class TrainConfig:
    """The optimisation loop: optimiser, schedule, batches, precision, evaluation, checkpoints."""

    lr: Annotated[float, above(0)] = 3e-4
    """Peak learning rate (AdamW)."""
    weight_decay: Annotated[float, at_least(0)] = 0.1
    """AdamW decoupled weight decay; never applied to biases and norm weights."""
    decay_embeddings: bool = False
    """Apply weight decay to embedding matrices too (with tied embeddings this also decays the output layer)."""
    adam_beta1: Annotated[float, between(0, 1, open_hi=True)] = 0.9
    """AdamW beta1."""
    adam_beta2: Annotated[float, between(0, 1, open_hi=True)] = 0.95
    """AdamW beta2."""
    adam_eps: Annotated[float, above(0)] = 1e-8
    """AdamW epsilon."""
    batch_size: Annotated[int, at_least(1)] = 16
    """Micro-batch size per process (sequences)."""
    grad_accum: Annotated[int, at_least(1)] = 1
    """Micro-batches accumulated per optimizer step; global batch = batch_size x grad_accum x processes."""
    max_steps: Annotated[int, at_least(0, note="0 = derive from epochs")] = 0
    """Optimizer steps to run; 0 = derive from epochs."""
    epochs: Annotated[float, above(0)] = 1.0
    """Passes over the training data when max_steps is 0 (fractions allowed)."""
    warmup_steps: Annotated[int, at_least(0, -1, note="-1 = use warmup_ratio")] = -1
    """Linear warmup steps; -1 = use warmup_ratio."""
    warmup_ratio: Annotated[float, PROBABILITY] = 0.05
    """Warmup as a fraction of all steps (used when warmup_steps is -1)."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup."""
    min_lr_ratio: Annotated[float, PROBABILITY] = 0.1
    """Learning rate at the end of the schedule, as a fraction of lr (cosine and linear)."""
    grad_clip: Annotated[float, at_least(0, note="0 = no clipping")] = 1.0
    """Clip the global gradient norm to this; 0 = no clipping."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto = bf16 autocast where a measured probe shows it pays (GPU with bf16, CPU with AMX), else fp32."""
    eval_every: Annotated[int, at_least(0)] = 100
    """Validate every N optimizer steps (and always at the end); 0 = only at the end."""
    eval_batch_size: Annotated[int, at_least(1)] = 32
    """Batch size for validation."""
    eval_max_batches: Annotated[int, at_least(0, -1, note="-1 = auto, 0 = no cap")] = -1
    """Cap each periodic validation at this many batches of eval_batch_size, on a fixed subset (rows evenly spread over
    the validation split, the same every time); the best model is chosen on it, and at the end the best and the final
    model are evaluated on the whole validation set and the better one becomes best/. -1 = auto: a third of the items
    trained between two validations (about an eighth of training time), at least 4 batches; 0 = no cap. Applies to pretrain,
    adapt, classify, distill and sft; the preference, RL and prompted verbs validate on all of it."""
    metric: str = ""
    """Validation metric that selects the best checkpoint and drives early stopping; empty = the stage's default.
    A validation that ties the best value with a lower validation loss counts as an improvement."""
    metric_mode: Literal["auto", "min", "max"] = "auto"
    """Whether the metric is better when smaller; auto = min for losses, perplexity, bpb and mse, else max."""
    patience: Annotated[int, at_least(0)] = 0
    """Stop after this many validations without improvement; 0 = never stop early."""
    save_every: Annotated[int, at_least(0)] = 200
    """Write a resumable checkpoint every N optimizer steps; 0 = only at the end and on Ctrl-C."""
    keep_checkpoints: Annotated[int, at_least(0, note="0 = keep all")] = 2
    """How many recent resumable checkpoints to keep."""
    log_every: Annotated[int, at_least(0)] = 10
    """Log training loss, learning rate and throughput every N optimizer steps."""
    progress: bool = True
    """Show a progress bar (tokens/s, loss, ETA) on an interactive terminal."""
    tensorboard: bool = True
    """Also write TensorBoard events under tb/ when tensorboard is installed."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass instead of storing them: less memory for about a third more compute."""
    bf16_frozen: bool = True
    """Under bf16 autocast, hold frozen Linear weights (a LoRA base, DPO's and PPO's frozen reference copies, PPO's reward model) in bf16 while
    training: autocast computes with their bf16 values anyway, so results are identical, for half their memory and
    no per-step cast. The fp32 values wait in RUN/.frozen-fp32.rank<R>.bin and are restored for every save and at
    the end."""
    compile: bool = False
    """torch.compile the model (pays off on GPU for long runs; slow to start on CPU)."""
    threads: Annotated[int | Literal["auto"], at_least(0)] = "auto"
    """CPU threads for torch. auto = OMP_NUM_THREADS when set, else measured on the run's model (the fewest threads
    within 10% of the fastest), decided once per machine, model and batch shape and cached (train.probe_cache);
    0 = torch's default (all cores, slow on a busy machine); N = that many. A resumed run keeps its recorded count."""
    probe_cache: bool | Literal["refresh"] = True
    """Reuse measured choices (threads=auto; precision=auto on a CPU with bf16 units) from HONELM_CACHE_DIR/choices.json
    (default ~/.cache/honelm): true = reuse or measure and store, false = measure and store nothing, refresh = measure
    again and replace the stored choice."""
    distributed: Literal["ddp", "fsdp"] = "ddp"
    """With several processes (torchrun, accelerate launch): ddp = a full copy of the model per process; fsdp = weights,
    gradients and AdamW state sharded across processes (PyTorch FSDP2), for a model whose training state does not fit
    one device; its checkpoints are sharded too (docs/distributed.md). Ignored with one process."""


# --------------------------------------------------------------------------------------------
# Machinery: docs, describe, load, override, dump.
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass (and its bases), read from the source with `ast`."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


@lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of a config class (cached: every key set and every --help row asks; never mutated)."""
    return typing.get_type_hints(cls)


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def type_name(tp: Any) -> str:
    """A short readable name for an annotation (for --help)."""
    origin = get_origin(tp)
    if origin is Literal:
        return "{" + "|".join(str(a) for a in get_args(tp)) + "}"
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = get_args(tp)
        return f"list[{type_name(args[0])}]" if args else "list"
    if origin is dict:
        args = get_args(tp)
        return f"dict[{type_name(args[0])}, {type_name(args[1])}]" if args else "dict"
    if tp is type(None):
        return "None"
    if tp is Any:
        return "Any"
    return getattr(tp, "__name__", str(tp))


def _parse_literal(raw: Any, choices: tuple[Any, ...], key: str) -> Any:
    value = raw
    if isinstance(raw, str) and all(isinstance(c, int) for c in choices):
        try:
            value = int(raw)
        except ValueError:
            pass
    if value not in choices:
        hint = difflib.get_close_matches(str(raw), [str(c) for c in choices], n=1)
        extra = f"; did you mean '{hint[0]}'?" if hint else ""
        shown = ", ".join(str(c) for c in choices if c != "")  # "" (= the default behaviour) reads as nothing
        raise ConfigError(f"{key}: {raw!r} is not one of {shown}{extra}")
    return value


def _parse_union(raw: Any, tp: Any, key: str) -> Any:
    args = get_args(tp)
    if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null") and type(None) in args):
        if type(None) in args:
            return None
    if not isinstance(raw, str) and type(raw) in args:
        return raw  # already one of the types: `int | float` keeps 4 and 4.0 apart (a search range's low)
    # Try non-str alternatives first so "3" becomes an int for `int | str`.
    for alt in sorted((a for a in args if a is not type(None)), key=lambda a: a is str):
        try:
            return _parse_scalar(raw, alt, key)
        except ConfigError:
            continue
    raise ConfigError(f"{key}: {raw!r} is not a valid {type_name(tp)}")


def _parse_list(raw: Any, tp: Any, key: str) -> list[Any]:
    (inner,) = get_args(tp)[:1] or (str,)
    if isinstance(raw, str):
        parsed = yaml.safe_load(raw) if raw.strip().startswith("[") else [p for p in raw.split(",") if p != ""]
    else:
        parsed = raw
    if not isinstance(parsed, (list, tuple)):
        raise ConfigError(f"{key}: expected a list, got {raw!r}")
    return [_parse_scalar(v, inner, f"{key}[{i}]") for i, v in enumerate(parsed)]


def _parse_dict(raw: Any, tp: Any, key: str) -> dict[str, Any]:
    _, inner = get_args(tp) or (str, Any)
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: expected a mapping, got {raw!r}")
    return {str(k): _parse_scalar(v, inner, f"{key}.{k}") for k, v in raw.items()}


def _parse_bool(raw: Any, key: str) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.lower() in ("true", "yes", "on", "1"):
        return True
    if isinstance(raw, str) and raw.lower() in ("false", "no", "off", "0"):
        return False
    if isinstance(raw, int) and raw in (0, 1):
        return bool(raw)
    raise ConfigError(f"{key}: expected true or false, got {raw!r}")


def _parse_int(raw: Any, key: str) -> int:
    if isinstance(raw, bool):
        raise ConfigError(f"{key}: expected an integer, got {raw!r}")
    if isinstance(raw, int):
        return raw
    if isinstance(raw, float) and raw.is_integer():
        return int(raw)
    if isinstance(raw, str):
        try:
            return int(raw.replace("_", ""))
        except ValueError:
            try:
                f = float(raw)
                if f.is_integer():
                    return int(f)
            except ValueError:
                pass
    raise ConfigError(f"{key}: expected an integer, got {raw!r}")


def _parse_float(raw: Any, key: str) -> float:
    if isinstance(raw, bool):
        raise ConfigError(f"{key}: expected a number, got {raw!r}")
    if isinstance(raw, (int, float)):
        value = float(raw)
    elif isinstance(raw, str):
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {raw!r}") from None
    else:
        raise ConfigError(f"{key}: expected a number, got {raw!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number, got {raw!r}")
    return value


def _parse_str(raw: Any, key: str) -> str:
    if isinstance(raw, (dict, list)):
        raise ConfigError(f"{key}: expected a string, got {raw!r}")
    return "" if raw is None else str(raw)


def _parse_scalar(raw: Any, tp: Any, key: str) -> Any:
    """Convert one value to the annotated type, or raise ConfigError naming the key."""
    origin = get_origin(tp)
    if origin is Literal:
        return _parse_literal(raw, get_args(tp), key)
    if origin in (Union, types.UnionType):
        return _parse_union(raw, tp, key)
    if origin in (list, tuple):
        return _parse_list(raw, tp, key)
    if origin is dict:
        return _parse_dict(raw, tp, key)
    if tp is bool:
        return _parse_bool(raw, key)
    if tp is int:
        return _parse_int(raw, key)
    if tp is float:
        return _parse_float(raw, key)
    if tp is str:
        return _parse_str(raw, key)
    if tp is Any:
        return _plain(raw)
    raise ConfigError(f"{key}: unsupported field type {type_name(tp)}")


# Names users bring from Hugging Face TrainingArguments, mapped to ours for the suggestion.
HF_ALIASES = {"learning_rate": "lr", "per_device_train_batch_size": "batch_size", "train_batch_size": "batch_size",
              "gradient_accumulation_steps": "grad_accum", "num_train_epochs": "epochs", "max_grad_norm": "grad_clip",
              "lr_scheduler_type": "schedule", "eval_steps": "eval_every", "save_steps": "save_every",
              "logging_steps": "log_every", "per_device_eval_batch_size": "eval_batch_size",
              "early_stopping_patience": "patience", "model_name_or_path": "init_from", "seq_len": "block_size"}


def suggest(key: str, known: list[str]) -> str | None:
    """The closest full dotted key to `key`: a known alias, the whole key, then its last part."""
    alias = HF_ALIASES.get(key.split(".")[-1])
    hint = [k for k in known if alias and k.split(".")[-1] == alias][:1]
    hint = hint or difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not hint:
        leaf = key.split(".")[-1]
        by_leaf = {k.split(".")[-1]: k for k in known}
        same_section = {k.split(".")[-1]: k for k in known if k.rsplit(".", 1)[0] == key.rsplit(".", 1)[0]}
        for pool in (same_section, by_leaf):
            close = difflib.get_close_matches(leaf, list(pool), n=1, cutoff=0.5)
            if close:
                hint = [pool[close[0]]]
                break
    return hint[0] if hint else None


def _unknown(key: str, known: list[str]) -> ConfigError:
    hint = suggest(key, known)
    extra = f"; did you mean '{hint}'?" if hint else f"; valid keys: {', '.join(sorted(known))}"
    return ConfigError(f"unknown config key '{key}'{extra}")


def read_yaml(path: str | Path, what: str, loader: type = yaml.SafeLoader) -> Any:
    """Parse a YAML file; an unreadable file or bad YAML is an error naming the file (and `what` it is)."""
    p = Path(path)
    try:
        return yaml.load(p.read_text(encoding="utf-8"), Loader=loader)  # noqa: S506 (SafeLoader or a subclass)
    except OSError as e:
        raise HonelmError(f"{p}: cannot read the {what}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {e}") from None


def unknown_key(key: str, cls: type) -> ConfigError:
    """The error for a dotted key that `cls` does not have, with a did-you-mean."""
    return _unknown(key, all_keys(cls))


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted leaf key of a config class."""
    keys = []
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        if _is_section(tp):
            keys.extend(all_keys(tp, f"{prefix}{f.name}."))
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def set_key(cfg: Any, dotted: str, raw: Any, root: type | None = None) -> None:
    """Set `a.b.c` on a nested dataclass instance, type-checking the value."""
    parts = dotted.split(".")
    obj = cfg
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(obj)]
        if part not in names:
            raise _unknown(dotted, all_keys(type(cfg)))
        tp = _hints(type(obj))[part]
        if i == len(parts) - 1:
            if _is_section(tp):
                if not isinstance(raw, dict):
                    raise ConfigError(f"{dotted}: is a section; set its fields ({', '.join(all_keys(tp))})")
                for k, v in raw.items():
                    set_key(cfg, f"{dotted}.{k}", v)
                return
            setattr(obj, part, _parse_scalar(raw, tp, dotted))
            return
        if not _is_section(tp):
            raise ConfigError(f"{'.'.join(parts[: i + 1])} is a value, not a section")
        obj = getattr(obj, part)


def apply_mapping(cfg: Any, mapping: dict, prefix: str = "") -> None:
    """Apply a nested mapping (from YAML) onto cfg."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(mapping).__name__}")
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        sub = cfg
        for part in dotted.split(".")[:-1]:
            sub = getattr(sub, part, None)
        names = [f.name for f in dataclasses.fields(sub)] if sub is not None and dataclasses.is_dataclass(sub) else []
        if str(key) not in names:
            raise _unknown(dotted, all_keys(type(cfg)))
        tp = _hints(type(sub))[str(key)]
        if _is_section(tp) and isinstance(value, dict):
            apply_mapping(cfg, value, f"{dotted}.")
        else:
            set_key(cfg, dotted, value)


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """Split `key.sub=value` arguments; anything else is an error."""
    pairs = []
    for arg in args:
        if "=" not in arg or arg.startswith("="):
            raise ConfigError(f"expected key=value, got '{arg}'")
        key, value = arg.split("=", 1)
        pairs.append((key.strip(), value))
    return pairs


def build(cls: type, yaml_path: str | Path | None = None, overrides: list[str] | None = None,
          variables: dict[str, str] | None = None) -> Any:
    """Defaults < YAML < overrides, checked. Returns an instance of `cls`. `variables` (--var NAME=VALUE) fill the
    YAML's ${vars.NAME} (see `resolve_vars`)."""
    cfg = cls()
    if yaml_path is not None:
        path = Path(yaml_path)
        try:
            mapping = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        overridden = {key for key, _ in parse_overrides(overrides or [])}
        mapping = resolve_vars(mapping, variables or {}, path, overridden)
        try:
            apply_mapping(cfg, mapping)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    elif variables:
        raise ConfigError(f"--var {', '.join(variables)}: a variable belongs to a config file's vars; give --config")
    for key, value in parse_overrides(overrides or []):
        set_key(cfg, key, value)
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------------------------
# Variables: a file's `vars:` block, ${vars.NAME} in its values, --var NAME=VALUE on the command line.
# --------------------------------------------------------------------------------------------

VAR_REF = re.compile(r"\$\{\s*vars\.([A-Za-z_][A-Za-z0-9_-]*)\s*\}")


@dataclass
class VarConfig:
    """A variable of a preset, pipeline or ablation file (its `vars:` block): ${vars.NAME} in the file's values,
    given as --var NAME=VALUE. `NAME: VALUE` declares one with that default."""

    default: str | None = None
    """Its value when --var does not give one; none = it must be given (the error says what and where to get it)."""
    description: str = ""
    """What the value is (e.g. the folder holding the dataset's files), shown when it is missing."""
    source: str = ""
    """Where to get it (a URL, or the command that makes it), shown when it is missing."""

    @staticmethod
    def shorthand(value: Any) -> dict[str, Any]:
        return {"default": str(value)}


def declared_vars(raw: Any, source: str | Path) -> dict[str, VarConfig]:
    """The declarations of a file's `vars:` block (as read from the file)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: vars: expected a mapping of NAME: VALUE or NAME: {{description, source, default}}")
    return {str(name): _read_field(value, VarConfig, source, str(source), f"vars.{name}") for name, value in raw.items()}


def var_values(declared: dict[str, VarConfig], given: dict[str, str], source: str | Path) -> dict[str, str]:
    """Each declared variable's value: --var's, else its default (one with neither is absent)."""
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise ConfigError(f"{source}: --var {', '.join(unknown)}: not among the file's vars "
                          f"({', '.join(declared) or 'none'})")
    values = {name: var.default for name, var in declared.items() if var.default is not None}
    return {**values, **given}


def missing_vars(source: str | Path, declared: dict[str, VarConfig], uses: dict[str, list[str]]) -> ConfigError:
    """The error for variables with no value: what to pass, what it is and where to get it, for each at once."""
    lines = [f"{source} needs {' '.join(f'--var {name}=VALUE' for name in uses)}"]
    for name, keys in uses.items():
        var = declared[name]
        about = f": {var.description}" if var.description else ""
        where = f"; get it from {var.source}" if var.source else ""
        used = f"; used by {', '.join(keys)}" if keys else ""
        lines.append(f"  --var {name}=VALUE{about}{where}{used}")
    return ConfigError("\n".join(lines))


def file_var_values(declared: dict[str, VarConfig], given: dict[str, str], source: str | Path) -> dict[str, str]:
    """Every declared variable's value (`var_values`) for a pipeline or ablation file, whose stages may use each:
    one with no value is an error (`missing_vars`)."""
    values = var_values(declared, given, source)
    unfilled = {name: [] for name in declared if name not in values}
    if unfilled:
        raise missing_vars(source, declared, unfilled)
    return values


def substitute_vars(value: Any, values: dict[str, str], declared: dict[str, VarConfig], source: str | Path,
                    key: str = "", unfilled: dict[str, list[str]] | None = None) -> Any:
    """`value` with ${vars.NAME} replaced in every string inside it; a reference to a declared variable that has no
    value is left as written and its key recorded in `unfilled` (NAME -> dotted keys)."""
    if isinstance(value, dict):
        return {k: substitute_vars(v, values, declared, source, _dotted(key, str(k)), unfilled) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute_vars(v, values, declared, source, f"{key}[{i}]", unfilled) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in declared:
            raise ConfigError(f"{source}: {key}: ${{vars.{name}}} is not declared under vars "
                              f"({', '.join(declared) or 'none'})")
        if name not in values:
            if unfilled is not None:
                unfilled.setdefault(name, []).append(key)
            return match.group(0)
        return values[name]

    return VAR_REF.sub(one, value)


def resolve_vars(mapping: Any, given: dict[str, str], source: str | Path, overridden: Collection[str] = ()) -> Any:
    """A preset's mapping without its `vars:` block and with ${vars.NAME} filled from `given` (--var) or the
    defaults. A variable with no value is an error (`missing_vars`) unless every key using it is `overridden`."""
    if not isinstance(mapping, dict):
        return mapping  # apply_mapping reports what it is
    body = {k: v for k, v in mapping.items() if k != "vars"}
    declared = declared_vars(mapping.get("vars"), source)
    unfilled: dict[str, list[str]] = {}
    out = substitute_vars(body, var_values(declared, given, source), declared, source, "", unfilled)
    needed = {name: keys for name, keys in ((n, [k for k in ks if k not in overridden]) for n, ks in unfilled.items())
              if keys}
    if needed:
        raise missing_vars(source, declared, needed)
    return out


def validate(cfg: Any, section_name: str = "") -> None:
    """Check every field's declared range (`honelm.bounds`), then call `validate()` on the config and every
    section that has one: bad values and cross-field errors come before any work.

    A section's ValueError (e.g. `SamplingConfig`, also used outside configs) becomes a ConfigError
    naming the section, so the CLI reports it as a config error instead of a traceback.
    """
    if not section_name:
        check_all_bounds(cfg)
    check = getattr(cfg, "validate", None)
    if callable(check):
        try:
            check()
        except FieldError as e:
            raise ConfigError(f"{section_name}.{e.name}: {e.message}" if section_name else str(e)) from None
        except ValueError as e:
            raise ConfigError(f"{section_name}: {e}" if section_name else str(e)) from None
    for f in dataclasses.fields(cfg):
        section_value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(section_value):
            validate(section_value, f"{section_name}.{f.name}" if section_name else f.name)


def check_all_bounds(cfg: Any, section_name: str = "") -> None:
    """Every declared Bound of the config and its sections (the first value outside its range is the error)."""
    check_bounds(cfg, section_name)
    for f in dataclasses.fields(cfg):
        section_value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(section_value):
            check_all_bounds(section_value, f"{section_name}.{f.name}" if section_name else f.name)


def to_dict(cfg: Any) -> dict:
    """The config as plain nested dicts (for YAML)."""
    return dataclasses.asdict(cfg)


def dump(cfg: Any, path: str | Path, header: str = "") -> None:
    """Write the effective config as YAML that works again as --config."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)
    Path(path).write_text((header + "\n" if header else "") + text, encoding="utf-8")


def describe(cls: type, prefix: str = "", defaults: Any = None) -> list[tuple[str, str, str, str]]:
    """(key, type, default, doc) for every leaf field, in declaration order.

    A section's defaults are read from the enclosing config's instance, so a stage that builds a
    section with its own factory (e.g. classify's train defaults) shows those, not the class's.
    """
    rows = []
    defaults = cls() if defaults is None else defaults
    docs = field_docs(cls)
    ranges = allowed(cls)
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        if _is_section(tp):
            rows.extend(describe(tp, f"{prefix}{f.name}.", getattr(defaults, f.name)))
        else:
            value = getattr(defaults, f.name)
            doc = docs.get(f.name, "") + (f" Allowed: {ranges[f.name]}." if f.name in ranges else "")
            rows.append((f"{prefix}{f.name}", type_name(tp), repr(value), doc))
            item, mark = _item_section(tp)  # a spec file's list or mapping of sections: the fields of one
            if item is not None:
                rows.extend(describe(item, f"{prefix}{f.name}{mark}."))
    return rows


def section(cls: type) -> Any:
    """`field(default_factory=cls)`: a nested section in a stage config."""
    return field(default_factory=cls)


# --------------------------------------------------------------------------------------------
# Spec files (pipeline, search, ablate): strict mappings, nested sections, errors with file:line.
# --------------------------------------------------------------------------------------------


class YamlMapping(dict):
    """A mapping read by `LineLoader`: a plain dict that also knows the line (1-based) it starts on."""

    line: int = 0


class LineLoader(yaml.SafeLoader):
    """A safe YAML loader whose mappings are `YamlMapping`s, so that errors can point at a line."""


def _mapping_with_line(loader: LineLoader, node: yaml.MappingNode) -> YamlMapping:
    mapping = YamlMapping(loader.construct_mapping(node, deep=True))
    mapping.line = node.start_mark.line + 1
    return mapping


LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_with_line)


def line_of(value: Any) -> int | None:
    """The line a mapping read by `LineLoader` starts on; None for anything else."""
    return value.line if isinstance(value, YamlMapping) else None


def _plain(value: Any) -> Any:
    """`value` with every mapping inside a plain dict (yaml.safe_dump refuses a YamlMapping)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


class FieldError(ConfigError):
    """A `validate()` complaint about one field of a section that `from_mapping` read; it is
    reported as `FILE[:LINE]: section.field: message`."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message


def from_mapping(cls: type, raw: Any, source: str | Path, key: str = "") -> Any:
    """An instance of the dataclass `cls` from a mapping already read (a spec file, or a section of one).

    Strict where `build` is lenient, since these files hold dotted config keys as data: every key
    must be a field of `cls` (the unknown ones are listed, with a did-you-mean), values are checked
    against the annotations, an empty value means the field's default, and a field may be a section,
    a list of sections or a mapping of named sections, read the same way. Then `validate()` runs.
    Errors name `source`, the line where a nested section's mapping starts (when LineLoader read it)
    and the dotted field: `p.yaml:3: stages[0].verb: ...`. `key` is where `raw` sits in the file.
    """
    where = f"{source}:{line_of(raw)}" if key and line_of(raw) else str(source)
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: {key or 'the file'}: expected a mapping, got {raw!r}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [str(k) for k in raw if str(k) not in names]
    if unknown:
        hints = [f"'{hint}'" for hint in (suggest(k, names) for k in unknown) if hint]
        raise ConfigError(f"{where}: {key + ': ' if key else ''}unknown field(s) {', '.join(unknown)}"
                          + (f"; did you mean {', '.join(hints)}?" if hints else "")
                          + f" (fields: {', '.join(sorted(names))})")
    cfg = cls()
    hints_of = _hints(cls)
    for name, value in raw.items():
        if value is not None:  # `set:` with nothing after it: the default, as an absent key
            setattr(cfg, str(name), _read_field(value, hints_of[str(name)], source, where, _dotted(key, str(name))))
    _check(cfg, where, key)
    return cfg


def _dotted(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _item_section(tp: Any) -> tuple[type | None, str]:
    """For `list[S]` or `dict[str, S]` with S a section: (S, how an item's keys are written); else (None, "")."""
    args = get_args(tp)
    if get_origin(tp) is list and args and _is_section(args[0]):
        return args[0], "[]"
    if get_origin(tp) is dict and len(args) == 2 and _is_section(args[1]):
        return args[1], ".<key>"
    return None, ""


def _read_field(value: Any, tp: Any, source: str | Path, where: str, key: str) -> Any:
    """One field's value: a section (or a list or mapping of them) through from_mapping, else parsed by type."""
    if _is_section(tp):
        return from_mapping(tp, _shorthand(tp, value, where, key), source, key)
    item, _ = _item_section(tp)
    if item is not None and get_origin(tp) is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {key}: expected a list, got {value!r}")
        return [from_mapping(item, _shorthand(item, v, where, f"{key}[{i}]"), source, f"{key}[{i}]")
                for i, v in enumerate(value)]
    if item is not None:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key}: expected a mapping, got {value!r}")
        return {str(k): from_mapping(item, _shorthand(item, v, where, f"{key}.{k}"), source, f"{key}.{k}")
                for k, v in value.items()}
    try:
        return _parse_scalar(value, tp, key)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _shorthand(cls: type, value: Any, where: str, key: str) -> Any:
    """A section written as one value → the mapping it stands for: nothing is the defaults, and a class
    with `shorthand(value) -> dict` accepts its short form (a search range as its list of choices)."""
    if value is None:
        return {}
    if isinstance(value, dict) or not hasattr(cls, "shorthand"):
        return value
    try:
        return cls.shorthand(value)
    except ValueError as e:
        raise ConfigError(f"{where}: {key}: {e}") from None


def _check(cfg: Any, where: str, key: str) -> None:
    """Run the section's `validate()`; its complaint is placed in the file like a type error."""
    try:
        check_bounds(cfg, key)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    check = getattr(cfg, "validate", None)
    if not callable(check):
        return
    try:
        check()
    except FieldError as e:
        raise ConfigError(f"{where}: {_dotted(key, e.name)}: {e.message}") from None
    except (ConfigError, ValueError) as e:
        raise ConfigError(f"{where}: {key + ': ' if key else ''}{e}") from None


def fields_help(cls: type, title: str) -> str:
    """The `--help` listing of a spec file's fields: `key: type = default` with its doc below."""
    lines = [title]
    for key, tp, default, doc in describe(cls):
        lines.append(f"  {key}: {tp} = {default}")
        if doc:
            lines.append(f"      {doc}")
    return "\n".join(lines)


def cache_root(configured: str = "") -> Path:
    """Where honelm caches what it can rebuild (token files, measured thread/precision choices): `configured`
    (data.cache_dir), $HONELM_CACHE_DIR, $XDG_CACHE_HOME/honelm or ~/.cache/honelm, in that order."""
    if configured:
        return Path(configured).expanduser()
    if os.environ.get("HONELM_CACHE_DIR"):
        return Path(os.environ["HONELM_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "honelm"
