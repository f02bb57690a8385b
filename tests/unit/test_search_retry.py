"""A failed search trial keeps its error in the trials table and its parameters are tried again by the next run.

The trials' runs are stood in for (`registry.run_verb` writes the best/best.json a run would), so what is
tested is the search's own bookkeeping: a grid point that failed is not lost (Optuna's grid sampler counts a
failed point as visited) and an unexpected error is recorded before it ends the search.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from honelm import registry
from honelm.cli import main
from honelm.errors import TrainingError
from honelm.protocol import search as S


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    """The end-of-search plots take seconds and are not what is tested here."""
    monkeypatch.setattr(S, "write_plots", lambda study, plots: {})


def fake_runs(fail: dict[int, Exception]) -> Any:
    """A `run_verb` whose call number N (from 0) raises `fail[N]`; any other saves a best value as a run does."""
    calls = iter(range(1_000))

    def run_verb(verb: str, cfg: Any, resume: Any = None, callbacks: Any = ()) -> dict[str, Any]:
        error = fail.get(next(calls))
        if error is not None:
            raise error
        best = Path(cfg.run.out_dir) / cfg.run.name / "best"
        best.mkdir(parents=True)
        (best / "best.json").write_text(json.dumps({"value": cfg.train.batch_size / 100}))
        return {"reason": "max_steps"}

    return run_verb


def search_file(tmp_path: Path) -> Path:
    spec = {"verb": "classify", "set": {"data.train": "reviews.jsonl"}, "out_dir": str(tmp_path / "search"),
            "metric": "val_accuracy", "sampler": "grid", "pruner": "none", "space": {"train.batch_size": [4, 8, 16]}}
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def rows(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (tmp_path / "search" / "trials.jsonl").read_text().splitlines()]


def test_failed_trials_are_recorded_and_their_grid_points_tried_again(tmp_path, monkeypatch, capsys):
    path = search_file(tmp_path)
    # an unexpected error still ends the search (as a bug should) ...
    monkeypatch.setattr(registry, "run_verb", fake_runs({0: RuntimeError("disk hiccup")}))
    with pytest.raises(RuntimeError, match="disk hiccup"):
        main(["search", str(path)])
    (first,) = rows(tmp_path)  # ... with its error recorded
    assert (first["state"], first["error"]) == ("fail", "RuntimeError: disk hiccup")

    # the next run tries that grid point again first; a honelm error fails its trial only: the search goes on
    monkeypatch.setattr(registry, "run_verb", fake_runs({1: TrainingError("loss is nan at step 3")}))
    capsys.readouterr()
    assert main(["search", str(path)]) == 0
    said = capsys.readouterr().out
    assert "0 trial(s) finished, 3 to run, 1 interrupted or failed trial(s) tried again first" in said
    found = rows(tmp_path)
    assert (found[1]["retry_of"], found[1]["state"]) == (0, "complete")
    assert found[1]["params.train.batch_size"] == first["params.train.batch_size"]
    assert [(r["state"], r["error"]) for r in found] == [("fail", "RuntimeError: disk hiccup"), ("complete", None),
                                                         ("fail", "loss is nan at step 3"), ("complete", None)]
    assert "error" in (tmp_path / "search" / "trials.csv").read_text().splitlines()[0].split(",")


def test_the_pruner_judges_a_trial_only_after_its_first_share_of_steps(tmp_path):
    """`prune_after` (default 0.5): every validation is reported to Optuna, but none before that share of the
    trial's planned steps can stop it (early validations rank rates by how fast they start). 0 judges from the
    first validation; 1 or more is refused."""
    from types import SimpleNamespace

    class Trial:
        def __init__(self) -> None:
            self.reported: list[tuple[float, int]] = []
            self.asked = 0

        def report(self, value: float, step: int) -> None:
            self.reported.append((value, step))

        def should_prune(self) -> bool:
            self.asked += 1
            return True

    for after, first_judged in ((0.5, 100), (0.0, 25)):
        trial = Trial()
        pruner = S._Pruner(trial, "val_accuracy", after)
        answers = {step: pruner.after_eval(SimpleNamespace(step=step, total=200), {"val_accuracy": 0.5})
                   for step in (25, 50, 100, 150)}
        assert [s for _, s in trial.reported] == [25, 50, 100, 150]  # every validation reported
        assert [s for s, a in answers.items() if a == "pruned"] == [s for s in answers if s >= first_judged]
    spec = {"verb": "classify", "out_dir": str(tmp_path / "s"), "metric": "val_accuracy",
            "space": {"train.lr": [1e-3, 2e-3]}}
    assert S.spec_from_mapping(spec, tmp_path / "s.yaml").prune_after == 0.5
    assert S.spec_from_mapping({**spec, "prune_after": 0}, tmp_path / "s.yaml").prune_after == 0
    with pytest.raises(Exception, match="prune_after"):
        S.spec_from_mapping({**spec, "prune_after": 1.0}, tmp_path / "s.yaml")
    # the search report's words for it (a marker from before the field says nothing)
    assert S._judged_from({"pruner": "median", "prune_after": 0.5}) == " (from 50% of each trial's steps on)"
    assert S._judged_from({"pruner": "halving", "prune_after": 0}) == " (from the first validation)"
    assert S._judged_from({"pruner": "none", "prune_after": 0.5}) == S._judged_from({"pruner": "median"}) == ""


def test_qmc_sampler_spreads_a_few_trials_over_the_whole_range(tmp_path, recwarn):
    """`sampler: qmc`: after its random first trial, four trials fall one in each quarter of a log-scale learning
    rate range, for every seed (a scrambled Sobol sequence); independent random draws, TPE's first ten trials, may
    fall together, which is what 4-trial ablation searches met. No experimental-API warning reaches the user."""
    import math

    import optuna

    low, high = 3.3e-5, 3.0e-4
    for seed in range(5):
        spec = S.spec_from_mapping({"verb": "classify", "out_dir": str(tmp_path / "s"), "metric": "val_accuracy",
                                    "sampler": "qmc", "seed": seed,
                                    "space": {"train.lr": {"low": low, "high": high, "log": True}}}, tmp_path / "s.yaml")
        study = optuna.create_study(sampler=S.make_sampler(spec))
        study.optimize(lambda t: t.suggest_float("train.lr", low, high, log=True), n_trials=5)
        lrs = [t.params["train.lr"] for t in study.trials]
        quarters = [int(4 * math.log(lr / low) / math.log(high / low)) for lr in lrs[1:]]
        assert sorted(quarters) == [0, 1, 2, 3], (seed, lrs)
    assert not [w for w in recwarn if issubclass(w.category, optuna.exceptions.ExperimentalWarning)]


def test_qmc_without_scipy_is_refused_before_any_trial(tmp_path, monkeypatch):
    """scipy is not a dependency of honelm: `sampler: qmc` without it stops at the file, naming the field and the
    install, not in the middle of the first trial."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "scipy" else real(name, *a))
    with pytest.raises(Exception, match=r"sampler: qmc .*pip install 'honelm\[qmc\]'"):
        S.spec_from_mapping({"verb": "classify", "out_dir": str(tmp_path / "s"), "metric": "val_accuracy",
                             "sampler": "qmc", "space": {"train.lr": {"low": 1e-4, "high": 1e-3, "log": True}}},
                            tmp_path / "s.yaml")
