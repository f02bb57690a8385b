"""`run.trackers=mlflow,wandb`: MLflow (a local store) and W&B (offline) get the run's params, every event's numbers
and the best checkpoint's path, and `--resume` continues the same tracker run; a tracker asked for but not installed
is an error before anything is written. The whole run through the CLI, with MLflow's default SQLite store, is slow."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from honelm import registry
from honelm.cli import main
from honelm.rundir import tracker_for
from honelm.runtime import Runtime
from tests.stages.conftest import FAST, cli

TINY = ["model.arch=encoder", "model.size=test", "model.vocab_size=300", "train.max_steps=2", "train.eval_every=2",
        "train.batch_size=16", "data.max_length=32", *FAST]


def _wandb_log(run: Path) -> bytes:
    """The offline run's record logs (a resumed run would add a directory with the same id): keys and values are
    stored as written."""
    run_id = json.loads((run / "trackers.json").read_text())["wandb"]
    parts = sorted((run / "wandb").glob("offline-run-*"))
    assert parts and all(p.name.endswith(f"-{run_id}") for p in parts)
    return b"".join(log.read_bytes() for p in parts for log in p.glob("*.wandb"))


def test_mlflow_and_wandb_offline_get_params_metrics_best_and_resume(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 wants a database store unless told otherwise
    monkeypatch.setenv("WANDB_SILENT", "true")
    uri = (tmp_path / "mlruns").as_uri()
    cfg = registry.build_config("classify", None, ["run.trackers=mlflow,wandb", f"run.mlflow_uri={uri}",
                                                   "run.tracker_project=exp1", "train.max_steps=2"])
    run = tmp_path / "tracked"
    tracker = tracker_for(run, Runtime(device=torch.device("cpu")), cfg)
    tracker.event("train", 1, loss=0.69, lr=1e-3, message="ignored text")
    tracker.event("eval", 2, split="val", val_accuracy=0.5, val_loss=float("nan"))
    tracker.event("best", 2, metric="val_accuracy", value=0.5)
    tracker.close()
    # what --resume opens (MLflow alone: a W&B resume only adds a second offline directory under the same id)
    resumed = registry.build_config("classify", None, ["run.trackers=mlflow", f"run.mlflow_uri={uri}",
                                                       "run.tracker_project=exp1", "train.max_steps=2"])
    again = tracker_for(run, Runtime(device=torch.device("cpu")), resumed)
    again.event("eval", 4, split="val", val_accuracy=0.75)
    again.close()

    client = MlflowClient(tracking_uri=uri)
    (found,) = client.search_runs([client.get_experiment_by_name("exp1").experiment_id])
    assert found.info.run_name == "tracked" and found.info.status == "FINISHED"
    assert found.data.params["train.max_steps"] == "2" and found.data.params["run.trackers"] == "mlflow,wandb"
    assert json.loads((run / "trackers.json").read_text())["mlflow"] == found.info.run_id
    assert set(found.data.metrics) == {"train/loss", "train/lr", "eval/val_accuracy", "best/value"}  # NaN dropped
    history = client.get_metric_history(found.info.run_id, "eval/val_accuracy")
    assert [(m.step, m.value) for m in history] == [(2, 0.5), (4, 0.75)]
    assert found.data.tags["best_checkpoint"] == str((run / "best").resolve()) and found.data.tags["best_step"] == "2"
    data = _wandb_log(run)
    for expected in (b"train/loss", b"eval/val_accuracy", b"train.max_steps", b"best_checkpoint",
                     str((run / "best").resolve()).encode()):
        assert expected in data


def test_a_tracker_asked_for_but_missing_is_an_error_before_the_run(data_dir, tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    args = ["classify", f"data.train={data_dir / 'reviews.jsonl'}", f"run.out_dir={tmp_path}", "run.name=r", *TINY]
    assert main([*args, "run.trackers=mlflow"]) == 1
    assert "run.trackers=mlflow: the mlflow package is not installed (pip install 'honelm[trackers]')" in \
        capsys.readouterr().err
    assert main([*args, "run.trackers=neptune"]) == 1
    assert "unknown tracker 'neptune'; choose from mlflow, wandb, tensorboard" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_a_real_run_logs_to_mlflow_sqlite_beside_it_and_wandb_offline(data_dir, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    from mlflow import MlflowClient

    monkeypatch.setenv("WANDB_SILENT", "true")
    cli("classify", f"data.train={data_dir / 'reviews.jsonl'}", f"run.out_dir={tmp_path}", "run.name=s",
        "run.trackers=mlflow,wandb", *TINY)
    run = tmp_path / "s"
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}")
    (found,) = client.search_runs([client.get_experiment_by_name("honelm").experiment_id])
    assert found.info.status == "FINISHED" and found.data.tags["best_checkpoint"] == str((run / "best").resolve())
    assert {"train/loss", "eval/val_accuracy", "end/train_time_s"} <= set(found.data.metrics)
    assert b"eval/val_accuracy" in _wandb_log(run)
