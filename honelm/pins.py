"""What a run was started on, pinned: absolute paths and sha256 of its data, tokenizer, init model and reward code.

`config.yaml` keeps paths as the user typed them, often relative: resumed from another directory,
or after a file was edited, the same config names different bytes. At the start of a run
`record_inputs` writes RUN/inputs.json,

    {"format": 1, "cwd": "/abs/where/it/started",
     "inputs": {"data.train": {"spec": "corpus.txt",
                               "files": [{"path": "/abs/corpus.txt", "size": 1234, "sha256": "9f2c…"}]},
                "model.init_from": {"spec": "runs/pretrain/latest", "files": [...]},
                "model.tokenizer": {"spec": "bert-base-uncased", "hub": true, "files": []}}}

and `check_inputs` on `--resume` reads every pinned input again and refuses one whose files differ,
naming the file and both hashes, unless the user passes `--allow-changed-data` (then the change is
said, recorded in inputs.json under "changes", and the new content pinned). A hub id cannot be
hashed without the network: its name is pinned, not its bytes. A `python:MODULE:FUNCTION` reward check
pins MODULE's source file (key `reward.function` or `reward.checks[i]`): the code that scores a GRPO/PPO run
changes what it learns as much as its data does. A run started before inputs were
pinned is resumed unchecked, with a note, and pinned from then on.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

from honelm.checkpoint import file_sha256, resolve_model_dir
from honelm.data.readers import expand_paths
from honelm.data.sources import SplitDataConfig
from honelm.data.splits import file_digest
from honelm.errors import HonelmError

PINS_FILE = "inputs.json"
DATA_FIELDS = ("train", "val", "test", "unlabelled")
"""The fields of a data section (`SplitDataConfig`: `data`, adapt's `task`) that name data files."""
DATA_NAMES = ("task_extra", "prompts_file")
"""Fields outside a data section that name data files (adapt's extra task text, generate's prompts)."""
MODEL_NAMES = ("init_from", "tokenizer", "model", "value_init")
"""Fields, in any section, that name a model or tokenizer (a run, a directory, pkg:MODULE or a hub id): the model
trained (model.*), a distillation teacher (teacher.*), a PPO/GRPO reward model, a separate PPO value model's start."""


def config_fields(cfg: Any, prefix: str = "") -> Iterator[tuple[str, str, Any]]:
    """(dotted key, field name, section object) of every field of `cfg` and of its sections, at any depth."""
    for name, value in vars(cfg).items():
        if dataclasses.is_dataclass(value) or isinstance(value, SimpleNamespace):
            yield from config_fields(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", name, cfg


def input_fields(cfg: Any) -> Iterator[tuple[str, str, bool]]:
    """(key, value, is_model) of every non-empty field of `cfg` that names an input: what a run pins and what
    --dry-run checks (honelm.preflight), found by field name so no stage is named here."""
    for key, name, section in config_fields(cfg):
        value = getattr(section, name)
        if not isinstance(value, str) or not value.strip():
            continue
        if (isinstance(section, SplitDataConfig) and name in DATA_FIELDS) or name in DATA_NAMES:
            yield key, value, False
        elif name in MODEL_NAMES:
            yield key, value, True


_PYTHON_CHECK = re.compile(r"^\s*(?:[-+0-9.eE]+\s*\*\s*)?python:(?P<module>[\w.]+):")
"""A reward check `[WEIGHT*]python:MODULE:FUNCTION` (honelm.rl.checks): the code that scores the run."""


def code_inputs(cfg: Any) -> Iterator[tuple[str, str]]:
    """(key, module) of every `python:MODULE:FUNCTION` check named by a field of `cfg` (reward.function, an item of
    reward.checks): a user's reward code decides what a GRPO/PPO run learns, so its source is pinned like data."""
    for key, name, section in config_fields(cfg):
        value = getattr(section, name)
        items = list(enumerate(value)) if isinstance(value, (list, tuple)) else [(None, value)]
        for i, item in items:
            found = _PYTHON_CHECK.match(item) if isinstance(item, str) else None
            if found:
                yield (key if i is None else f"{key}[{i}]"), found["module"]


def _pin_code(module: str) -> dict[str, Any]:
    """The source file of `module`, hashed: found without running it (a dotted name imports its parent packages);
    OSError when it has none, and the stage's own loading then reports the module it cannot find."""
    found = importlib.util.find_spec(module)
    if found is None or not found.origin or not Path(found.origin).is_file():
        raise OSError(f"no source file for {module}")
    return {"spec": module, "code": True, "files": [_file(Path(found.origin))]}


def check_models(cfg: Any) -> None:
    """Every model or tokenizer `cfg` names resolves (a run, a directory, pkg:MODULE; a hub id is not checked):
    else a HonelmError naming the key, raised before the run writes anything."""
    for key, spec, is_model in input_fields(cfg):
        if is_model:
            try:
                resolve_model_dir(spec)
            except HonelmError as e:
                raise HonelmError(f"{key}: {e}") from None


def _file(path: Path, data: bool = False) -> dict[str, Any]:
    # data files are hashed as the split manifest hashes them: a test file is only ever opened to be hashed
    digest = file_digest(path) if data else file_sha256(path)
    return {"path": str(path.resolve()), "size": path.stat().st_size, "sha256": digest}


def _pin(spec: str, is_model: bool) -> dict[str, Any]:
    """The files `spec` names now, hashed (a model spec: the files of the directory it resolves to)."""
    if not is_model:
        return {"spec": spec, "files": [_file(p, data=True) for p in expand_paths(spec.split(","))]}
    where = resolve_model_dir(spec)
    directory = Path(where)
    if not directory.is_dir():
        return {"spec": spec, "hub": True, "files": []}
    return {"spec": spec, "files": [_file(p) for p in sorted(directory.iterdir()) if p.is_file()]}


def pin_inputs(cfg: Any) -> dict[str, Any]:
    """Every input of `cfg` as inputs.json records it; an input that cannot be read is left out (the stage's own
    reading reports it, with its file and line)."""
    inputs = {}
    for key, spec, is_model in input_fields(cfg):
        try:
            inputs[key] = _pin(spec, is_model)
        except (HonelmError, OSError):
            continue
    for key, module in code_inputs(cfg):
        try:
            inputs[key] = _pin_code(module)
        except (ImportError, ValueError, OSError):
            continue
    return {"format": 1, "cwd": str(Path.cwd().resolve()), "inputs": inputs}


def record_inputs(run_dir: Path, cfg: Any) -> None:
    """RUN/inputs.json for a run that starts now."""
    (run_dir / PINS_FILE).write_text(json.dumps(pin_inputs(cfg), indent=2), encoding="utf-8")


def _difference(key: str, old: dict[str, Any], new: dict[str, Any] | None) -> str | None:
    """How input `key` differs from what the run recorded (None: the same)."""
    if new is None:
        was = old["files"][0]["path"] if old.get("files") else old.get("spec")
        return f"{key}={old.get('spec')} cannot be read from here (the run read {was})"
    if old.get("hub") or new.get("hub"):
        return None if old.get("spec") == new.get("spec") else f"{key} was {old.get('spec')}, now {new.get('spec')}"
    before, after = old.get("files", []), new.get("files", [])
    if len(before) != len(after):
        return f"{key}={new.get('spec')} now names {len(after)} files; the run read {len(before)}"
    for was, now in zip(before, after):
        if was["sha256"] != now["sha256"]:
            return (f"{key}: {now['path']} has sha256 {now['sha256'][:16]}…, but the run was trained on "
                    f"{was['path']} with sha256 {was['sha256'][:16]}…")
    return None


def check_inputs(run_dir: Path, cfg: Any, allow_changed: bool, say: Callable[[str], None], write: bool = True) -> None:
    """On `--resume`: refuse inputs that differ from RUN/inputs.json (HonelmError naming the file and both hashes),
    or with `allow_changed` say so, record the change and pin the new content (`write`: this process writes)."""
    path = run_dir / PINS_FILE
    if not path.is_file():
        say(f"note: {path} is missing (a run started before inputs were pinned): its data is not checked on this "
            "resume; it is pinned from now on")
        if write:
            record_inputs(run_dir, cfg)
        return
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
        pinned = dict(recorded["inputs"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise HonelmError(f"{path}: unreadable ({type(e).__name__}: {e}); it records what the run was started on: "
                          "restore it, or delete it to resume without the check") from None
    now = pin_inputs(cfg)
    keys = sorted(set(pinned) | set(now["inputs"]))
    changes = [d for k in keys if (d := _change(k, pinned.get(k), now["inputs"].get(k)))]
    if not changes:
        return
    if not allow_changed:
        raise HonelmError(f"{changes[0]}{f' (and {len(changes) - 1} more changes)' if len(changes) > 1 else ''}: "
                          "a resumed run must read what it started on; restore the original input, or resume with "
                          "--allow-changed-data to continue on the new one (recorded in inputs.json)")
    for change in changes:
        say(f"warning: {change}; continuing on it (--allow-changed-data)")
    if write:
        now["changes"] = [*recorded.get("changes", []), *({"time": time.time(), "change": c} for c in changes)]
        path.write_text(json.dumps(now, indent=2), encoding="utf-8")


def _change(key: str, old: dict[str, Any] | None, new: dict[str, Any] | None) -> str | None:
    if old is None:
        return f"{key}={new['spec']} is set, but the run started without it" if new is not None else None
    return _difference(key, old, new)


def data_unchanged(run_dir: Path, cfg: Any) -> bool:
    """Whether every data input of `cfg` has the bytes RUN/inputs.json pinned (False when nothing was pinned):
    `honelm test` then takes the split from the run's manifest instead of computing it again."""
    try:
        pinned = json.loads((run_dir / PINS_FILE).read_text(encoding="utf-8"))["inputs"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    now = pin_inputs(cfg)["inputs"]
    data_keys = {k for k in (*pinned, *now) if not k.startswith("model.") and not (pinned.get(k) or now.get(k)).get("code")}
    return bool(data_keys) and all(k in pinned and _change(k, pinned[k], now.get(k)) is None for k in data_keys)
