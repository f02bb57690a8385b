"""A run that fails before training leaves nothing behind: no directory, `latest` where it was, the name free."""

from __future__ import annotations

import os

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
