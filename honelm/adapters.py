"""PEFT LoRA adapter directories as honelm reads them: recognising one, its config, its base, merging it.

This module owns:

* `is_adapter_dir` / `adapter_info` / `adapter_base`: an adapter directory (adapter_config.json,
  no config.json), its checked config, and the base model it names (`base_model_name_or_path`).
* `native_task` / `base_labels`: the task an adapter was trained for and the label arguments its
  base must be loaded with so the adapter's head fits.
* `merge_into`: attach an adapter to its loaded base and merge it (`merge_and_unload`).
* `mutates_base`: which adapter inits rewrite the frozen base weights (pissa, olora): such a base
  exists on no disk and is saved with the run.

Loading the base itself is `honelm.models`' job (`load_merged`, `load_for_carry` call into here);
this module sits below it and imports no other honelm model code.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Any, Iterator

from peft import PeftModel
from torch import nn

from honelm.errors import HonelmError

# init_lora_weights values that rewrite the base weights (W0 -> W0 - scaling*B0*A0), so the sum is unchanged
_BASE_MUTATING = ("pissa", "olora")


def mutates_base(init: str) -> bool:
    """True for inits that rewrite the frozen base weights (the saved base must be this run's own)."""
    return init.strip().lower().startswith(_BASE_MUTATING)


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """peft 0.21 reads an attribute transformers 5 deprecated: a FutureWarning that is not the user's concern."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


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


def adapter_base(adapter_dir: str | Path, info: dict[str, Any]) -> str:
    """The base model an adapter names; an absolute path must still exist."""
    base = info["base_model_name_or_path"]
    if Path(base).is_absolute() and not Path(base).exists():
        raise HonelmError(f"{adapter_dir}: the adapter's base model {base} does not exist (moved or deleted?)")
    return base


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


def base_labels(own: str, base_config: Any, task: str | None, num_labels: int | None, id2label: dict | None,
                problem_type: str | None) -> dict[str, Any]:
    """The label arguments to load an adapter's base with for its own task `own` (none unless it classifies).

    A classifier base keeps its own labels; an adapter trained on a re-headed LM has a head with the
    labels the caller asks for (when the caller asks for classification with labels).
    """
    if own != "classify":
        return {}
    is_classifier = any(a.endswith("ForSequenceClassification") for a in base_config.architectures or [])
    if is_classifier or (task != "classify" or (num_labels is None and id2label is None)):
        return {"num_labels": base_config.num_labels, "id2label": base_config.id2label}
    return {"num_labels": num_labels, "id2label": id2label, "problem_type": problem_type}


def merge_into(model: nn.Module, adapter_dir: str | Path, base: str) -> nn.Module:
    """`model` (the adapter's base, loaded) with the adapter of `adapter_dir` attached and merged.

    `safe_merge`: a non-finite merged weight is an error. `base` only names the base in errors.
    """
    try:
        with quiet_peft():
            return PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload(safe_merge=True)
    except (RuntimeError, ValueError, KeyError) as e:
        raise HonelmError(f"{adapter_dir}: cannot attach the adapter to its base {base}: {str(e)[:400]}") from None
