"""`honelm compare` through the real CLI on tiny classify runs, each tested once by `honelm test`.

A "teacher" (a decoder with a BPE tokenizer), a "student" and an "alone" student (encoders with
WordPiece tokenizers of other sizes) are trained on the same generated data; the comparison's numbers
must be the ones the test runs recorded (accuracy and macro-F1 from test_metrics.json, intervals
from test_predictions.jsonl), the parameters the models' own, and it must refuse untested runs,
runs tested on another split, another label set, or other gold labels.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from honelm.cli import main
from honelm.data import splits as splits_mod
from honelm.models import count_parameters, load_model
from honelm.predictions import read_records
from honelm.protocol import measure, stats
from honelm.protocol.compare import Side, summary_line
from tests.stages.conftest import FAST, cli

SHORT = ["train.max_steps=20", "train.eval_every=10", "train.batch_size=16", "train.lr=2e-3", "data.max_length=48", *FAST]
QUICK = ["--rounds", "1", "--latency-examples", "2", "--throughput-batches", "1", "--batch-size", "4", "--bootstrap", "200"]
MODELS = {"teacher": ["model.arch=decoder", "model.vocab_size=800"],
          "student": ["model.arch=encoder", "model.vocab_size=500", "run.seed=1"],
          "alone": ["model.arch=encoder", "model.vocab_size=300", "run.seed=2"]}


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory) -> dict[str, Path]:
    """Three classify runs on the same data and split settings, each tested once."""
    out = tmp_path_factory.mktemp("compare-runs")
    for name, settings in MODELS.items():
        cli("classify", f"data.train={data_dir / 'reviews.jsonl'}", "model.size=test", *settings,
            f"run.out_dir={out}", f"run.name={name}", *SHORT)
        cli("test", str(out / name))
    return {name: out / name for name in MODELS}


def _copy(run: Path, where: Path) -> Path:
    target = where / run.name
    shutil.copytree(run, target)
    return target


def _compare(*args: str) -> int:
    return main(["compare", *args, *QUICK])


def test_numbers_come_from_the_test_runs(runs, tmp_path, capsys):
    reads = splits_mod.test_access_count()
    cli("compare", *(f"{n}={p}" for n, p in runs.items()), "--out", str(tmp_path / "out"), "--no-memory", *QUICK)
    assert splits_mod.test_access_count() == reads  # the test split was never opened
    result = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert result["reference"] == "teacher" and result["task"] == "classification"
    teacher = read_records(runs["teacher"] / "test_predictions.jsonl")
    gold = [r["gold"] for r in teacher]
    params = {}
    for name, run in runs.items():
        recorded = json.loads((run / "test_metrics.json").read_text())
        quality = result["quality"][name]
        assert quality["accuracy"]["value"] == recorded["test_accuracy"]
        assert quality["macro_f1"]["value"] == recorded["test_macro_f1"]
        model = AutoModelForSequenceClassification.from_pretrained(run / "best")
        params[name] = count_parameters(model)[1]
        costs = result["costs"][name]
        assert costs["parameters"] == params[name] and costs["parameters_source"] == "model"
        assert costs["disk"] == {"kind": "model", "bytes": (run / "best" / "model.safetensors").stat().st_size}
        assert costs["latency_ms"] > 0 and costs["throughput"] > 0 and len(costs["throughput_rounds"]) == 1
        if name != "teacher":  # the interval is the paired bootstrap of the two prediction files
            pred = [r["pred"] for r in read_records(run / "test_predictions.jsonl")]
            ci = stats.paired_bootstrap("accuracy", np.asarray(gold), [pred], [[r["pred"] for r in teacher]], 200)
            assert (quality["accuracy"]["diff"], quality["accuracy"]["low"], quality["accuracy"]["high"]) == \
                pytest.approx((ci.diff, ci.low, ci.high))
            assert quality["accuracy"]["diff"] == pytest.approx(recorded["test_accuracy"] -
                                                                result["quality"]["teacher"]["accuracy"]["value"], abs=1e-6)
    assert len(set(params.values())) == 3
    subject = min(("student", "alone"), key=params.__getitem__)
    assert result["subject"] == subject
    sides = [Side(n, result["quality"][n]["accuracy"]["value"], params[n], result["costs"][n]["throughput"])
             for n in (subject, "teacher")]
    assert result["summary"] == summary_line(*sides, "accuracy", "CPU")
    report = (tmp_path / "out" / "compare.md").read_text()
    assert result["summary"] in report and "How the costs were measured" in report
    assert "| teacher | 1 | " in report  # one look each
    printed = capsys.readouterr().out
    assert "| run | test looks | accuracy |" in printed and result["summary"] in printed


def test_peak_memory_probe(runs):
    """The probe's steps in this process (the CLI runs it in a fresh one: see the slow test below)."""
    rows = measure.timing_rows(measure.open_run("alone", runs["alone"], torch.device("cpu")), measure.Budget())
    memory = measure._probe(str(runs["alone"]), "cpu", 0, rows, measure.Budget(1, 2, 1, 4))
    assert memory["peak_rss_mb"] >= memory["baseline_rss_mb"] > 0 and memory["model_rss_mb"] >= 0
    assert memory["peak_memory_window"] in ("run", "process")


