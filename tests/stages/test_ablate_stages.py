"""`honelm ablate` beyond classification, through the real CLI on tiny presets: sft and pretrain on validation loss
(lower is better), reward on pair accuracy, dpo on implicit-reward accuracy; a dpo search. Each cell's verdict numbers
are its best checkpoint's per-example score records, whose Σ sums / Σ units is the stage's own val_* metric; the test
split is read only for the chosen variant, once, and its test records give the test metric `honelm test` reported.
Files that cannot work are refused when read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from honelm.data import splits as splits_mod
from honelm.errors import ConfigError
from honelm.protocol import ablate
from tests.stages.conftest import FAST, cli

COMMON = {"model.size": "test", "model.vocab_size": 600, "train.max_steps": 4, "train.eval_every": 2,
          **{k: v for k, v in (a.split("=") for a in FAST)}}
CHAT = {**COMMON, "data.max_length": 128, "train.batch_size": 8, "samples.n": 0, "samples.test_limit": 4,
        "samples.max_new_tokens": 4}
PAIRS = {**COMMON, "data.max_length": 96, "train.batch_size": 16, "train.lr": 3e-3}


def ablation(tmp_path: Path, verb: str, settings: dict[str, Any], variants: dict[str, Any], **fields: Any) -> Path:
    # search: none — these tests are about what each stage records and compares, not the per-variant search
    # (tests/stages/test_boost_stage.py and test_search_ablate.py cover that)
    spec = {"out_dir": str(tmp_path / "ablation"), "seeds": 1, "bootstrap": 200, "search": "none",
            "stages": [{"name": verb, "verb": verb, "set": settings}], "variants": variants, **fields}
    path = tmp_path / "ablation.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def per_unit(record: dict[str, Any], metric: str) -> float:
    return sum(record["sums"][metric]) / sum(record["units"])


def check_chosen_on_validation_then_tested_once(out: Path, metric: str, lower: bool, looks_before: int) -> dict:
    """The verdicts and the choice come from the cells' validation records; only the chosen cell was tested."""
    results = json.loads((out / "results.json").read_text())
    assert results["metric"] == metric and results["split"] == "validation" and results["complete"]
    rows = {r["variant"]: r for r in results["rows"]}
    for name, row in rows.items():
        cell = json.loads((out / "cells" / name / "seed-0" / "cell.json").read_text())
        assert cell["split"] == "validation" and "gold" not in cell  # score records: units and metric sums
        assert row["values"] == [pytest.approx(per_unit(cell, metric), rel=1e-12)]
        assert per_unit(cell, metric) == pytest.approx(cell["val"][f"val_{metric}"], rel=1e-5, abs=1e-6)
        if name != "baseline":
            assert row["verdict"] in ("helps", "hurts", "no evidence") and row["note"] == ablate.ONE_SEED
            assert row["low"] <= row["diff"] <= row["high"]
    sign = -1 if lower else 1
    best = max(rows.values(), key=lambda r: (sign * r["mean"], r["variant"] == "baseline"))
    assert results["chosen"] == best["variant"] and results["test_role"] == "chosen"
    assert [r["variant"] for r in results["test_rows"]] == [results["chosen"]]
    assert splits_mod.test_access_count() == looks_before + 1  # one look, after the choice
    assert [p.parent.parent.parent.name for p in out.rglob("test_looks.jsonl")] == [results["chosen"]]
    cell_dir = out / "cells" / results["chosen"] / "seed-0"
    tested = json.loads((cell_dir / "test.json").read_text())
    assert per_unit(tested, metric) == pytest.approx(tested["test"][f"test_{metric}"], rel=1e-5, abs=1e-6)
    assert results["test_rows"][0]["mean"] == pytest.approx(per_unit(tested, metric), rel=1e-12)
    report = (out / "report.md").read_text()
    assert f"validation {metric}" in report and "## Test: the chosen variant, tested once" in report
    return results


def test_sft_ablation_on_validation_loss(data_dir, tmp_path):
    path = ablation(tmp_path, "sft", {"data.train": str(data_dir / "instructions.jsonl"), **CHAT},
                    {"fast": {"set": {"train.lr": 3e-3}}})  # metric: empty, so sft's first, loss
    looks = splits_mod.test_access_count()
    cli("ablate", str(path))
    results = check_chosen_on_validation_then_tested_once(tmp_path / "ablation", "loss", True, looks)
    rows = {r["variant"]: r for r in results["rows"]}
    # 4 steps at 3e-3 against 1e-4 from random init: the loss falls much further, and lower loss is "helps"
    assert rows["fast"]["diff"] < 0 and rows["fast"]["verdict"] == "helps" and results["chosen"] == "fast"
    tested = json.loads((tmp_path / "ablation" / "cells" / "fast" / "seed-0" / "test.json").read_text())
    assert {"test_exact_match", "test_chrf"} <= set(tested["test"])  # the answers are scored as `honelm test` does


