"""`honelm prompt` (+ `test`, `report`, `search`) through the real CLI: a tiny pre-trained decoder prompted zero- and
few-shot on the generated reviews, on classify's split, tested once with classify's prediction files."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from honelm.cli import main
from honelm.errors import HonelmError
from honelm.models import build_model
from honelm.predictions import read_records
from honelm.protocol.test import run_test
from tests.stages.conftest import cli, events

QUIET = ["train.progress=false", "data.max_length=48"]


def prompt_run(data_dir, model, out, name, *extra: str) -> None:
    cli("prompt", f"data.train={data_dir / 'reviews.jsonl'}", f"model.init_from={model}", f"run.out_dir={out}",
        f"run.name={name}", *QUIET, *extra)


def test_prompted_lm_is_validated_then_tested_once_like_a_classifier(pretrained, data_dir, tmp_path, capsys):
    cli("classify", f"data.train={data_dir / 'reviews.jsonl'}", f"model.init_from={pretrained}",
        f"run.out_dir={tmp_path}", "run.name=c", "train.max_steps=2", "train.eval_every=2", "train.precision=fp32",
        "train.tensorboard=false", *QUIET)
    prompt_run(data_dir, pretrained, tmp_path, "zero")
    prompt_run(data_dir, pretrained, tmp_path, "few", "prompt.shots=2", "prompt.normalize=mean",
               "prompt.verbalizers=negative=awful,positive=wonderful")
    c, zero, few = tmp_path / "c", tmp_path / "zero", tmp_path / "few"

    # the same data values give the same split and labels as classify's
    manifest = [json.loads((r / "split_manifest.json").read_text()) for r in (c, zero, few)]
    assert manifest[0] == manifest[1] == manifest[2]
    assert (zero / "labels.json").read_text() == (c / "labels.json").read_text()

    # nothing trained: one validation at step 0, recorded as a run's best; no model copied
    for run in (zero, few):
        assert not events(run, "train") and not (run / "checkpoints").exists()
        (val,), (end,) = events(run, "eval"), events(run, "end")
        assert val["step"] == 0 and end["reason"] == "evaluated" and end["best_value"] == val["val_accuracy"]
        best = json.loads((run / "best" / "best.json").read_text())
        assert best["metric"] == "val_accuracy" and best["value"] == val["val_accuracy"]
        assert not list((run / "best").glob("*.safetensors")) and not (run / "best" / "config.json").exists()
        source = json.loads((run / "prompted.json").read_text())
        assert source["path"] == str((pretrained / "best").resolve()) and "model.safetensors" in source["weights"]
        preds = read_records(run / "best" / "val_predictions.jsonl")
        assert sum(r["gold"] == r["pred"] for r in preds) / len(preds) == pytest.approx(val["val_accuracy"])
    log = (few / "log.txt").read_text()
    assert "prompt: 2 shot(s) per label, verbalizers awful, wonderful" in log
    probs = [[r["probs"] for r in read_records(run / "best" / "val_predictions.jsonl")] for run in (zero, few)]
    assert probs[0] != probs[1]  # the shots and verbalizers reach the prompt

    # tested once, in classify's format; a second look is refused
    cli("test", str(c))
    cli("test", str(zero))
    metrics = json.loads((zero / "test_metrics.json").read_text())
    assert metrics["n_examples"] == 40 and 0.0 <= metrics["test_accuracy"] <= 1.0
    ours, theirs = read_records(zero / "test_predictions.jsonl"), read_records(c / "test_predictions.jsonl")
    assert [set(r) for r in ours] == [set(r) for r in theirs] and [len(r["probs"]) for r in ours] == [2] * 40
    assert [r["gold"] for r in ours] == [r["gold"] for r in theirs]
    assert sum(r["gold"] == r["pred"] for r in ours) / 40 == pytest.approx(metrics["test_accuracy"])
    capsys.readouterr()
    assert main(["test", str(zero)]) == 1
    assert "already evaluated" in capsys.readouterr().err

    cli("report", str(zero))
    report = (zero / "report.md").read_text()
    assert "| End reason | evaluated |" in report and report.count("## Classification quality (test split)") == 1

    # the prompted LM sits in honelm compare's table beside the fine-tuned classifier: quality, its recorded
    # model's size, and its own inference timed (each label's verbalizer scored)
    cli("compare", f"prompted={zero}", f"tuned={c}", "--rounds", "1", "--latency-examples", "2",
        "--throughput-batches", "1", "--batch-size", "4", "--no-memory", "--out", str(tmp_path / "cmp"))
    table = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    costs = table["costs"]["prompted"]
    assert costs["disk"]["kind"] == "recorded" and costs["disk"]["bytes"] == sum(source["weights"].values())
    assert costs["latency_ms"] > 0 and costs["throughput"] > 0


def test_a_changed_or_missing_model_is_refused_by_test(pretrained, data_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(pretrained / "best", model)
    prompt_run(data_dir, model, tmp_path, "p")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-6}))
    with pytest.raises(HonelmError, match="changed since the run"):
        run_test(tmp_path / "p")
    shutil.rmtree(model)
    with pytest.raises(HonelmError, match="is gone"):
        run_test(tmp_path / "p")
    assert not (tmp_path / "p" / "test_looks.jsonl").exists()  # a refused test is no look


@pytest.mark.slow  # CI runs it in its own step (.ci/run); kept out of the 3-minute default suite
def test_search_over_prompt_settings(pretrained, data_dir, tmp_path):
    spec = {"verb": "prompt", "set": {"data.train": str(data_dir / "reviews.jsonl"), "model.init_from": str(pretrained),
                                      "train.progress": False, "data.max_length": 48},
            "out_dir": str(tmp_path / "search"), "metric": "val_accuracy", "sampler": "grid", "pruner": "none",
            "n_trials": 2, "space": {"prompt.shots": [0, 1]}}
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(spec))
    cli("search", str(path))
    rows = [json.loads(x) for x in (tmp_path / "search" / "trials.jsonl").read_text().splitlines()]
    assert sorted(r["params.prompt.shots"] for r in rows) == [0, 1] and {r["state"] for r in rows} == {"complete"}
    cli("test", str(tmp_path / "search"))
    best = (tmp_path / "search" / "best").resolve()
    assert (best / "test_predictions.jsonl").is_file()


def test_config_errors_name_the_field(pretrained, data_dir, tmp_path, capsys):
    base = [f"data.train={data_dir / 'reviews.jsonl'}", f"run.out_dir={tmp_path}", "train.progress=false"]
    encoder = tmp_path / "encoder"
    build_model("encoder", "test", vocab_size=100, task="mlm", seed=0).save_pretrained(encoder)
    for i, (extra, message) in enumerate([
        ([f"model.init_from={pretrained}", "data.task=regression"], "data.task=regression: prompt"),
        ([], "model.init_from: prompt needs the causal LM"),
        ([f"model.init_from={encoder}"], "is an encoder: prompt needs a causal LM (decoder)"),
        ([f"model.init_from={pretrained}", "prompt.verbalizers=negative=bad,neutral=meh,positive=good"],
         "prompt.verbalizers: unknown label 'neutral'"),
        ([f"model.init_from={pretrained}", "prompt.verbalizers=negative=bad"],
         "prompt.verbalizers: no verbalizer for label(s) positive"),
        ([f"model.init_from={pretrained}", "prompt.shots=1000"], "prompt.shots=1000: the train split has"),
    ]):
        capsys.readouterr()
        assert main(["prompt", *base, *extra, f"run.name=r{i}"]) != 0
        assert message in capsys.readouterr().err, message
