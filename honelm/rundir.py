"""The run directory: created (or reopened to resume) once per run, with its config, run.json and `latest` link.

`run_directory` refuses to mix two runs in one directory; `tracker_for` opens the run's log and
metrics.jsonl; `stage_of` reads which verb made a run (run.json).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from honelm import __version__
from honelm import config as C
from honelm.checkpoint import list_checkpoints
from honelm.errors import HonelmError
from honelm.runtime import Runtime
from honelm.trackers import names as tracker_names
from honelm.trackers import open_sinks
from honelm.tracking import Tracker


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
    """Create (or, with resume, reopen) the run directory and point `latest` at it.

    An existing non-empty directory is refused, except with `run.overwrite=true` on a honelm run
    without checkpoints: its old files are removed first, so the new run's logs are not mixed
    with the old one's. A directory that is not a honelm run (no run.json) is never removed.
    The trackers run.trackers asks for are checked first: a missing package is an error before anything is written.
    """
    tracker_names(getattr(getattr(cfg, "run", None), "trackers", "") or "")
    if resume:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            raise HonelmError(f"{resume}: not a run directory (no config.yaml)")
        if not _any_checkpoint(run_dir):
            raise HonelmError(f"{resume}: nothing to resume (no checkpoint under {run_dir / 'checkpoints'})")
        return run_dir
    out = Path(cfg.run.out_dir or f"runs/{stage}")
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
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        C.dump(cfg, run_dir / "config.yaml", header=f"# honelm {stage} --config {run_dir / 'config.yaml'}")
        info = {"stage": stage, "honelm_version": __version__, "argv": sys.argv, "started": time.time(),
                "world_size": runtime.world_size}
        (run_dir / "run.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
        link = out / "latest"
        tmp = out / f".latest-{os.getpid()}"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(name, tmp)
        os.replace(tmp, link)
    runtime.barrier()
    return run_dir


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
