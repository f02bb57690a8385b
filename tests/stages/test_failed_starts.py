"""A run that fails before training leaves nothing behind: no directory, `latest` where it was, the name free."""

from __future__ import annotations

import os

import pytest
import yaml

from honelm.cli import main
from tests.stages.conftest import FAST

TINY = ["model.arch=encoder", "model.size=test", "model.vocab_size=300", "data.max_length=32", "train.max_steps=2",
        "train.eval_every=2", "train.batch_size=8", *FAST]


def test_a_failed_start_writes_nothing_and_the_same_name_works_again(data_dir, tmp_path, capsys):
    runs = tmp_path / "runs"
    base = ["classify", f"data.train={data_dir / 'reviews.jsonl'}", f"run.out_dir={runs}", *TINY]
    (runs / "first").mkdir(parents=True)  # an earlier run that `latest` names
    os.symlink("first", runs / "latest")
    # fails after the run directory, its log and the tokenizer were written: the model cannot take the config
    assert main([*base, "run.name=again", "data.max_length=2"]) == 1
    err = capsys.readouterr().err
    assert "data.max_length=2: leaves no room for the text" in err and "Traceback" not in err
    assert not (runs / "again").exists()
    assert os.readlink(runs / "latest") == "first"  # still the run that has a model
    assert main([*base, "run.name=again"]) == 0  # no run.overwrite needed
    assert os.readlink(runs / "latest") == "again" and (runs / "again" / "best").is_dir()


def test_a_run_failing_on_bad_data_leaves_no_directory_and_no_latest(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": "a"}\n{"text": "", "label": "b"}\n{"label": "a"}\n')
    runs = tmp_path / "runs"
    assert main(["classify", f"data.train={bad}", f"run.out_dir={runs}", "run.name=x", *TINY]) == 1
    assert "2 bad rows" in capsys.readouterr().err
    assert not any(runs.iterdir())  # neither the run directory nor a `latest` link to it


def _runs_with_latest(tmp_path):
    runs = tmp_path / "runs"
    (runs / "first").mkdir(parents=True)  # an earlier run that `latest` names
    os.symlink("first", runs / "latest")
    return runs


@pytest.mark.parametrize("verb, wrong, message", [
    ("classify", "data.train={missing}", "no such file or directory"),
    ("classify", "train.lrr=1", "unknown config key 'train.lrr'; did you mean 'train.lr'?"),
    ("tokenizer", "data.train={missing}", "no such file or directory"),
    ("tokenizer", "tokenizer.vocab_sise=300", "did you mean 'tokenizer.vocab_size'?"),
])
def test_a_missing_file_or_a_bad_key_leaves_no_run_directory_and_keeps_latest(data_dir, tmp_path, capsys, verb,
                                                                               wrong, message):
    runs = _runs_with_latest(tmp_path)
    base = [f"data.train={data_dir / 'reviews.jsonl'}", *TINY] if verb == "classify" else []
    setting = wrong.format(missing=tmp_path / "missing.jsonl")
    assert main([verb, *base, setting, f"run.out_dir={runs}", "run.name=x"]) == 1
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in runs.iterdir()) == ["first", "latest"] and os.readlink(runs / "latest") == "first"


def test_a_pipeline_stage_that_fails_to_start_leaves_no_run_directory_and_keeps_latest(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"line {i} of a small corpus, words {i % 7} and {i % 5}" for i in range(60)) + "\n")
    out = tmp_path / "runs"
    stages = [{"name": "tok", "verb": "tokenizer", "set": {"data.train": str(corpus), "tokenizer.vocab_size": 300}},
              {"name": "pre", "verb": "pretrain",
               "set": {"data.train": str(tmp_path / "missing.txt"), "model.tokenizer": "${tok}", "model.size": "test"}}]
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"out_dir": str(out), "stages": stages}))
    assert main(["pipeline", str(path)]) == 1
    assert "missing.txt: no such file or directory" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["latest", "tok"]  # no pre/
    assert os.readlink(out / "latest") == "tok"
    stages[1]["set"]["train.lrr"] = 1  # a bad key: refused before any stage runs, nothing touched
    path.write_text(yaml.safe_dump({"out_dir": str(out), "stages": stages}))
    assert main(["pipeline", str(path)]) == 1
    assert "unknown config key 'train.lrr'" in capsys.readouterr().err
    assert not (out / "pre").exists() and os.readlink(out / "latest") == "tok"
