"""`run.trackers=mlflow,wandb`: a real run logged to MLflow (a local store) and W&B (offline), with its params,
metrics and best checkpoint path; a tracker asked for but not installed is an error before anything is written."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from honelm.cli import main
from tests.stages.conftest import FAST, cli

TINY = ["model.arch=encoder", "model.size=test", "model.vocab_size=300", "train.max_steps=2", "train.eval_every=2",
        "train.batch_size=16", "data.max_length=32", *FAST]


def _classify(data_dir: Path, out: Path, name: str, *extra: str) -> Path:
    cli("classify", f"data.train={data_dir / 'reviews.jsonl'}", f"run.out_dir={out}", f"run.name={name}", *TINY, *extra)
    return out / name


def test_mlflow_and_wandb_offline_log_params_metrics_and_best(data_dir, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 wants a database store unless told otherwise
    monkeypatch.setenv("WANDB_SILENT", "true")
    uri = (tmp_path / "mlruns").as_uri()
    run = _classify(data_dir, tmp_path, "tracked", "run.trackers=mlflow,wandb", f"run.mlflow_uri={uri}",
                    "run.tracker_project=exp1")
    best = str((run / "best").resolve())

    client = MlflowClient(tracking_uri=uri)
    (found,) = client.search_runs([client.get_experiment_by_name("exp1").experiment_id])
    assert found.info.run_name == "tracked" and found.info.status == "FINISHED"
    assert found.data.params["train.max_steps"] == "2" and found.data.params["run.trackers"] == "mlflow,wandb"
    assert {"train/loss", "eval/val_accuracy", "best/value", "end/train_time_s"} <= set(found.data.metrics)
    assert [m.step for m in client.get_metric_history(found.info.run_id, "eval/val_accuracy")] == [2]
    assert found.data.tags["best_checkpoint"] == best and found.data.tags["best_step"] == "2"

    (offline,) = (run / "wandb").glob("offline-run-*")
    (log,) = offline.glob("*.wandb")
    data = log.read_bytes()  # the offline run's record log: the keys and values are stored as written
    for expected in (b"train/loss", b"eval/val_accuracy", b"train.max_steps", b"best_checkpoint", best.encode()):
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
def test_mlflow_default_store_is_sqlite_beside_the_run(data_dir, tmp_path):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    run = _classify(data_dir, tmp_path, "s", "run.trackers=mlflow")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}")
    (found,) = client.search_runs([client.get_experiment_by_name("honelm").experiment_id])
    assert found.data.tags["best_checkpoint"] == str((run / "best").resolve())
