"""Experiment trackers users already have, beside metrics.jsonl: MLflow, Weights & Biases, TensorBoard.

`run.trackers=mlflow,wandb` (any of mlflow, wandb, tensorboard, comma-separated) opens one `Sink` per
tracker for the run; `honelm.tracking.Tracker` hands each the run's parameters (the whole config,
flattened to `section.field` keys), every numeric field of every event as a metric named
`<event>/<field>` at the event's step (the same names TensorBoard gets), and the best checkpoint's
path (RUN/best) whenever a new best is saved. Only the main process writes.

A tracker named in run.trackers whose package is missing is a ConfigError before the run starts
(`check`): a user who asked for MLflow gets an error, not a run without it. `train.tensorboard`
(on by default) stays what it was: TensorBoard when installed, silently nothing otherwise.

- MLflow (`mlflow-skinny` suffices): a run in experiment `run.tracker_project` of the store
  `run.mlflow_uri`, by default the SQLite store `sqlite:///OUT_DIR/mlflow.db` beside the run
  directory (shared by the runs of that directory; `mlflow ui --backend-store-uri` it). MLflow 3
  refuses a `file:` store unless MLFLOW_ALLOW_FILE_STORE=true is set by the user. Written through
  `MlflowClient`, so no process-global "active run" is touched.
- W&B: `wandb.init(mode=run.wandb_mode)`, offline by default (RUN/wandb/offline-run-*; `wandb sync`
  uploads it later), project `run.tracker_project`.

Each tracker's run id is kept in RUN/trackers.json, so `--resume` continues the same tracker run.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import time
from pathlib import Path
from typing import Any, Protocol

from honelm.errors import ConfigError

KNOWN = {"mlflow": "mlflow", "wandb": "wandb", "tensorboard": "tensorboard"}
"""tracker name → the package that must be importable."""
IDS_FILE = "trackers.json"


class Sink(Protocol):
    """One tracker's side of a run."""

    def metrics(self, step: int, values: dict[str, float]) -> None: ...

    def best(self, path: str, step: int) -> None: ...

    def close(self, failed: bool) -> None: ...


def names(spec: str) -> list[str]:
    """The trackers `run.trackers` asks for, checked: known names, packages installed (ConfigError otherwise)."""
    wanted = [n.strip() for n in spec.split(",") if n.strip()]
    for name in wanted:
        if name not in KNOWN:
            raise ConfigError(f"run.trackers: unknown tracker {name!r}; choose from {', '.join(KNOWN)}")
        if importlib.util.find_spec(KNOWN[name]) is None:
            extra = "tensorboard" if name == "tensorboard" else "trackers"
            raise ConfigError(f"run.trackers={name}: the {KNOWN[name]} package is not installed "
                              f"(pip install 'honelm[{extra}]'), and a tracker that was asked for is never skipped")
    return list(dict.fromkeys(wanted))


def flat_params(cfg: Any) -> dict[str, str]:
    """The config as `section.field` → text (what a tracker shows as the run's parameters)."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)

    walk("", dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg))
    return out


def _ids(run_dir: Path) -> dict[str, str]:
    path = run_dir / IDS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _keep_id(run_dir: Path, name: str, run_id: str) -> None:
    ids = {**_ids(run_dir), name: run_id}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / IDS_FILE).write_text(json.dumps(ids, indent=2), encoding="utf-8")


class MLflowSink:
    """A run in an MLflow tracking store, written through MlflowClient."""

    def __init__(self, run_dir: Path, section: Any, params: dict[str, str]) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param

        self._metric = Metric
        uri = section.mlflow_uri or f"sqlite:///{run_dir.resolve().parent / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=uri)
        known = _ids(run_dir).get("mlflow")
        if known:  # --resume: the same tracker run goes on
            self.run_id = known
            self.client.update_run(known, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(section.tracker_project)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(section.tracker_project)
        run = self.client.create_run(experiment_id, run_name=run_dir.name, tags={"honelm.run_dir": str(run_dir.resolve())})
        self.run_id = run.info.run_id
        _keep_id(run_dir, "mlflow", self.run_id)
        items = [Param(k, v[:6000]) for k, v in params.items()]  # MLflow's limits: 6000 chars, 100 params a call
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def metrics(self, step: int, values: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self._metric(k, float(v), now, step) for k, v in values.items()])

    def best(self, path: str, step: int) -> None:
        self.client.set_tag(self.run_id, "best_checkpoint", path)
        self.client.set_tag(self.run_id, "best_step", str(step))

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


class WandbSink:
    """A Weights & Biases run (offline by default: nothing leaves the machine until `wandb sync`)."""

    def __init__(self, run_dir: Path, section: Any, params: dict[str, str]) -> None:
        import wandb

        known = _ids(run_dir).get("wandb")
        self.run = wandb.init(project=section.tracker_project, name=run_dir.name, dir=str(run_dir), config=params,
                              mode=section.wandb_mode, id=known, resume="allow" if known else None,
                              reinit="create_new")
        _keep_id(run_dir, "wandb", self.run.id)

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def best(self, path: str, step: int) -> None:
        self.run.summary["best_checkpoint"] = path
        self.run.summary["best_step"] = step

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def open_sinks(run_dir: Path, cfg: Any) -> list[Sink]:
    """The MLflow and W&B sinks run.trackers asks for (TensorBoard is the Tracker's own writer)."""
    section = getattr(cfg, "run", None)
    wanted = names(getattr(section, "trackers", "") or "")
    if not {"mlflow", "wandb"} & set(wanted):
        return []
    params = flat_params(cfg)
    kinds = {"mlflow": MLflowSink, "wandb": WandbSink}
    return [kinds[name](run_dir, section, params) for name in wanted if name in kinds]
