"""`honelm classify` (+ `test`, `report`) through the real CLI: decoder from a pretrain run, encoder from scratch,
pairs, regression; the best checkpoint loads with plain transformers; per-example predictions files."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from honelm.predictions import read_records
from honelm.metrics import one_class_warning
from tests.stages.conftest import FAST, cli, events

SHORT = ["train.max_steps=30", "train.eval_every=10", "train.batch_size=16", "train.lr=2e-3", "data.max_length=48", *FAST]


def test_classify_from_pretrain_run(pretrained, data_dir, tmp_path):
    cli("classify", f"data.train={data_dir / 'reviews.jsonl'}", f"model.init_from={pretrained}",
        f"run.out_dir={tmp_path}", "run.name=c", *SHORT)
    run = tmp_path / "c"
    train = events(run, "train")
    assert train[-1]["loss"] < train[0]["loss"]
    assert {"val_accuracy", "val_macro_f1", "val_loss"} <= set(events(run, "eval")[-1])
    model = AutoModelForSequenceClassification.from_pretrained(run / "best")
    tok = AutoTokenizer.from_pretrained(run / "best")
    assert model.config.id2label == {0: "negative", 1: "positive"}
    logits = model(**tok(["the film was superb ."], return_tensors="pt")).logits
    assert logits.shape == (1, 2)
    assert json.loads((run / "labels.json").read_text()) == {"task": "classification",
                                                             "id2label": {"0": "negative", "1": "positive"}}
    # best/ carries the predictions of the evaluation that made it best: same accuracy as best.json
    best = json.loads((run / "best" / "best.json").read_text())
    val = read_records(run / "best" / "val_predictions.jsonl")
    assert len(val) == 40 and set(val[0]) == {"i", "gold", "pred", "probs"} and len(val[0]["probs"]) == 2
    assert sum(r["gold"] == r["pred"] for r in val) / len(val) == pytest.approx(best["val_accuracy"])
    assert all(abs(sum(r["probs"]) - 1) < 1e-5 and r["pred"] == max(range(2), key=r["probs"].__getitem__)
               for r in val)

    cli("test", str(run))
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["n_examples"] == 40
    assert "predictions" not in metrics and "id2label" not in metrics
    test = read_records(run / "test_predictions.jsonl")
    assert [r["i"] for r in test] == list(range(40))
    assert sum(r["gold"] == r["pred"] for r in test) / 40 == pytest.approx(metrics["test_accuracy"])
    assert not (run / "test_predictions.json").exists()

    cli("report", str(run))
    report = (run / "report.md").read_text()
    assert "## Classification quality (test split)" in report
    assert "| gold \\ predicted | negative | positive |" in report
    assert "Expected calibration error (ECE)" in report
    assert (run / "plots" / "confusion.png").is_file() and (run / "plots" / "calibration.png").is_file()
    assert "data:image/png;base64," in (run / "report.html").read_text()


def test_encoder_pairs_from_scratch(data_dir, tmp_path):
    cli("classify", f"data.train={data_dir / 'pairs.jsonl'}", "data.text_field=a", "data.pair_field=b",
        "data.label_field=same", "model.arch=encoder", "model.size=test", "model.vocab_size=500",
        f"run.out_dir={tmp_path}", "run.name=p", *SHORT)
    assert (tmp_path / "p" / "best" / "model.safetensors").is_file()
    tok = AutoTokenizer.from_pretrained(tmp_path / "p" / "best")
    enc = tok("a b", "c d")
    assert 1 in enc["token_type_ids"]


def test_regression(data_dir, tmp_path):
    cli("classify", f"data.train={data_dir / 'scores.jsonl'}", "data.label_field=score", "data.task=regression",
        "model.arch=encoder", "model.size=test", "model.vocab_size=500", f"run.out_dir={tmp_path}", "run.name=r", *SHORT)
    ev = events(tmp_path / "r", "eval")[-1]
    assert {"val_mse", "val_pearson"} <= set(ev)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "r" / "best")
    assert model.config.num_labels == 1 and model.config.problem_type == "regression"
    val = read_records(tmp_path / "r" / "best" / "val_predictions.jsonl")
    assert set(val[0]) == {"i", "gold", "pred"} and {r["gold"] for r in val} <= {1.0, 4.0}
    cli("test", str(tmp_path / "r"))
    assert "test_mse" in json.loads((tmp_path / "r" / "test_metrics.json").read_text())
    test = read_records(tmp_path / "r" / "test_predictions.jsonl")
    assert len(test) == 40 and all(isinstance(r["pred"], float) and "probs" not in r for r in test)
    assert json.loads((tmp_path / "r" / "labels.json").read_text()) == {"task": "regression"}


def test_early_stopping_on_validation(data_dir, tmp_path):
    cli("classify", f"data.train={data_dir / 'reviews.jsonl'}", "model.arch=encoder", "model.size=test",
        "model.vocab_size=500", "train.lr=1e-9", "train.max_steps=200", "train.eval_every=2", "train.patience=2",
        "train.metric=val_loss", f"run.out_dir={tmp_path}", "run.name=e", *FAST)
    stop = events(tmp_path / "e", "early_stop")
    assert stop and stop[0]["step"] < 200


def test_one_class_warning_by_hand():
    labels = torch.tensor([0, 1, 1, 2])
    constant = torch.tensor([[0.1, 2.0, 0.3]] * 4)
    warning = one_class_warning(constant, labels, {0: "neg", 1: "pos", 2: "mixed"})
    assert warning and "'pos'" in warning and "all 4 examples" in warning and "accuracy 0.500" in warning
    assert one_class_warning(constant, labels, None) and "'1'" in one_class_warning(constant, labels, None)
    varied = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]])
    assert one_class_warning(varied, labels, None) is None
    assert one_class_warning(constant, torch.tensor([1, 1, 1, 1]), None) is None  # gold of one class: nothing to say


def test_a_run_that_predicts_one_class_twice_in_a_row_is_told_once(data_dir, tmp_path, monkeypatch):
    import honelm.stages.classify as classify_stage

    real = classify_stage.predict

    def collapsed(*args, **kwargs):  # the real forward pass, then every example's answer made class 0
        logits = real(*args, **kwargs)
        return torch.cat([logits[:, :1] + 100.0, logits[:, 1:]], dim=1)

    monkeypatch.setattr(classify_stage, "predict", collapsed)
    cli("classify", f"data.train={data_dir / 'reviews.jsonl'}", "model.arch=encoder", "model.size=test",
        "model.vocab_size=500", "train.max_steps=6", "train.eval_every=2", "train.patience=0",
        f"run.out_dir={tmp_path}", "run.name=c", *FAST)
    log = (tmp_path / "c" / "log.txt").read_text()
    assert log.count("two validations in a row predicted one class") == 1, log
    assert "lower train.lr or lengthen train.warmup_ratio" in log
