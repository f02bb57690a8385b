"""`honelm search` and `honelm ablate` on tiny classify runs: sealed test split, resume, pruning, reuse."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml

from honelm import config as C
from honelm import runtime as rt
from honelm.data import splits as splits_mod
from honelm.errors import ConfigError, HonelmError, TestSplitAccessError
from honelm.cli import main
from honelm.loop import Callback
from honelm.protocol import search as S
from honelm.stages.classify import ClassifyConfig
from tests.stages.conftest import FAST, cli, events

TINY = {"model.arch": "encoder", "model.size": "test", "model.vocab_size": 400, "data.max_length": 32,
        "train.max_steps": 6, "train.eval_every": 3, "train.batch_size": 8, **{k: v for k, v in (a.split("=") for a in FAST)}}


class AfterEval(Callback):
    """Calls `act(run_dir, step, metrics)` after every validation of every trial."""

    def __init__(self, act) -> None:
        self.act = act

    def after_eval(self, state, metrics):
        return self.act(state.run_dir, state.step, metrics)


def search_file(tmp_path: Path, data_dir: Path, **fields) -> Path:
    fixed = {k: v for k, v in TINY.items() if k != "train.batch_size"}  # searched below
    spec = {"verb": "classify", "set": {"data.train": str(data_dir / "reviews.jsonl"), **fixed},
            "out_dir": str(tmp_path / "search"), "metric": "val_accuracy", "n_trials": 2, "pruner": "none",
            "space": {"train.lr": {"low": 1e-4, "high": 3e-3, "log": True}, "train.batch_size": [8, 16]}, **fields}
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.slow  # CI runs it in its own step (.ci/run); kept out of the 3-minute default suite
def test_search_seals_the_test_split_resumes_and_writes_its_outputs(data_dir, tmp_path):
    path = search_file(tmp_path, data_dir)
    attempts: list[str] = []

    def try_test_split(run_dir, step, metrics):
        try:
            with splits_mod.unlock_test_split("a sneaky look"):
                attempts.append("opened")
        except TestSplitAccessError:
            attempts.append("refused")
        return None

    before = splits_mod.test_access_count()
    best = S.run_search(S.load_spec(path), callbacks=[AfterEval(try_test_split)])
    assert attempts and set(attempts) == {"refused"}  # at every validation of every trial
    assert splits_mod.test_access_count() == before
    out = tmp_path / "search"
    rows = [json.loads(x) for x in (out / "trials.jsonl").read_text().splitlines()]
    assert [r["state"] for r in rows] == ["complete", "complete"]
    header = (out / "trials.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["number", "state", "value"] and "params.train.lr" in header
    assert best["trial"] in (0, 1) and (out / "best").resolve() == Path(best["run_dir"]).resolve()
    assert (out / "best" / "best" / "config.json").is_file()  # the best trial's model is kept ...
    loser = [r for r in rows if r["number"] != best["trial"]][0]
    assert not (Path(loser["run_dir"]) / "best").exists()  # ... the other's is not (keep_models: best)
    # best.yaml is a config the verb takes as is, and it is a fresh run (never the trial's directory)
    cfg = C.build(ClassifyConfig, out / "best.yaml")
    assert cfg.run.name == "" and not cfg.run.overwrite and cfg.train.metric == "val_accuracy"
    assert cfg.train.lr == pytest.approx(best["params"]["train.lr"])

    # resume: the same study continues to 3 finished trials; the first two are not run again
    first_mtime = (Path(rows[0]["run_dir"]) / "metrics.jsonl").stat().st_mtime
    cli("search", str(path), "--n-trials", "3")
    rows = [json.loads(x) for x in (out / "trials.jsonl").read_text().splitlines()]
    assert [r["number"] for r in rows] == [0, 1, 2]
    assert (Path(rows[0]["run_dir"]) / "metrics.jsonl").stat().st_mtime == first_mtime
    study = optuna.load_study(study_name="honelm", storage=f"sqlite:///{out / 'study.db'}")
    assert len(study.trials) == 3

    # a trial left running by a dead process is failed and its parameters tried again first
    study.ask({"train.lr": optuna.distributions.FloatDistribution(1e-4, 3e-3, log=True),
               "train.batch_size": optuna.distributions.CategoricalDistribution([8, 16])})
    cli("search", str(path), "--n-trials", "4")
    rows = [json.loads(x) for x in (out / "trials.jsonl").read_text().splitlines()]
    assert rows[3]["state"] == "fail" and rows[4]["retry_of"] == 3 and rows[4]["state"] == "complete"
    assert rows[4]["params.train.lr"] == rows[3]["params.train.lr"]

    # a changed space is another study: refused, naming the way out
    path.write_text(path.read_text().replace("- 16", "- 32"))
    with pytest.raises(HonelmError, match="different verb, base config"):
        S.run_search(S.load_spec(path))

    # the search's report, and `honelm test SEARCH` tests the best trial once
    cli("report", str(out))
    assert "## Trials" in (out / "report.md").read_text() and (out / "report.html").is_file()
    cli("test", str(out))
    assert (Path(best["run_dir"]) / "test_metrics.json").is_file()


def test_a_pruned_trial_stops_at_its_validation_and_is_recorded(data_dir, tmp_path, monkeypatch):
    path = search_file(tmp_path, data_dir, n_trials=2, pruner="median")
    monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda self: self.number == 1)
    S.run_search(S.load_spec(path))
    rows = [json.loads(x) for x in (tmp_path / "search" / "trials.jsonl").read_text().splitlines()]
    assert [r["state"] for r in rows] == ["complete", "pruned"]
    pruned_run = Path(rows[1]["run_dir"])
    end = events(pruned_run, "end")[-1]
    assert end["reason"] == "pruned" and end["step"] == 3  # stopped at its first validation of two
    assert json.loads((tmp_path / "search" / S.SEARCH_FILE).read_text())["prune_after"] == 0.5  # the report says


@pytest.mark.slow  # CI runs it in its own step (.ci/run); kept out of the 3-minute default suite
def test_a_stop_while_a_trial_saves_its_end_keeps_that_trial_and_starts_no_other(data_dir, tmp_path, monkeypatch,
                                                                                  stop_during_checkpoint):
    stop_during_checkpoint(6)  # the first trial's final checkpoint
    path = search_file(tmp_path, data_dir, n_trials=3)
    assert main(["search", str(path)]) == 130
    rows = [json.loads(x) for x in (tmp_path / "search" / "trials.jsonl").read_text().splitlines()]
    assert [r["state"] for r in rows] == ["complete"]  # the finished trial counts; no second one started
    stop_during_checkpoint.disarm()
    # the earlier stop in this process does not end a search that starts later: it continues the study
    assert not S.run_search(S.load_spec(path)).get("stop_requested")
    rows = [json.loads(x) for x in (tmp_path / "search" / "trials.jsonl").read_text().splitlines()]
    assert [r["state"] for r in rows] == ["complete"] * 3


@pytest.mark.slow  # CI runs it in its own step (.ci/run); kept out of the 3-minute default suite
def test_a_storage_url_keeping_every_model_halving_and_a_timeout(data_dir, tmp_path):
    """--storage URL (what several machines share; no local study.db, no directory lock), keep_models: all,
    the successive-halving pruner, and --timeout (no trial starts after it; the running one finishes)."""
    path = search_file(tmp_path, data_dir, n_trials=2, pruner="halving", keep_models="all")
    assert isinstance(S.make_pruner(S.load_spec(path)), optuna.pruners.SuccessiveHalvingPruner)
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    cli("search", str(path), "--storage", url)
    out = tmp_path / "search"
    assert not (out / "study.db").exists() and len(optuna.load_study(study_name="honelm", storage=url).trials) == 2
    rows = [json.loads(x) for x in (out / "trials.jsonl").read_text().splitlines()]
    assert all((Path(r["run_dir"]) / "best" / "config.json").is_file() for r in rows)  # every trial's model kept
    assert json.loads((out / "search.json").read_text())["storage"] == url
    assert S._shown_url("postgresql://me:secret@db/optuna") == "postgresql://me:***@db/optuna"  # never on disk
    slow = AfterEval(lambda *_: time.sleep(0.6))  # a trial (two validations) now outlasts the timeout
    assert main(["search", str(path), "--storage", url, "--n-trials", "10", "--timeout", "1"], callbacks=[slow]) == 0
    assert len(optuna.load_study(study_name="honelm", storage=url).trials) == 3  # one trial, then the time was up


def test_search_files_are_checked_before_any_trial(data_dir, tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'train.lr'"):
        S.load_spec(search_file(tmp_path, data_dir, space={"train.lrr": [1e-3, 2e-3]}))
    with pytest.raises(ConfigError, match="not a validation metric"):
        S.load_spec(search_file(tmp_path, data_dir, metric="test_accuracy"))
    with pytest.raises(ConfigError, match="grid sampler needs finite values"):
        S.load_spec(search_file(tmp_path, data_dir, sampler="grid"))
    with pytest.raises(ConfigError, match="both searched"):
        S.load_spec(search_file(tmp_path, data_dir, space={"train.max_steps": [4, 6]}))
    grid = S.load_spec(search_file(tmp_path, data_dir, sampler="grid", n_trials=None,
                                   space={"train.batch_size": [8, 16], "lora.r": {"low": 4, "high": 8, "step": 4}}))
    assert grid.n_trials == 4
    assert S.load_spec(search_file(tmp_path, data_dir, n_trials=0)).n_trials == 0  # 0 means none, not the default
    assert S.load_spec(search_file(tmp_path, data_dir, n_trials=None)).n_trials == 10
    assert not (tmp_path / "search").exists()  # nothing ran


def ablation_file(tmp_path: Path, data_dir: Path, seeds=1, **fields) -> Path:
    spec = {"out_dir": str(tmp_path / "ablation"), "seeds": seeds, "metric": "accuracy", "bootstrap": 200,
            "vars": {"data": str(data_dir)},
            "stages": [{"name": "classify", "verb": "classify",
                        "set": {"data.train": "${vars.data}/reviews.jsonl", **TINY}}],
            "variants": {"fgm": {"set": {"adversarial.method": "fgm"}}},
            "search": "none", **fields}  # these tests are about the protocol around the cells: no search
    path = tmp_path / "ablation.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.mark.slow  # CI runs it in its own step (.ci/run); kept out of the 3-minute default suite
def test_ablation_tests_each_cell_once_reuses_finished_cells_and_reports(data_dir, tmp_path, capsys, monkeypatch):
    path = ablation_file(tmp_path, data_dir, seeds=2, test="all")  # every cell tested: a report, not a selection
    monkeypatch.setattr(rt.PROCESS_PEAK, "runs_started", 0)  # as in a fresh `honelm ablate` process
    cli("ablate", str(path))
    out = tmp_path / "ablation"
    results = json.loads((out / "results.json").read_text())
    rows = {r["variant"]: r for r in results["rows"]}
    assert set(rows) == {"baseline", "fgm"} and len(rows["fgm"]["values"]) == 2
    assert rows["fgm"]["verdict"] in ("helps", "hurts", "no evidence")
    assert rows["fgm"]["low"] <= rows["fgm"]["diff"] <= rows["fgm"]["high"]
    assert rows["baseline"]["trainable_params"] > 0 and rows["baseline"]["peak_memory_mb"] > 0
    cells = sorted(out.glob("cells/*/seed-*/cell.json"))
    assert len(cells) == 4
    for cell in cells:  # one look at the test split per cell
        run = Path(json.loads(cell.read_text())["run_dir"])
        assert len((run / "test_looks.jsonl").read_text().splitlines()) == 1
    seeds = {json.loads(c.read_text())["seed"] for c in cells}
    assert seeds == {0, 1}
    # every run stage got its cell's seed
    cfg = C.build(ClassifyConfig, out / "cells" / "fgm" / "seed-1" / "classify" / "config.yaml")
    assert cfg.run.seed == 1 and cfg.adversarial.method == "fgm"
    report = (out / "report.md").read_text()
    assert "| fgm |" in report and "paired bootstrap" in report and (out / "plots" / "ablation.png").is_file()
    assert (out / "report.html").is_file()
    # only the process's first cell has its own peak memory; the others ran after it in the same process
    memory = {(c["variant"], c["seed"]): c["peak_memory_mb"] for c in map(lambda p: json.loads(p.read_text()), cells)}
    assert memory.pop(("baseline", 0)) > 0 and set(memory.values()) == {None}
    assert results["test_role"] == "report" and "## Test: a report, not a selection" in report
    ledger = [json.loads(x) for x in (tmp_path / ".honelm" / "test_ledger.jsonl").read_text().splitlines()]
    assert [r["flagged"] for r in ledger] == [False, True, True, True]  # four runs compared on one test split
    assert "**This test split has been looked at 4 times by 4 runs**" in report

    # run again: every cell is reused, nothing trains or looks at the test split again
    mtimes = [c.stat().st_mtime for c in cells]
    capsys.readouterr()
    cli("ablate", str(path))
    assert capsys.readouterr().out.count("finished earlier, reused") == 4
    assert [c.stat().st_mtime for c in cells] == mtimes

    # a cell finished by an older honelm (a config field it did not have yet, a record hashed over
    # fewer fields) is still reused: the missing field takes its default, which is what that run did
    from honelm.protocol import ablate

    saved = out / "cells" / "fgm" / "seed-0" / "classify" / "config.yaml"
    saved.write_text("\n".join(line for line in saved.read_text().splitlines() if "carry:" not in line) + "\n")
    record_path = out / "cells" / "fgm" / "seed-0" / "cell.json"
    record = json.loads(record_path.read_text())
    tested = json.loads((record_path.parent / "test.json").read_text())
    old = {k: v for k, v in record.items() if k not in ("split", "val", "best_step")}  # an older honelm's record:
    old.update(test=tested["test"], gold=tested["gold"], pred=tested["pred"])  # its test look in cell.json
    record_path.write_text(json.dumps({**old, "identity": "from-an-older-honelm"}))
    (record_path.parent / "test.json").unlink()
    capsys.readouterr()
    ablate.run_ablation(ablate.load_spec(path))
    assert capsys.readouterr().out.count("finished earlier, reused") == 4
    assert json.loads(record_path.read_text())["identity"] == record["identity"]  # the record is brought up to date
    assert json.loads(record_path.read_text())["pred"] == record["pred"]  # validation predictions, read from its run
    assert json.loads((record_path.parent / "test.json").read_text()) == tested  # its one look kept, not taken again
    assert len((Path(record["run_dir"]) / "test_looks.jsonl").read_text().splitlines()) == 1

    # asking for other settings in a finished cell is an error that names it and the key
    path.write_text(path.read_text().replace("adversarial.method: fgm", "adversarial.method: fgm\n      adversarial.epsilon: 0.5"))
    with pytest.raises(HonelmError, match=r"cell fgm/seed-0 finished with other settings .*classify: adversarial\.epsilon"):
        ablate.run_ablation(ablate.load_spec(path))


def test_ablation_verdicts_read_no_test_data_and_only_the_chosen_cells_are_tested(data_dir, tmp_path, monkeypatch):
    from honelm.protocol import ablate, stats

    path = ablation_file(tmp_path, data_dir, seeds=1, test="none")
    real, peeks = stats.paired_bootstrap, []

    def peeking_bootstrap(*args, **kwargs):  # every verdict: could it open the test split? did anything read it?
        try:
            with splits_mod.unlock_test_split("a look while verdicts are computed"):
                peeks.append("opened")
        except TestSplitAccessError:
            peeks.append("refused")
        peeks.append(splits_mod.test_access_count())
        return real(*args, **kwargs)

    monkeypatch.setattr(stats, "paired_bootstrap", peeking_bootstrap)
    reads = splits_mod.test_access_count()
    cli("ablate", str(path))  # test: none: every cell trained, verdicts and choice made, nothing tested
    out = tmp_path / "ablation"
    assert peeks and "opened" not in peeks and set(peeks) - {"refused"} == {reads}
    assert splits_mod.test_access_count() == reads and not list(out.rglob("test_looks.jsonl"))
    first = json.loads((out / "results.json").read_text())
    rows = {r["variant"]: r for r in first["rows"]}
    best = max(rows.values(), key=lambda r: (r["mean"], r["variant"] == "baseline"))  # ties: the baseline, listed first
    assert first["chosen"] == best["variant"] and first["test_rows"] == []
    for r in rows.values():  # the verdict's numbers are the cells' validation predictions
        cell = json.loads((out / "cells" / r["variant"] / "seed-0" / "cell.json").read_text())
        assert cell["split"] == "validation" and r["values"] == [stats.metric_value(
            "accuracy", np.asarray(cell["gold"]), np.asarray(cell["pred"]))]
    assert rows["fgm"]["note"] == ablate.ONE_SEED and "training noise is not in" in (out / "report.md").read_text()

    cli("ablate", str(path), "--test", "chosen")  # the same cells: now the chosen one is tested, once
    after = json.loads((out / "results.json").read_text())
    assert after["rows"] == first["rows"] and after["chosen"] == first["chosen"]  # the test look changed nothing
    assert splits_mod.test_access_count() == reads + 1
    looked = sorted(p.parent.parent.parent.name for p in out.rglob("test_looks.jsonl"))
    assert looked == [first["chosen"]] and after["test_role"] == "chosen"
    assert [r["variant"] for r in after["test_rows"]] == [first["chosen"]]
    report = (out / "report.md").read_text()
    assert "## Test: the chosen variant, tested once" in report and "looked at once by 1 run" in report


def test_variants_trained_in_separate_processes_are_reused_then_compared_and_tested_once(data_dir, tmp_path, capsys):
    """`--variants`: one process per GPU or machine trains some variants on the shared OUT_DIR, tests nothing and
    writes no results; the command without it reuses those cells, trains the rest, compares and tests."""
    path = ablation_file(tmp_path, data_dir)
    out = tmp_path / "ablation"
    cli("ablate", str(path), "--variants", "fgm")
    assert (out / "cells" / "fgm" / "seed-0" / "cell.json").is_file() and not (out / "cells" / "baseline").exists()
    assert not (out / "results.json").exists() and not list(out.glob("cells/*/seed-*/test.json"))
    assert not (tmp_path / ".honelm" / "test_ledger.jsonl").exists()  # no test look was taken
    cli("report", str(out))  # the marker makes it an ablation to report: its cells so far, nothing chosen
    assert "No results yet: run `honelm ablate" in (out / "report.md").read_text()
    assert not list(out.glob(".ablation.json.*"))  # the marker's temporary file was renamed, not left
    capsys.readouterr()
    cli("ablate", str(path))
    assert capsys.readouterr().out.count("finished earlier, reused") == 1  # fgm's cell; the baseline trained now
    results = json.loads((out / "results.json").read_text())
    assert {r["variant"] for r in results["rows"]} == {"baseline", "fgm"} and results["chosen"] in ("baseline", "fgm")
    assert len(list(out.glob("cells/*/seed-*/test.json"))) == 1  # the chosen variant's one cell, tested once
    for wrong in ("lora", ""):
        capsys.readouterr()
        assert main(["ablate", str(path), "--variants", wrong]) != 0
        assert "its variants: baseline, fgm" in capsys.readouterr().err
    capsys.readouterr()
    assert main(["ablate", str(path), "--variants", "fgm", "--test", "all"]) != 0  # it would be ignored: refused
    assert "give --test to the command without --variants" in capsys.readouterr().err


def test_an_unfinished_ablation_reports_the_cells_it_has(data_dir, tmp_path, monkeypatch):
    from honelm.protocol import ablate

    path = ablation_file(tmp_path, data_dir, seeds=2, variants={"fgm": {"set": {"adversarial.method": "fgm"}},
                                                                "r3f": {"set": {"adversarial.method": "r3f"}}})
    real = ablate.run_cell

    def stop_at_r3f(spec, variant, seed, extra):
        if variant.name == "r3f" or (variant.name == "fgm" and seed == 1):
            raise KeyboardInterrupt  # the session ended here
        return real(spec, variant, seed, extra)

    monkeypatch.setattr(ablate, "run_cell", stop_at_r3f)
    with pytest.raises(KeyboardInterrupt):
        ablate.run_ablation(ablate.load_spec(path))
    out = tmp_path / "ablation"
    results = json.loads((out / "results.json").read_text())  # written after every cell
    assert not results["complete"] and (results["cells_done"], results["cells_planned"]) == (3, 6)
    rows = {r["variant"]: r for r in results["rows"]}
    assert set(rows) == {"baseline", "fgm"} and rows["baseline"]["complete"] and not rows["fgm"]["complete"]
    assert rows["fgm"]["seeds"] == [0] and rows["fgm"]["low"] <= rows["fgm"]["diff"] <= rows["fgm"]["high"]
    (out / "results.json").unlink()  # e.g. stopped by a honelm that wrote results only at the end
    cli("report", str(out))
    report = (out / "report.md").read_text()
    assert "**Unfinished:** 3 of 6 cells done" in report and "| fgm (1/2 seeds) |" in report
    assert "r3f" not in report.split("## Results")[1].split("## Cells")[0]


def test_ablation_files_are_checked(data_dir, tmp_path):
    from honelm.protocol import ablate

    with pytest.raises(ConfigError, match="metric"):
        ablate.load_spec(ablation_file(tmp_path, data_dir, metric="bleu"))
    with pytest.raises(ConfigError, match="'nope' is not a variant defined above"):
        ablate.load_spec(ablation_file(tmp_path, data_dir, variants={"fgm": {"set": {"adversarial.method": "fgm"}},
                                                                    "both": {"combine": ["fgm", "nope"]}}))
    with pytest.raises(ConfigError, match="did you mean"):
        ablate.load_spec(ablation_file(tmp_path, data_dir, variants={"x": {"set": {"adversarial.methd": "fgm"}}}))
    with pytest.raises(ConfigError, match="test"):
        ablate.load_spec(ablation_file(tmp_path, data_dir, test="some"))
    (tmp_path / "pretrain-run" / "best").mkdir(parents=True)  # a stage with no per-example validation predictions
    with pytest.raises(HonelmError, match="writes none .*cannot be ablated on validation"):
        ablate.read_validation(tmp_path / "pretrain-run")
    combined = ablate.load_spec(ablation_file(tmp_path, data_dir, variants={
        "fgm": {"set": {"adversarial.method": "fgm"}}, "lora": {"set": {"lora.enabled": True}},
        "lora+fgm": {"combine": ["lora", "fgm"]}}))
    assert [v.name for v in combined.variants] == ["baseline", "fgm", "lora", "lora+fgm"]
    assert combined.variants[-1].settings == {"adversarial.method": "fgm", "lora.enabled": True}


def test_a_shared_before_stage_runs_once_and_every_seed_starts_from_it(data_dir, tmp_path):
    from honelm.pipeline import plan
    from honelm.protocol import ablate

    spec = ablate.load_spec(ablation_file(tmp_path, data_dir, seeds=2, variants={"dapt": {
        "before": [{"name": "dapt", "verb": "adapt", "shared": True,
                    "set": {"data.train": "${vars.data}/corpus.txt", "model.init_from": "x"}}],
        "set": {"model.init_from": "${dapt}"}}}))
    dapt = spec.variants[1]
    shared = ablate.shared_pipeline(spec, dapt)
    assert [s.name for s in shared.stages] == ["dapt"] and shared.stages[0].set["run.seed"] == 0
    for seed in (0, 1):
        cell = ablate.cell_pipeline(spec, dapt, seed)
        assert [s.name for s in cell.stages] == ["classify"]
        built = plan(cell)[-1].config
        assert built.model.init_from == str(tmp_path / "ablation" / "shared" / "dapt" / "dapt")
        assert built.run.seed == seed


@pytest.mark.slow  # 9 s; the default suite checks equal per-variant budgets in test_boost_stage.py's end-to-end test
def test_ablation_with_a_search_gives_every_variant_the_same_budget(data_dir, tmp_path):
    space = {"train.lr": {"low": 1e-4, "high": 3e-3, "log": True}}
    path = ablation_file(tmp_path, data_dir, seeds=1,
                         search={"n_trials": 2, "sampler": "random", "pruner": "none", "space": space})
    cli("ablate", str(path))
    out = tmp_path / "ablation"
    for variant in ("baseline", "fgm"):
        rows = [json.loads(x) for x in (out / "cells" / variant / "search" / "trials.jsonl").read_text().splitlines()]
        assert [r["state"] for r in rows] == ["complete", "complete"]  # the same budget for each variant
        best = json.loads((out / "cells" / variant / "search" / "best.json").read_text())
        cell = json.loads((out / "cells" / variant / "seed-0" / "cell.json").read_text())
        assert cell["settings"] == best["params"]  # the chosen value is what the tested cell trained with
        cfg = C.build(ClassifyConfig, out / "cells" / variant / "seed-0" / "classify" / "config.yaml")
        assert cfg.train.lr == pytest.approx(best["params"]["train.lr"])
    assert "Hyperparameters chosen on validation" in (out / "report.md").read_text()
