"""What a run reads and writes, checked before anything starts: `honelm VERB --dry-run`, `honelm pipeline --dry-run`.

Inputs are found by field name in every section of a built config (no stage is named here):

- data: the fields of a data section (`SplitDataConfig`: data.train/val/test/unlabelled, adapt's task.*) and
  `task_extra`, `prompts_file`: files, directories or globs, comma-separated; each part must match something
  (`hf:NAME` hub datasets need the network and are not checked; a saved `hf:/dir` is);
- models: `init_from`, `tokenizer`, `model`, `value_init` (model.*, teacher.*, reward.model, ppo.value_init,
  generate's model): a run, a checkpoint or tokenizer directory, or `pkg:MODULE` (installed?) resolve as the
  run would resolve them; a hub id needs the network and is not checked.

An input inside a directory that an earlier pipeline stage produces (`produced`) may be missing: that stage makes
it. Outputs: the run's parent directory (run.out_dir, else runs/<verb>) and a file field `out` must be writable:
an existing directory we may write, or one that can be created (its nearest existing ancestor is a writable
directory). Every problem is returned, each as `key: what is wrong`, so all are reported at once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from honelm.checkpoint import resolve_model_dir
from honelm.data import hub
from honelm.data.readers import expand_paths
from honelm.errors import HonelmError
from honelm.pins import config_fields, input_fields
from honelm.rundir import runs_parent

FILE_OUTPUTS = ("out",)
"""Fields that name a file the verb writes."""


def inputs(cfg: Any) -> list[tuple[str, str, str]]:
    """(key, value, kind) of every non-empty input field, kind "data" or "model": the fields a run pins."""
    return [(key, value, "model" if is_model else "data") for key, value, is_model in input_fields(cfg)]


def _made_by_earlier(path: str, produced: Sequence[Path]) -> bool:
    where = Path(path).expanduser().absolute()
    return any(where == p or p in where.parents for p in (q.expanduser().absolute() for q in produced))


def _data_problem(item: str) -> str | None:
    if hub.is_hub(item):
        spec = hub.parse(item)
        if spec.local and not Path(spec.name).expanduser().exists():
            return f"{item}: no such saved dataset directory"
        return None  # a hub dataset: needs the network, not checked
    try:
        expand_paths([item])
    except HonelmError as e:
        return str(e)
    return None


def _model_problem(spec: str) -> str | None:
    try:
        resolve_model_dir(spec)
    except HonelmError as e:
        return str(e)
    return None


def writable(directory: Path) -> str | None:
    """Why `directory` could not be written (None: it can): it exists and is writable, or the nearest existing
    ancestor is a writable directory, so it can be made."""
    path = directory.expanduser().absolute()
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable" + ("" if probe == path else f" (to create {path})")
    return None


def check(cfg: Any, verb: str, produced: Sequence[Path] = ()) -> list[str]:
    """Every problem with what the run of `verb` with `cfg` reads and writes, as `key: message` lines."""
    problems = []
    for key, value, kind in inputs(cfg):
        parts = [p.strip() for p in value.split(",") if p.strip()] if kind == "data" else [value]
        for part in parts:
            if _made_by_earlier(part, produced):
                continue
            problem = _data_problem(part) if kind == "data" else _model_problem(part)
            if problem:
                problems.append(f"{key}: {problem}")
    if hasattr(cfg, "run"):
        problem = writable(runs_parent(verb, cfg))
        if problem:
            problems.append(f"run.out_dir: {problem}")
    for key, name, section in config_fields(cfg):
        value = getattr(section, name)
        if name in FILE_OUTPUTS and isinstance(value, str) and value:
            target = Path(value).expanduser()
            problem = f"{value} is a directory" if target.is_dir() else writable(target.parent)
            if problem:
                problems.append(f"{key}: {problem}")
    return problems
