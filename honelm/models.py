"""Model presets, from-scratch construction and checkpoint loading for honelm.

This module owns:

* `PRESETS` / `SIZES`: the architecture presets for from-scratch decoders (Llama-style:
  RMSNorm, SwiGLU, RoPE, tied embeddings, no biases) and encoders (BERT).
* `build_config` / `build_model`: turn a preset into a transformers config / randomly
  initialized model for a task ("lm", "mlm", "classify", "base"), deterministically per seed.
* `LoadedModel`: a loaded model with what honelm knows of it (where it came from, the directory
  holding exactly its weights, which weights are new, an adapter carried on), passed explicitly
  from loading through the boosters to saving.
* `load_checkpoint` (and `load_model`, its model alone): load any local HF checkpoint (or hub id
  when online) for a task, including re-heading a checkpoint for classification; a LoRA adapter
  directory loads merged into its base (`load_merged`). `load_for_carry`: an adapter's base, with
  the adapter recorded to be attached again (`lora.carry`). Reading adapter directories and the
  merge itself are `honelm.adapters`'.
* Small helpers: `count_parameters`, `model_kind`, `flops_per_token`.

It does not import `honelm.tokenizer`: callers pass special token ids themselves.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import is_offline_mode
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaModel,
    PretrainedConfig,
    PreTrainedModel,
)

from honelm.adapters import adapter_base, adapter_info, base_labels, is_adapter_dir, merge_into, native_task
from honelm.errors import ConfigError, HonelmError

logger = logging.getLogger(__name__)

__all__ = [
    "ARCHS",
    "PRESETS",
    "SIZES",
    "TASKS",
    "LoadedModel",
    "build_config",
    "build_model",
    "count_parameters",
    "flops_per_token",
    "load_checkpoint",
    "load_for_carry",
    "load_merged",
    "load_model",
    "model_kind",
]

ARCHS = ("decoder", "encoder")
SIZES = ("test", "tiny", "small", "base")
TASKS = ("lm", "mlm", "classify", "base")
_PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")

# Architecture kwargs per preset, in each config class's own naming. Head dims are 16/32/64/64,
# multiples of 8 so fused attention kernels stay on their fast paths.
#
# Decoder intermediate sizes follow the SwiGLU 8/3*hidden rule (rounded), which keeps the MLP's
# parameter count equal to a 4*hidden GELU MLP. `small` has 8 layers (not 6) so that, with a
# 32k vocabulary, it lands at ~26M parameters, inside the 25-35M "~30M Llama" benchmark budget;
# 6 layers would give ~23M.
#
# Encoder presets use BERT's 4*hidden intermediate; `small` is MiniLM-L6-H384-shaped and `base`
# is BERT-base-shaped.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "decoder": {
        "test": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
        "tiny": {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 344},
        "small": {"hidden_size": 384, "num_hidden_layers": 8, "num_attention_heads": 6, "intermediate_size": 1024},
        "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 2048},
    },
    "encoder": {
        "test": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
        "tiny": {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 512},
        "small": {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 6, "intermediate_size": 1536},
        "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
    },
}

# Fixed choices that define "Llama-style" here; overridable through build_config's overrides.
_DECODER_FIXED: dict[str, Any] = {
    "hidden_act": "silu",  # SwiGLU MLP (gate/up/down) with SiLU
    "tie_word_embeddings": True,  # small models: the embedding table is a large share of params
    "attention_bias": False,
    "mlp_bias": False,
    "attention_dropout": 0.0,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
}

# Config keys accepted by __init__ that are not dataclass fields of the config classes.
_EXTRA_CONFIG_KEYS = frozenset({"num_labels", "attn_implementation", "output_attentions", "rope_theta"})

_CONFIG_CLASSES: dict[str, type[PretrainedConfig]] = {"decoder": LlamaConfig, "encoder": BertConfig}

# Model types whose kind is known; anything else falls back to the architectures heuristic.
_DECODER_TYPES = frozenset({
    "llama", "gpt2", "gpt_neo", "gpt_neox", "gptj", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3",
    "qwen3_moe", "phi", "phi3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2", "falcon", "opt", "bloom",
    "smollm3", "granite", "stablelm", "starcoder2", "codegen", "cohere", "mpt", "ministral",
})
_ENCODER_TYPES = frozenset({
    "bert", "roberta", "xlm-roberta", "distilbert", "electra", "deberta", "deberta-v2", "albert",
    "camembert", "mpnet", "modernbert", "xlm", "ernie", "megatron-bert", "rembert", "nomic_bert", "eurobert",
})


@dataclass
class LoadedModel:
    """A model and what honelm knows about where it came from."""

    model: torch.nn.Module
    origin: str
    """Human-readable, as the stage log says it: "from DIR", "decoder preset 'tiny', random init", ..."""
    source: str | None
    """Directory (or hub id) holding exactly these weights; None: random init, merged, re-headed (a LoRA adapter
    trained on this model then saves its base into the run)."""
    new_weights: list[str]
    """Parameter names the loader initialised afresh (a re-headed classifier's head, a bare encoder's MLM head)."""
    carry: dict[str, Any] | None = None
    """The adapter being carried on (`lora.carry`): {"dir": adapter directory, "config": its adapter_config.json}."""
    base_pending: bool = False
    """A LoRA wrapper whose base is on no disk: the first adapter save writes RUN/base/."""

    @classmethod
    def built(cls, model: torch.nn.Module, origin: str = "built in memory, random init") -> LoadedModel:
        """A model built rather than loaded: no directory holds its weights, and none counts as new."""
        return cls(model, origin=origin, source=None, new_weights=[])


def _check_choice(what: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"unknown {what} {value!r}; valid choices: {', '.join(valid)}")


def build_config(
    arch: str,
    size: str,
    vocab_size: int,
    *,
    max_positions: int = 512,
    pad_token_id: int | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    **overrides: Any,
) -> PretrainedConfig:
    """Build the config of preset `size` for `arch` ("decoder" -> LlamaConfig, "encoder" -> BertConfig).

    `overrides` replace any config field (e.g. num_hidden_layers=3); unknown keys raise
    ConfigError. For encoders a `pad_token_id` of None keeps BertConfig's default 0, which is
    where `train_tokenizer(kind="wordpiece")` puts [PAD].
    """
    _check_choice("arch", arch, ARCHS)
    _check_choice(f"{arch} size", size, SIZES)
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ConfigError(f"vocab_size must be a positive int, got {vocab_size!r}")
    if max_positions < 1:
        raise ConfigError(f"max_positions must be >= 1, got {max_positions}")
    cls = _CONFIG_CLASSES[arch]
    valid_keys = {f.name for f in dataclasses.fields(cls)} | _EXTRA_CONFIG_KEYS
    unknown = sorted(set(overrides) - valid_keys)
    if unknown:
        raise ConfigError(
            f"unknown {cls.__name__} override(s): {', '.join(unknown)}; valid keys: {', '.join(sorted(valid_keys))}"
        )

    kwargs: dict[str, Any] = dict(PRESETS[arch][size])
    kwargs.update(vocab_size=vocab_size, max_position_embeddings=max_positions,
                  bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    if arch == "decoder":
        kwargs.update(copy.deepcopy(_DECODER_FIXED))
        kwargs["pad_token_id"] = pad_token_id
    elif pad_token_id is not None:
        kwargs["pad_token_id"] = pad_token_id
    # SDPA: fused attention in torch, no extra dependency; accepted by both config classes.
    kwargs["attn_implementation"] = "sdpa"
    if "rope_theta" in overrides:
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": float(overrides.pop("rope_theta"))}
    kwargs.update(overrides)

    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if not isinstance(kwargs[key], int) or kwargs[key] < 1:
            raise ConfigError(f"{key} must be a positive int, got {kwargs[key]!r}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:  # strict dataclass validation (types, head divisibility)
        raise ConfigError(f"invalid {arch} config: {err}") from err


def _model_class(arch: str, task: str) -> type[PreTrainedModel]:
    _check_choice("task", task, TASKS)
    if arch == "decoder":
        if task == "mlm":
            raise ConfigError("task 'mlm' needs an encoder; decoders train with task 'lm' (causal LM)")
        return {"lm": LlamaForCausalLM, "classify": LlamaForSequenceClassification, "base": LlamaModel}[task]
    # An encoder's language-modelling objective is masked LM, so "lm" and "mlm" coincide.
    return {"lm": BertForMaskedLM, "mlm": BertForMaskedLM, "classify": BertForSequenceClassification,
            "base": BertModel}[task]


def _apply_labels(config: PretrainedConfig, num_labels: int | None, id2label: dict | None,
                  problem_type: str | None) -> None:
    """Set the classification fields of `config` in place."""
    if id2label is not None:
        id2label = {int(k): str(v) for k, v in id2label.items()}
        if sorted(id2label) != list(range(len(id2label))):
            raise ConfigError(f"id2label keys must be 0..n-1, got {sorted(id2label)}")
        if num_labels is not None and num_labels != len(id2label):
            raise ConfigError(f"num_labels={num_labels} but id2label has {len(id2label)} entries")
        num_labels = len(id2label)
    if num_labels is None:
        raise ConfigError("task 'classify' needs num_labels (or id2label)")
    if not isinstance(num_labels, int) or num_labels < 1:
        raise ConfigError(f"num_labels must be a positive int, got {num_labels!r}")
    if problem_type is None:
        # num_labels=1 means a single regression output; otherwise leave it to transformers to
        # infer single- vs multi-label from the label dtype (a stale "regression" from a
        # re-headed checkpoint must not survive).
        problem_type = "regression" if num_labels == 1 else None
    elif problem_type not in _PROBLEM_TYPES:
        raise ConfigError(f"unknown problem_type {problem_type!r}; valid: {', '.join(_PROBLEM_TYPES)}")
    elif problem_type == "single_label_classification" and num_labels == 1:
        raise ConfigError("problem_type 'single_label_classification' needs num_labels >= 2")
    # Clear problem_type first: the setter validates it against the current num_labels.
    config.problem_type = None
    config.num_labels = num_labels
    if id2label is None:
        id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
    config.id2label = id2label
    config.label2id = {v: k for k, v in id2label.items()}
    config.problem_type = problem_type


def build_model(
    arch: str,
    size: str,
    vocab_size: int,
    task: str = "lm",
    num_labels: int | None = None,
    seed: int | None = None,
    **config_kwargs: Any,
) -> PreTrainedModel:
    """Build a randomly initialized model of preset `size` for `task`.

    task: "lm" (LlamaForCausalLM / BertForMaskedLM), "mlm" (encoders only), "classify"
    (…ForSequenceClassification; num_labels=1 -> regression), "base" (bare trunk).
    `config_kwargs` go to `build_config` (max_positions, pad/bos/eos ids, overrides; for classify
    also id2label and problem_type). With `seed`, initialization is deterministic and the global
    torch RNG state is left untouched.
    """
    model_cls = _model_class(arch, task)
    id2label = config_kwargs.pop("id2label", None)
    problem_type = config_kwargs.pop("problem_type", None)
    config = build_config(arch, size, vocab_size, **config_kwargs)
    if task == "classify":
        _apply_labels(config, num_labels, id2label, problem_type)
        if arch == "decoder" and config.pad_token_id is None:
            # LlamaForSequenceClassification pools the last non-pad token; without a pad id it
            # cannot find it in a padded batch.
            raise ConfigError("a decoder classifier needs pad_token_id (pass the tokenizer's pad id)")
    elif num_labels is not None or id2label is not None:
        raise ConfigError(f"num_labels/id2label only apply to task 'classify', not {task!r}")

    if seed is None:
        model = model_cls(config)
    else:
        # fork_rng restores the global CPU (and CUDA, if initialized) RNG afterwards, so seeding
        # here does not perturb data shuffling or dropout elsewhere.
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            model = model_cls(config)
    return model


def _is_local_checkpoint_path(path_or_id: str | Path) -> bool:
    # Hub ids are "name" or "org/name"; Path objects, absolute/relative-looking strings and
    # deeper nesting can only mean a local directory.
    if isinstance(path_or_id, Path):
        return True
    s = str(path_or_id)
    return os.path.isabs(s) or s.startswith((".", "~")) or "\\" in s or s.count("/") > 1 or s.endswith("/")


def _checkpoint_source(path_or_id: str | Path) -> tuple[Path | None, str, bool | None]:
    """(local directory or None for a hub id, the name transformers loads, whether it has safetensors)."""
    local = Path(str(path_or_id)).expanduser()
    if local.exists():
        if not local.is_dir():
            raise HonelmError(f"model path {str(local)!r} is a file; expected a checkpoint directory")
        return local, str(local), any(local.glob("*.safetensors"))
    if _is_local_checkpoint_path(path_or_id):
        raise HonelmError(f"model directory {str(path_or_id)!r} does not exist")
    return None, str(path_or_id), None  # unknown for hub ids: let transformers prefer safetensors


def _checkpoint_config(source: str, local: Path | None, trust_remote_code: bool) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as err:  # hub/IO errors come in many types; all mean "could not get it"
        where = "directory" if local is not None else (
            "hub id (offline mode: only the local cache is searched)" if is_offline_mode()
            else "hub id (not found or not reachable)")
        raise HonelmError(f"could not load a model config from {where} {source!r}: {type(err).__name__}: {err}"
                          ) from err


def _fit_config_to_task(config: PretrainedConfig, source: str, task: str, num_labels: int | None,
                        id2label: dict | None, problem_type: str | None) -> None:
    """Check that the checkpoint suits `task`; set labels (classify) and a missing decoder pad id, in place."""
    try:
        kind: str | None = model_kind(config)
    except ConfigError:
        # Unknown architecture (e.g. custom remote code): skip the kind checks, let the Auto
        # class decide whether it supports the task.
        kind = None
    if task == "lm" and kind == "encoder":
        raise ConfigError(f"{source!r} is an encoder ({config.model_type}); use task 'mlm' for masked LM")
    if task == "mlm" and kind == "decoder":
        raise ConfigError(f"{source!r} is a decoder ({config.model_type}); use task 'lm' for causal LM")

    # Label arguments are checked before anything else touches the config.
    if task == "classify":
        _apply_labels(config, num_labels, id2label, problem_type)
    elif num_labels is not None or id2label is not None:
        raise ConfigError(f"num_labels/id2label only apply to task 'classify', not {task!r}")

    if kind == "decoder" and getattr(config, "pad_token_id", None) is None:
        eos = getattr(config, "eos_token_id", None)
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        if eos is not None:
            config.pad_token_id = eos
            logger.warning("config of %s has no pad_token_id; using eos_token_id=%d as pad", source, eos)
        elif task == "classify":
            raise ConfigError(f"decoder checkpoint {source!r} has neither pad_token_id nor eos_token_id; "
                              "a decoder classifier needs one to find the last token")


def _from_pretrained(source: str, task: str, kwargs: dict[str, Any]) -> tuple[PreTrainedModel, list[str]]:
    """The model transformers loads for `task`, and the names of the weights it initialised afresh."""
    auto_cls = {"lm": AutoModelForCausalLM, "mlm": AutoModelForMaskedLM,
                "classify": AutoModelForSequenceClassification, "base": AutoModel}[task]
    try:
        # transformers prints its own multi-line load report; honelm reports new weights itself
        # (one line, below, and in the stage log), so quieten it for the duration of the load.
        hf_logger = logging.getLogger("transformers")
        previous = hf_logger.level
        hf_logger.setLevel(logging.ERROR)
        try:
            model, info = auto_cls.from_pretrained(source, **kwargs)
        finally:
            hf_logger.setLevel(previous)
    except ValueError as err:
        # Raised e.g. when the Auto class has no mapping for this model type.
        raise ConfigError(f"cannot load {source!r} ({kwargs['config'].model_type}) for task {task!r}: {err}") from err
    except OSError as err:
        raise HonelmError(f"could not load weights from {source!r}: {err}") from err
    return model, sorted(set(info.get("missing_keys", [])) | {k for k, *_ in info.get("mismatched_keys", [])})


PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
_AUTO_CLASS = {"lm": "AutoModelForCausalLM", "mlm": "AutoModelForMaskedLM",
               "classify": "AutoModelForSequenceClassification", "base": "AutoModel"}


def refuse_pickle(local: Path, task: str) -> None:
    """A checkpoint directory whose weights are pickle files only (pytorch_model.bin): refused, with how to convert."""
    found = sorted({p.name for pattern in PICKLE_WEIGHTS for p in local.glob(pattern)})
    if not found:
        return
    auto = _AUTO_CLASS.get(task, "AutoModel")
    raise HonelmError(f"{local}: its weights are pickle files only ({', '.join(found[:3])}) and honelm loads "
                      f"safetensors only by default. Convert it once: python -c \"from transformers import {auto}, "
                      f"AutoTokenizer as T; d='{local}'; {auto}.from_pretrained(d).save_pretrained(d + '-safe'); "
                      "T.from_pretrained(d).save_pretrained(d + '-safe')\" and use the -safe directory, or set "
                      "model.allow_pickle=true (teacher.allow_pickle for a teacher) to load it as it is (read with "
                      "weights_only=True)")


def _load_pretrained(path_or_id: str | Path, task: str, num_labels: int | None, id2label: dict | None,
                     trust_remote_code: bool, torch_dtype: torch.dtype, problem_type: str | None,
                     allow_pickle: bool = False) -> LoadedModel:
    """A plain transformers checkpoint (not an adapter directory) for `task`; see `load_checkpoint`."""
    _check_choice("task", task, TASKS)
    local, source, has_safetensors = _checkpoint_source(path_or_id)
    if local is not None and not has_safetensors and not allow_pickle:
        refuse_pickle(local, task)
    config = _checkpoint_config(source, local, trust_remote_code)
    _fit_config_to_task(config, source, task, num_labels, id2label, problem_type)
    kwargs: dict[str, Any] = {
        "config": config,
        "dtype": torch_dtype,  # transformers 5 renamed torch_dtype -> dtype
        "trust_remote_code": trust_remote_code,
        "output_loading_info": True,
    }
    if has_safetensors or not allow_pickle:
        kwargs["use_safetensors"] = True
    else:
        kwargs["weights_only"] = True  # the opt-in to pickle still unpickles tensors only
    if task == "classify":
        kwargs["ignore_mismatched_sizes"] = True
    model, new_weights = _from_pretrained(source, task, kwargs)
    if new_weights:
        # Expected for a re-headed classifier; anything else means the trunk did not load.
        level = logging.INFO if task == "classify" else logging.WARNING
        logger.log(level, "loaded %s for %s; newly initialized weights: %s", source, task, ", ".join(new_weights))
    model.eval()
    # The directory (or hub id) holding exactly these weights, if any: a LoRA adapter trained on
    # this model names it as its base. With freshly initialised weights no directory does.
    where = None if new_weights else (str(local.resolve()) if local is not None else source)
    return LoadedModel(model, origin=f"from {path_or_id}", source=where, new_weights=new_weights)


def load_checkpoint(
    path_or_id: str | Path,
    task: str,
    num_labels: int | None = None,
    id2label: dict | None = None,
    trust_remote_code: bool = False,
    torch_dtype: torch.dtype = torch.float32,
    *,
    problem_type: str | None = None,
    allow_pickle: bool = False,
) -> LoadedModel:
    """Load a checkpoint directory (or hub id when online) for `task`, with what honelm knows of it.

    Weights are read from safetensors only: a directory with pickle weights only (pytorch_model.bin)
    is refused with how to convert it, unless `allow_pickle` (then read with weights_only=True); so is
    an adapter directory whose weights are adapter_model.bin only.

    task "lm" -> AutoModelForCausalLM (encoder checkpoints are refused: use "mlm"),
    "mlm" -> AutoModelForMaskedLM, "classify" -> AutoModelForSequenceClassification,
    "base" -> AutoModel. For "classify" the head is rebuilt for `num_labels`/`id2label` with
    `ignore_mismatched_sizes=True`, so an LM checkpoint or a classifier with another label
    count can be re-headed; newly initialized weights are logged and listed in the record's
    `new_weights`. A decoder config without pad_token_id gets eos_token_id as pad (logged as a
    warning).

    A PEFT LoRA adapter directory (adapter_config.json, no config.json) loads as its base model
    with the adapter merged in (`load_merged`), so every stage that loads a model can start from
    a LoRA run: the adapter is merged before the next stage.
    """
    _check_choice("task", task, TASKS)
    local = Path(str(path_or_id)).expanduser()
    if local.is_dir() and is_adapter_dir(local) and not (local / "config.json").is_file():
        merged = load_merged(local, task, num_labels=num_labels, id2label=id2label,
                             trust_remote_code=trust_remote_code, torch_dtype=torch_dtype, problem_type=problem_type,
                             allow_pickle=allow_pickle)
        return dataclasses.replace(merged, origin=f"from {path_or_id}")
    return _load_pretrained(path_or_id, task, num_labels, id2label, trust_remote_code, torch_dtype, problem_type,
                            allow_pickle)


def load_model(
    path_or_id: str | Path,
    task: str,
    num_labels: int | None = None,
    id2label: dict | None = None,
    trust_remote_code: bool = False,
    torch_dtype: torch.dtype = torch.float32,
    *,
    problem_type: str | None = None,
    allow_pickle: bool = False,
) -> PreTrainedModel:
    """`load_checkpoint(...).model`: the model alone, for callers that need nothing else about it."""
    return load_checkpoint(path_or_id, task, num_labels, id2label, trust_remote_code, torch_dtype,
                           problem_type=problem_type, allow_pickle=allow_pickle).model


def refuse_pickled_adapter(adapter_dir: Path) -> None:
    """An adapter directory whose weights are a pickle file only (adapter_model.bin): refused, with how to convert."""
    if (adapter_dir / "adapter_model.safetensors").is_file():
        return
    found = sorted({p.name for pattern in PICKLE_WEIGHTS for p in adapter_dir.glob(pattern)})
    if not found:
        return
    raise HonelmError(f"{adapter_dir}: the adapter's weights are pickle files only ({', '.join(found[:3])}) and "
                      "honelm loads safetensors only by default. Convert it once: python -c \"import torch, "
                      f"safetensors.torch as s; d='{adapter_dir}'; s.save_file(torch.load(d + '/{found[0]}', "
                      f"weights_only=True), d + '/adapter_model.safetensors')\", or set model.allow_pickle=true (teacher.allow_pickle for a teacher) "
                      "to load it as it is (read with weights_only=True)")


def load_merged(adapter_dir: str | Path, task: str | None = None, num_labels: int | None = None,
                id2label: dict | None = None, trust_remote_code: bool = False,
                torch_dtype: torch.dtype = torch.float32, problem_type: str | None = None,
                allow_pickle: bool = False) -> LoadedModel:
    """Base + LoRA adapter from `adapter_dir`, merged into a plain transformers model (in `torch_dtype`).

    The base is loaded for the adapter's own task (a classifier with its own labels), the adapter
    attached and merged with `safe_merge` (a non-finite merged weight is an error). When `task`
    or the label count asked for differ, the merged model goes through a temporary directory
    and is loaded again, re-headed exactly as any checkpoint would be. task None = the adapter's
    own task. Merged weights exist on no disk: the record's `source` is None.
    """
    info = adapter_info(adapter_dir)
    base = adapter_base(adapter_dir, info)
    try:
        base_config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
    except Exception as e:  # IO and hub errors come in many types
        raise HonelmError(f"{adapter_dir}: cannot read the base model config from {base}: {e}") from None
    if not allow_pickle:
        refuse_pickled_adapter(Path(adapter_dir))
    own = native_task(info.get("task_type"), base_config)
    labels = base_labels(own, base_config, task, num_labels, id2label, problem_type)
    loaded = load_checkpoint(base, own, trust_remote_code=trust_remote_code, torch_dtype=torch_dtype,
                             allow_pickle=allow_pickle, **labels)
    merged = merge_into(loaded.model, adapter_dir, base)
    origin = f"from {adapter_dir}"
    wanted = own if task is None else task
    same_head = own != "classify" or num_labels is None or num_labels == merged.config.num_labels
    if wanted == own and same_head:
        if own == "classify" and (num_labels is not None or id2label is not None):
            _apply_labels(merged.config, num_labels, id2label, problem_type)
        merged.eval()
        # the base load's list, as before: merging folds the adapter into that same model object
        return LoadedModel(merged, origin=origin, source=None, new_weights=loaded.new_weights)
    with tempfile.TemporaryDirectory(prefix="honelm-merged-") as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        del merged
        out = _load_pretrained(tmp, wanted, num_labels, id2label, trust_remote_code, torch_dtype, problem_type)
    return dataclasses.replace(out, origin=origin, source=None)


def load_for_carry(adapter_dir: str | Path, task: str, num_labels: int | None = None,
                   id2label: dict | None = None, trust_remote_code: bool = False,
                   problem_type: str | None = None) -> LoadedModel:
    """The base an adapter was trained on, loaded for `task` (re-headed when needed), with the adapter
    recorded in `carry` so that `honelm.boosters.lora.apply_lora` attaches it again with its weights
    (`lora.carry`)."""
    info = adapter_info(adapter_dir)
    base = adapter_base(adapter_dir, info)
    loaded = load_checkpoint(base, task, num_labels=num_labels, id2label=id2label,
                             trust_remote_code=trust_remote_code, problem_type=problem_type)
    return dataclasses.replace(
        loaded, origin=f"the base of the LoRA adapter in {adapter_dir} (the adapter is carried on)",
        carry={"dir": str(Path(adapter_dir).resolve()), "config": info})


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """Return (trainable, total) parameter counts; tied weights are counted once."""
    trainable = total = 0
    for p in model.parameters():  # parameters() already yields shared tensors once
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def model_kind(model_or_config: PreTrainedModel | PretrainedConfig) -> str:
    """Return "decoder" or "encoder" for a model or config.

    Checked in order: an explicit `is_decoder=True` (e.g. BERT used as a causal LM), the known
    model types, then the saved `architectures` names. Raises ConfigError when none decides.
    """
    config = getattr(model_or_config, "config", model_or_config)
    if getattr(config, "is_decoder", False):
        return "decoder"
    model_type = getattr(config, "model_type", "") or ""
    if model_type in _DECODER_TYPES:
        return "decoder"
    if model_type in _ENCODER_TYPES:
        return "encoder"
    for name in getattr(config, "architectures", None) or []:
        if name.endswith(("ForCausalLM", "LMHeadModel")):
            return "decoder"
        if name.endswith(("ForMaskedLM", "ForPreTraining")):
            return "encoder"
    raise ConfigError(f"cannot tell whether model type {model_type!r} is a decoder or an encoder")


def flops_per_token(config: PretrainedConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6*N + 12*L*A*T (PaLM, Chowdhery et al. 2022, appendix B).

    N counts the weights of every matrix multiply in the forward pass: attention q/k/v/o and
    the MLP of every layer, and the output projection over the vocabulary (counted even when
    it is tied to the input embedding, because the multiply happens regardless). Input
    embedding lookups, position / token-type embeddings, norms and biases are excluded (no
    matmul or negligible). For encoders the output projection is the MLM head (its d x d
    transform plus the tied vocabulary decoder). 6 = forward (2) + backward (4) FLOPs per
    weight. The attention term 12*L*A*T covers QK^T and attention-times-V for sequence length
    T = `seq_len`, with A = heads * head_dim, without discounting the causal mask.
    """
    if seq_len < 1:
        raise ConfigError(f"seq_len must be >= 1, got {seq_len}")
    d = config.hidden_size
    n_layers = config.num_hidden_layers
    n_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or d // n_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    inter = config.intermediate_size
    attn_width = n_heads * head_dim

    attn = d * attn_width + 2 * d * n_kv * head_dim + attn_width * d  # q, k, v, o
    if model_kind(config) == "decoder" and getattr(config, "hidden_act", "") in ("silu", "swish"):
        # Llama-family MLPs are gated (gate, up, down). Exact for honelm's presets (Llama, BERT);
        # other architectures are approximated by these two shapes.
        mlp = 3 * d * inter
    else:
        mlp = 2 * d * inter  # up, down
    n_matmul = n_layers * (attn + mlp) + config.vocab_size * d
    if model_kind(config) == "encoder":
        n_matmul += d * d  # MLM head transform before the vocabulary projection
    return float(6 * n_matmul + 12 * n_layers * attn_width * seq_len)


def kind_of_dir(path: str | Path, trust_remote_code: bool = False) -> str:
    """encoder | decoder of a model directory, hub id, or LoRA adapter directory (its base decides).

    Reads the config only (no weights), so a stage can choose its task, tokenizer kind and
    objective before the model is loaded.
    """
    source: str | Path = path
    local = Path(path)
    if local.is_dir() and not (local / "config.json").is_file() and (local / "adapter_config.json").is_file():
        source = adapter_info(path)["base_model_name_or_path"]
    try:
        config = AutoConfig.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    except Exception as err:  # hub/IO errors come in many types; all mean "could not get it"
        raise HonelmError(f"could not read the model config of {path}: {err}") from err
    return model_kind(config)


def check_block_fits(model: torch.nn.Module, length: int, what: str) -> None:
    """Refuse a sequence length beyond the model's positions (`what` names the setting that asked for it)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and length > limit:
        raise ConfigError(f"{what}={length} is longer than the model's max_position_embeddings={limit}")
