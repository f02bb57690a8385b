"""The run directory: created (or reopened to resume) once per run, with its config, run.json and `latest` link.

`run_directory` refuses to mix two runs in one directory and takes the run's lock: one writer per
run directory (`RUN/.lock`, an OS file lock held for the run's life and released by the kernel when
the process dies however it dies), so a second `--resume` of a running run, or a `honelm test`
while it trains, is refused with the holder named; `release_run` lets go at the run's end and
`hold_run` holds it around other work (`honelm test`). `tracker_for` opens the run's log and
metrics.jsonl; `stage_of` reads which verb made a run (run.json).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import IO, Any, Iterator

import torch

from honelm import __version__
from honelm import config as C
from honelm.checkpoint import list_checkpoints
from honelm.errors import HonelmError
from honelm.runtime import Runtime
from honelm.trackers import names as tracker_names
from honelm.trackers import open_sinks
from honelm.tracking import Tracker


LOCK_FILE = ".lock"
_HELD: dict[Path, IO[str]] = {}
"""The run locks this process holds (by resolved run directory), until `release_run`."""


def _lock(run_dir: Path, what: str) -> IO[str]:
    """Take RUN/.lock without waiting, or a HonelmError naming who holds it."""
    path = run_dir / LOCK_FILE
    handle = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "holder unknown"
        handle.close()
        raise HonelmError(f"{run_dir} is in use by another honelm process ({holder}): one process writes a run at a "
                          "time; wait for it to end (or stop it) and try again") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}: {what}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return handle


def acquire_run(run_dir: Path, what: str) -> None:
    """Hold RUN's lock until `release_run` (or this process ends); a second writer gets a clear error."""
    key = run_dir.resolve()
    if key in _HELD:
        raise HonelmError(f"{run_dir} is already being written by this process ({what})")
    _HELD[key] = _lock(run_dir, what)


def release_run(run_dir: Path) -> None:
    """Let go of RUN's lock (nothing when this process does not hold it)."""
    handle = _HELD.pop(run_dir.resolve(), None)
    if handle is not None:
        handle.close()  # closing the descriptor releases the flock


@contextlib.contextmanager
def hold_run(run_dir: Path, what: str) -> Iterator[None]:
    """RUN's lock for the duration of the block (`honelm test`)."""
    acquire_run(run_dir, what)
    try:
        yield
    finally:
        release_run(run_dir)


def _refuse_if_busy(run_dir: Path) -> None:
    """An existing run about to be replaced (run.overwrite) must not be one that a live process writes."""
    if (run_dir / LOCK_FILE).is_file():
        _lock(run_dir, "checking").close()


def _broadcast_str(runtime: Runtime, value: str) -> str:
    if not runtime.distributed:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _any_checkpoint(run_dir: Path) -> bool:
    """Training checkpoints in the run, or in a sub-run it keeps (a booster's own run, e.g. a teacher in RUN/<name>/)."""
    if list_checkpoints(run_dir / "checkpoints"):
        return True
    return any(list_checkpoints(sub / "checkpoints") for sub in run_dir.iterdir() if sub.is_dir())