def test_reward_ablation_on_pair_accuracy_with_adversarial_training(data_dir, tmp_path):
    path = ablation(tmp_path, "reward", {"data.train": str(data_dir / "preferences.jsonl"), **PAIRS},
                    {"fgm": {"set": {"adversarial.method": "fgm"}}}, metric="accuracy")
    looks = splits_mod.test_access_count()
    cli("ablate", str(path))
    check_chosen_on_validation_then_tested_once(tmp_path / "ablation", "accuracy", False, looks)
    cell = json.loads((tmp_path / "ablation" / "cells" / "fgm" / "seed-0" / "cell.json").read_text())
    assert set(cell["units"]) == {1} and {"accuracy", "margin", "loss"} <= set(cell["sums"])  # one unit per pair


def test_dpo_ablation_on_implicit_reward_accuracy(data_dir, tmp_path):
    path = ablation(tmp_path, "dpo", {"data.train": str(data_dir / "preferences.jsonl"), **PAIRS},
                    {"beta": {"set": {"dpo.beta": 0.5}}})  # metric: empty, so dpo's first, rewards_accuracy
    looks = splits_mod.test_access_count()
    cli("ablate", str(path))
    check_chosen_on_validation_then_tested_once(tmp_path / "ablation", "rewards_accuracy", False, looks)


@pytest.mark.slow  # CI runs it in its own step (.ci/run); kept out of the 3-minute default suite
def test_dpo_search_on_validation_then_its_best_trial_tested(data_dir, tmp_path):
    spec = {"verb": "dpo", "set": {"data.train": str(data_dir / "preferences.jsonl"), **PAIRS, "train.max_steps": 2},
            "out_dir": str(tmp_path / "search"), "metric": "val_rewards_margin", "n_trials": 2, "sampler": "random",
            "pruner": "none", "space": {"dpo.beta": [0.1, 0.5]}}
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(spec))
    looks = splits_mod.test_access_count()
    cli("search", str(tmp_path / "search.yaml"))
    out = tmp_path / "search"
    trials = [json.loads(x) for x in (out / "trials.jsonl").read_text().splitlines()]
    assert [t["state"] for t in trials] == ["complete", "complete"] and splits_mod.test_access_count() == looks
    best = json.loads((out / "best.json").read_text())
    assert best["value"] == max(t["value"] for t in trials)  # a margin: higher is better
    cli("test", str(out))
    assert "test_rewards_margin" in json.loads((Path(best["run_dir"]) / "test_metrics.json").read_text())


@pytest.mark.slow  # CI runs it in its own step (.ci/run); kept out of the 3-minute default suite
def test_pretrain_ablation_on_block_loss(data_dir, tmp_path):
    path = ablation(tmp_path, "pretrain", {"data.train": str(data_dir / "corpus.txt"), "data.block_size": 32,
                                           "train.batch_size": 8, **COMMON}, {"fast": {"set": {"train.lr": 3e-3}}})
    looks = splits_mod.test_access_count()
    cli("ablate", str(path))
    check_chosen_on_validation_then_tested_once(tmp_path / "ablation", "loss", True, looks)
    cell = json.loads((tmp_path / "ablation" / "cells" / "baseline" / "seed-0" / "cell.json").read_text())
    assert set(cell["units"][:-1]) == {31}  # a validation block of 32 tokens has 31 targets (the last may be short)


def test_masked_lm_adapt_keeps_per_row_loss_and_accuracy(data_dir, tmp_path):
    cli("adapt", f"data.train={data_dir / 'corpus.txt'}", "model.arch=encoder", "data.block_size=32",
        "train.batch_size=8", f"run.out_dir={tmp_path}", "run.name=m", *[f"{k}={v}" for k, v in COMMON.items()])
    run = tmp_path / "m"
    record = ablate.read_validation(run)
    for metric in ("loss", "accuracy"):
        assert per_unit(record, metric) == pytest.approx(record["val"][f"val_{metric}"], rel=1e-5)
    cli("test", str(run))
    tested = {**ablate.read_test_records(run), "test": json.loads((run / "test_metrics.json").read_text())}
    assert per_unit(tested, "loss") == pytest.approx(tested["test"]["test_loss"], rel=1e-5)


def test_files_a_stage_cannot_serve_are_refused_when_read(data_dir, tmp_path):
    sft = {"data.train": str(data_dir / "instructions.jsonl"), **CHAT}
    with pytest.raises(ConfigError, match=r"metric: 'accuracy' is not one of loss \(the metrics of sft's"):
        ablate.load_spec(ablation(tmp_path, "sft", sft, {}, metric="accuracy"))
    with pytest.raises(ConfigError, match="metric: 'rewards_accuracy' is not one of accuracy, margin, loss"):
        ablate.load_spec(ablation(tmp_path, "reward", {"data.train": "x.jsonl", **PAIRS}, {},
                                  metric="rewards_accuracy"))  # dpo's name
    tapt = {"task.train": str(data_dir / "reviews.jsonl"), "model.arch": "encoder", **COMMON}
    with pytest.raises(ConfigError, match=r"test: chosen, but the compared stage cannot be tested .*no domain corpus"):
        ablate.load_spec(ablation(tmp_path, "adapt", tapt, {}))
    assert ablate.load_spec(ablation(tmp_path, "adapt", tapt, {}, test="none")).metric == "loss"
    assert not (tmp_path / "ablation").exists()  # nothing ran
