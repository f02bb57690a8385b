"""`honelm boost` end to end on a tiny task, and the ablation's per-variant searches it is built on: each variant's
own space, the same trials and steps for all, `search: none` said in words, a time budget's unrun variants listed."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from honelm import config as C
from honelm.cli import main
from honelm.protocol import ablate
from honelm.protocol.boost import BoostConfig
from honelm.stages.classify import ClassifyConfig
from tests.stages.conftest import FAST, cli, events

TINY = {"model.arch": "encoder", "model.size": "test", "model.vocab_size": 400, "data.max_length": 32,
        "train.eval_every": 3, "train.batch_size": 8, "train.lr": 1e-3, **dict(a.split("=") for a in FAST)}


def boost_args(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["boost", f"out_dir={out}", f"set.data.train={data_dir / 'reviews.jsonl'}",
            *[f"set.{k}={v}" for k, v in TINY.items()], "steps=6", "n_trials=2", "search.sampler=random", *extra]


def trials(search_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (search_dir / "trials.jsonl").read_text().splitlines()]


def test_boost_help_documents_every_field(capsys):
    with pytest.raises(SystemExit):
        main(["boost", "--help"])
    out = capsys.readouterr().out
    docs = C.field_docs(BoostConfig)
    for f in dataclasses.fields(BoostConfig):
        assert f"  {f.name}: " in out, f.name
        assert docs[f.name].split()[0] in out, f.name


def test_boost_tries_each_method_with_its_own_search_tests_the_winner_once_and_resumes(data_dir, tmp_path, capsys):
    out = tmp_path / "boost"
    cli(*boost_args(data_dir, out, "methods=lora,fgm,tapt,dapt,distill"))
    generated = yaml.safe_load((out / "ablation.yaml").read_text())
    assert list(generated["variants"]) == ["lora", "fgm"] and generated["test"] == "chosen"
    marker = json.loads((out / "boost.json").read_text())
    assert set(marker["not_tried"]) == {"tapt", "dapt", "distill"}  # random init, no domain text, no teacher
    # every variant searched its own space with the same trials and steps
    spaces = {v: json.loads((out / "cells" / v / "space.json").read_text()) for v in ("baseline", "lora", "fgm")}
    searched = {v: spaces[v]["space"] for v in spaces}
    assert searched["baseline"] == {"train.lr": "0.0003333 … 0.003 (log)"}  # the default: the config's lr ×/÷ 3
    assert searched["lora"] == {"train.lr": "0.0003333 … 0.03 (log)"}  # widened up to an order of magnitude higher
    assert searched["fgm"] == {**searched["baseline"], "adversarial.epsilon": "0.003 … 0.3 (log)"}
    assert spaces["fgm"]["fixed"] == {"adversarial.relative": True} and spaces["lora"]["fixed"] == {}
    for variant in spaces:
        rows = trials(out / "cells" / variant / "search")
        assert [r["state"] for r in rows] == ["complete", "complete"]
        assert {events(Path(r["run_dir"]), "end")[-1]["step"] for r in rows} == {6}
    cfg = C.build(ClassifyConfig, out / "cells" / "fgm" / "seed-0" / "classify" / "config.yaml")
    assert cfg.adversarial.relative and cfg.train.max_steps == 6
    assert "relative sizes ×" in (out / "cells" / "fgm" / "seed-0" / "classify" / "log.txt").read_text()
    # chosen on validation, tested once: one look in the ledger, from the chosen variant's cell
    results = json.loads((out / "results.json").read_text())
    chosen = results["chosen"]
    assert chosen in ("baseline", "lora", "fgm") and [r["variant"] for r in results["test_rows"]] == [chosen]
    ledger = (tmp_path / ".honelm" / "test_ledger.jsonl").read_text().splitlines()
    assert len(ledger) == 1 and [p.parent.parent.parent.name for p in out.rglob("test_looks.jsonl")] == [chosen]
    report = (out / "report.md").read_text()
    assert report.startswith("# Boost report") and "## Winner" in report and "read once, after the choice" in report
    assert "## What was tried, and what each cost" in report and "**dapt**: no domain text given" in report
    assert "each variant's own search" in report and "`adversarial.relative=yes`" in report
    assert (out / "report.html").is_file()

    # the same command again: every trial, cell and test look is reused; nothing trains or looks again
    stamps = sorted((p, p.stat().st_mtime) for p in out.rglob("cell.json"))
    capsys.readouterr()
    cli(*boost_args(data_dir, out, "methods=lora,fgm,tapt,dapt,distill"))
    assert capsys.readouterr().out.count("finished earlier, reused") == 3
    assert sorted((p, p.stat().st_mtime) for p in out.rglob("cell.json")) == stamps
    assert all(len(trials(out / "cells" / v / "search")) == 2 for v in spaces)
    assert len((tmp_path / ".honelm" / "test_ledger.jsonl").read_text().splitlines()) == 1
    cli("report", str(out))  # `honelm report` knows a boost directory
    assert (out / "report.md").read_text().startswith("# Boost report")


def ablation_file(tmp_path: Path, data_dir: Path, **fields) -> Path:
    spec = {"out_dir": str(tmp_path / "ablation"), "seeds": 1, "bootstrap": 200, "test": "none",
            "stages": [{"name": "classify", "verb": "classify",
                        "set": {"data.train": str(data_dir / "reviews.jsonl"), "train.max_steps": 6, **TINY}}],
            "variants": {"lora": {"set": {"lora.enabled": True}}}, **fields}
    path = tmp_path / "ablation.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_an_ablation_without_a_search_says_so_in_words(data_dir, tmp_path):
    cli("ablate", str(ablation_file(tmp_path, data_dir, search="none")))
    out = tmp_path / "ablation"
    report = (out / "report.md").read_text()
    assert "**no hyperparameter search** (`search: none`, as the file asks)" in report and "untuned" in report
    assert not list(out.glob("cells/*/search")) and not list(out.glob("cells/*/space.json"))
    assert ablate.load_spec(ablation_file(tmp_path, data_dir)).search == {}  # absent: each variant's own search


@pytest.mark.slow  # CI runs it in its own step (.ci/run); kept out of the 3-minute default suite
def test_a_time_budget_lists_the_variants_it_left_unrun_and_a_second_run_continues_them(data_dir, tmp_path, capsys):
    path = ablation_file(tmp_path, data_dir, search={"n_trials": 2, "pruner": "none"}, time_budget=0.001)
    cli("ablate", str(path))  # the baseline's share lets one trial start; nothing is left for lora's turn
    out = tmp_path / "ablation"
    results = json.loads((out / "results.json").read_text())
    assert list(results["skipped"]) == ["lora"] and "time budget was spent" in results["skipped"]["lora"]
    assert results["chosen"] == "baseline" and results["complete"]  # chosen among what ran
    assert len(trials(out / "cells" / "baseline" / "search")) == 1
    report = (out / "report.md").read_text()
    assert "**Not compared** (no cells): lora: not run: the time budget was spent" in report
    assert "1 of 2" in report  # the baseline's search, cut short by its share, says so
    path.write_text(path.read_text().replace("time_budget: 0.001", "time_budget: 0"))
    cli("ablate", str(path))  # no budget: lora runs now; the baseline keeps the values its cell trained with
    results = json.loads((out / "results.json").read_text())
    assert results["skipped"] == {} and {r["variant"] for r in results["rows"]} == {"baseline", "lora"}
    assert len(trials(out / "cells" / "baseline" / "search")) == 1
    assert len(trials(out / "cells" / "lora" / "search")) == 2


@pytest.mark.slow
def test_boost_with_every_kind_of_method(data_dir, pretrained, tmp_path):
    """TAPT and DAPT from a pre-trained decoder, plae and distillation from a teacher run, each with its search."""
    teacher = tmp_path / "runs" / "teacher"
    cli("classify", f"data.train={data_dir / 'reviews.jsonl'}", f"model.init_from={pretrained}", "data.max_length=32",
        "train.max_steps=12", "train.eval_every=6", "train.batch_size=8", f"run.out_dir={teacher.parent}",
        "run.name=teacher", *FAST)
    out = tmp_path / "boost"
    settings = [f"set.data.train={data_dir / 'reviews.jsonl'}", f"set.model.init_from={pretrained}",
                "set.data.max_length=32", "set.train.eval_every=3", "set.train.batch_size=8",
                *[f"set.{a}" for a in FAST]]
    cli("boost", f"out_dir={out}", *settings, "steps=6", "adapt_steps=4", "n_trials=2", "search.sampler=random",
        "methods=tapt,dapt,lora,freelb,plae,distill", f"domain_text={data_dir / 'corpus.txt'}", f"teacher={teacher}")
    results = json.loads((out / "results.json").read_text())
    assert {r["variant"] for r in results["rows"]} == {"baseline", "tapt", "dapt", "lora", "freelb", "plae", "distill"}
    assert json.loads((out / "boost.json").read_text())["not_tried"] == {}
    for variant in ("tapt", "dapt"):  # adapted once (shared), then the classifier from it
        assert (out / "shared" / variant / variant / "best").is_dir()
        cfg = C.build(ClassifyConfig, out / "cells" / variant / "seed-0" / "classify" / "config.yaml")
        assert cfg.model.init_from == str(out / "shared" / variant / variant)
    dapt = json.loads((out / "shared" / "dapt" / "dapt" / "adapt_corpus.json").read_text())
    assert dapt["mode"] == "dapt" and "task_train" not in dapt["sources"]  # the task only guards the domain text
    assert dapt["leak_guard"]["covers"] == ["val", "test"]
    distilled = yaml.safe_load((out / "cells" / "distill" / "seed-0" / "classify" / "config.yaml").read_text())
    assert distilled["teacher"]["model"] == str(teacher)
    plae = json.loads((out / "cells" / "plae" / "space.json").read_text())
    assert plae["space"]["adversarial.epsilon"] == "0.002 … 0.1 (log)"
    freelb = json.loads((out / "cells" / "freelb" / "space.json").read_text())
    assert "adversarial.step_size" in freelb["space"]
    assert len(results["test_rows"]) == 1 and "## Winner" in (out / "report.md").read_text()