def run_directory(stage: str, cfg: Any, runtime: Runtime, resume: str | None) -> Path:
    """Create (or, with resume, reopen) the run directory, take its lock (main process) and point `latest` at it.

    An existing non-empty directory is refused, except with `run.overwrite=true` on a honelm run
    without checkpoints that no live process writes: its old files are removed first, so the new
    run's logs are not mixed with the old one's. A directory that is not a honelm run (no run.json)
    is never removed. The caller releases the lock (`release_run`) when the run ends.
    The trackers run.trackers asks for are checked first: a missing package is an error before anything is written.
    """
    tracker_names(getattr(getattr(cfg, "run", None), "trackers", "") or "")
    if resume:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            raise HonelmError(f"{resume}: not a run directory (no config.yaml)")
        # no checkpoint yet (stopped before its first one, e.g. killed while writing it): the run trains from
        # step 0 in the same directory (honelm.stages.runner.train says so)
        if runtime.is_main:
            acquire_run(run_dir, f"honelm {stage} --resume")
        return run_dir
    out = runs_parent(stage, cfg)
    name = _broadcast_str(runtime, cfg.run.name or time.strftime("%Y%m%d-%H%M%S"))
    run_dir = out / name
    if runtime.is_main:
        if run_dir.exists() and any(run_dir.iterdir()):
            if _any_checkpoint(run_dir):
                raise HonelmError(f"{run_dir} already holds a run: resume it with `honelm {stage} --resume {run_dir}` "
                                  "or choose another run.name")
            if not cfg.run.overwrite:
                raise HonelmError(f"{run_dir} exists and is not empty; set run.overwrite=true or another run.name")
            if not (run_dir / "run.json").is_file():
                raise HonelmError(f"{run_dir} is not a honelm run directory (no run.json): run.overwrite does not "
                                  "remove other files; choose another run.name")
            _refuse_if_busy(run_dir)
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        acquire_run(run_dir, f"honelm {stage}")
        C.dump(cfg, run_dir / "config.yaml", header=f"# honelm {stage} --config {run_dir / 'config.yaml'}")
        info = {"stage": stage, "honelm_version": __version__, "argv": sys.argv, "started": time.time(),
                "world_size": runtime.world_size}
        (run_dir / "run.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
        _point_latest(out, name)
    runtime.barrier()
    return run_dir


def runs_parent(stage: str, cfg: Any) -> Path:
    """The directory a new run of `stage` is made in (run.out_dir, else runs/<stage>), where `latest` is."""
    return Path(cfg.run.out_dir or f"runs/{stage}")


def latest_of(parent: Path) -> str | None:
    """Where parent/latest points now (None: no link)."""
    link = parent / "latest"
    return os.readlink(link) if link.is_symlink() else None


def _point_latest(out: Path, name: str) -> None:
    """out/latest -> name, replaced atomically (a reader never finds it missing)."""
    tmp = out / f".latest-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(name, tmp)
    os.replace(tmp, out / "latest")


def discard_failed_start(run_dir: Path, latest_before: str | None, runtime: Runtime) -> bool:
    """Undo a new run that failed before it trained: its directory goes (it holds nothing to resume, and the same
    run.name must work again without run.overwrite) and `latest` points back where it did. A directory holding a
    checkpoint (a booster's own run that finished) is kept. Returns whether the directory was removed."""
    if not runtime.is_main or not run_dir.is_dir() or _any_checkpoint(run_dir):
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    if latest_of(run_dir.parent) == run_dir.name:
        if latest_before is None:
            (run_dir.parent / "latest").unlink()
        else:
            _point_latest(run_dir.parent, latest_before)
    return True


def stage_of(run_dir: Path) -> str:
    try:
        return json.loads((run_dir / "run.json").read_text(encoding="utf-8"))["stage"]
    except (OSError, KeyError, ValueError):
        raise HonelmError(f"{run_dir}: not a honelm run directory (no run.json)") from None


def load_run_config(run_dir: Path, cls: type) -> Any:
    return C.build(cls, run_dir / "config.yaml")


def tracker_for(run_dir: Path, runtime: Runtime, cfg: Any, total_steps: int = 0) -> Tracker:
    """The run's Tracker: log.txt, metrics.jsonl, TensorBoard (train.tensorboard or run.trackers) and, on the main
    process, the MLflow / W&B sinks run.trackers asks for."""
    train = getattr(cfg, "train", None)
    asked = tracker_names(getattr(getattr(cfg, "run", None), "trackers", "") or "")
    tensorboard = bool(train and train.tensorboard) or "tensorboard" in asked
    return Tracker(run_dir, enabled=runtime.is_main, tensorboard=tensorboard, total_steps=total_steps,
                   progress=bool(train is None or train.progress),
                   sinks=open_sinks(run_dir, cfg) if runtime.is_main else ())


def write_json(path: Path, payload: Any, runtime: Runtime | None = None) -> None:
    if runtime is None or runtime.is_main:
        path.write_text(json.dumps(payload, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