@pytest.mark.slow
def test_peak_memory_is_measured_in_a_fresh_process(runs, tmp_path):
    cli("compare", str(runs["student"]), str(runs["alone"]), "--reference", "alone", "--out", str(tmp_path), *QUICK)
    result = json.loads((tmp_path / "compare.json").read_text())
    assert result["reference"] == "alone" and result["subject"] == "student"
    for name in ("student", "alone"):
        memory = result["costs"][name]["memory"]
        assert memory["peak_rss_mb"] > memory["baseline_rss_mb"] > 0
        assert memory["model_rss_mb"] == pytest.approx(memory["peak_rss_mb"] - memory["baseline_rss_mb"], abs=0.11)


def test_a_model_that_cannot_be_loaded_keeps_its_quality_columns(runs, tmp_path):
    prompted = _copy(runs["alone"], tmp_path)
    shutil.rmtree(prompted / "best")
    cli("compare", str(runs["student"]), f"prompted={prompted}", "--out", str(tmp_path / "out"), "--no-memory", *QUICK)
    result = json.loads((tmp_path / "out" / "compare.json").read_text())
    recorded = json.loads((runs["alone"] / "test_metrics.json").read_text())
    assert result["quality"]["prompted"]["accuracy"]["value"] == recorded["test_accuracy"]
    costs = result["costs"]["prompted"]
    assert "no best/ model" in costs["not_measured"] and costs.get("latency_ms") is None
    assert costs["parameters_source"] == "run log (end event)"  # from the run's own record
    assert "prompted: costs not measured" in (tmp_path / "out" / "compare.md").read_text()


def test_refuses_an_untested_run(runs, tmp_path, capsys):
    untested = _copy(runs["alone"], tmp_path)
    (untested / "test_looks.jsonl").unlink()
    (untested / "test_metrics.json").unlink()
    assert _compare(str(runs["student"]), str(untested), "--out", str(tmp_path / "o")) == 1
    assert f"{untested}: not tested: run `honelm test {untested}` first" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_refuses_runs_tested_on_another_split(runs, data_dir, tmp_path, capsys):
    cli("classify", f"data.train={data_dir / 'reviews.jsonl'}", "model.size=test", "model.arch=encoder",
        "model.vocab_size=300", "data.seed=7", f"run.out_dir={tmp_path}", "run.name=other", "train.max_steps=2",
        "train.eval_every=2", "data.max_length=48", *FAST)
    cli("test", str(tmp_path / "other"))
    assert _compare(str(runs["student"]), str(tmp_path / "other"), "--out", str(tmp_path / "o")) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'other'}: its test split differs from" in err and "SAME sealed test split" in err


def test_refuses_other_labels_or_other_gold(runs, tmp_path, capsys):
    relabelled = _copy(runs["alone"], tmp_path / "a")
    (relabelled / "labels.json").write_text(json.dumps({"task": "classification",
                                                        "id2label": {"0": "bad", "1": "good"}}))
    assert _compare(str(runs["student"]), str(relabelled), "--out", str(tmp_path / "o")) == 1
    assert "differ from" in capsys.readouterr().err
    shuffled = _copy(runs["alone"], tmp_path / "b")
    rows = read_records(shuffled / "test_predictions.jsonl")
    i = next(k for k, r in enumerate(rows) if r["gold"] == r["pred"])  # stays correct: the accuracy is unchanged
    rows[i]["gold"] = rows[i]["pred"] = 1 - rows[i]["gold"]
    (shuffled / "test_predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _compare(str(runs["student"]), str(shuffled), "--out", str(tmp_path / "o")) == 1
    assert f"{shuffled}: test example {i} has gold" in capsys.readouterr().err


def test_a_lora_run_is_merged_and_sized_as_adapter_plus_base(runs, pretrained, data_dir, tmp_path):
    cli("classify", f"data.train={data_dir / 'reviews.jsonl'}", f"model.init_from={pretrained}", "lora.enabled=true",
        f"run.out_dir={tmp_path}", "run.name=lora", "train.max_steps=4", "train.eval_every=2", "data.max_length=48", *FAST)
    lora = tmp_path / "lora"
    cli("test", str(lora))
    cli("compare", str(runs["teacher"]), str(lora), "--out", str(tmp_path / "out"), "--no-memory", *QUICK)
    costs = json.loads((tmp_path / "out" / "compare.json").read_text())["costs"]["lora"]
    base = json.loads((lora / "best" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert costs["disk"] == {"kind": "adapter", "adapter_bytes": (lora / "best" / "adapter_model.safetensors").stat().st_size,
                             "base": base, "base_bytes": (Path(base) / "model.safetensors").stat().st_size,
                             "bytes": (lora / "best" / "adapter_model.safetensors").stat().st_size +
                             (Path(base) / "model.safetensors").stat().st_size}
    merged = load_model(lora / "best", "classify", num_labels=2)  # what `honelm test` scored: the merged model
    assert costs["parameters"] == count_parameters(merged)[1]
    assert " adapter + " in (tmp_path / "out" / "compare.md").read_text()
