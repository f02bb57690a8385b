"""`honelm export RUN [--merge] [--out DIR]`: a run's best model as a directory that needs nothing else.

(`--format onnx` and `--quantize int8` are honelm.protocol.deploy's; the command line is parsed there.)

* A LoRA run with `--merge`: the base is loaded in fp32 (whatever precision training used), the
  adapter attached and merged (`merge_and_unload`), and the result saved as a plain transformers
  checkpoint (safetensors) with the tokenizer. Merging in fp32 avoids the rounding a bf16 merge adds
  (METHODS.md §1.5 item 5).
* A LoRA run without `--merge`: the adapter directory and tokenizer are copied as they are, a
  plain PEFT export (its `base_model_name_or_path` still names the base).
* Any other run: best/ is copied; there is no adapter, so `--merge` has nothing to do (and says so).

The default destination is RUN/export. The directory is written beside its final name and renamed
into place; an existing non-empty destination is refused unless `overwrite`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import torch

from honelm.adapters import adapter_info, is_adapter_dir
from honelm.checkpoint import atomic_directory, resolve_model_dir
from honelm.errors import HonelmError
from honelm.models import load_merged
from honelm.tokenizer import load_tokenizer


def _source(run: Path) -> Path:
    """The model directory to export: RUN/best/ for a run, else the directory itself."""
    if not run.exists():
        raise HonelmError(f"{run}: no such run or model directory")
    src = Path(resolve_model_dir(str(run)))
    if not ((src / "config.json").is_file() or is_adapter_dir(src)):
        raise HonelmError(f"{run}: no model to export (neither config.json nor adapter_config.json in {src})")
    return src


def _destination(run: Path, src: Path, out: str | Path | None, overwrite: bool) -> Path:
    if out is None:
        if src == (run / "best").resolve():
            out = run / "export"
        else:
            raise HonelmError(f"{run} is a model directory, not a run: say where to write with --out DIR")
    dest = Path(out)
    if dest.resolve() == src or src in dest.resolve().parents:
        raise HonelmError(f"--out {dest} is inside the model being exported ({src})")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())) and not overwrite:
        raise HonelmError(f"{dest} exists and is not empty; pass --overwrite to replace it")
    return dest


def export(run: str | Path, merge: bool = False, out: str | Path | None = None, overwrite: bool = False,
           say: Callable[[str], None] = print) -> Path:
    """Write RUN's best model to `out` (default RUN/export); see the module docstring. Returns `out`."""
    run = Path(run)
    src = _source(run)
    dest = _destination(run, src, out, overwrite)
    if merge and is_adapter_dir(src):
        base = adapter_info(src)["base_model_name_or_path"]
        model = load_merged(src, torch_dtype=torch.float32).model  # the adapter's own task and labels
        tokenizer = load_tokenizer(src)
        with atomic_directory(dest) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            provenance = {"source": str(src), "base_model": base, "merged": True, "dtype": "float32"}
            (tmp / "export.json").write_text(json.dumps(provenance, indent=2), encoding="utf-8")
        say(f"merged the LoRA adapter {src} into its base {base} (fp32): {dest} loads with plain transformers")
        return dest
    with atomic_directory(dest) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
    if is_adapter_dir(src):
        say(f"copied the LoRA adapter {src} (+ tokenizer) to {dest}: load it with peft on its base "
            f"{adapter_info(src)['base_model_name_or_path']}, or export with --merge for a standalone model")
    elif merge:
        say(f"{src} is not a LoRA adapter: nothing to merge; copied it to {dest}")
    else:
        say(f"copied {src} to {dest}")
    return dest
