"""`--dry-run` (honelm.preflight): every input exists (or an earlier pipeline stage makes it) and every output can be
written; every problem is reported at once with its stage and field, and nothing is created."""

from __future__ import annotations

import os
import re

import pytest
import yaml

from honelm.cli import main


def _files(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text\nmore text\n")
    reviews = tmp_path / "reviews.jsonl"
    reviews.write_text('{"text": "good", "label": "pos"}\n')
    return corpus, reviews


def test_a_verb_dry_run_reports_every_missing_input_and_unwritable_output(tmp_path, capsys):
    _, reviews = _files(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    args = ["classify", "--dry-run", f"data.train={reviews},{tmp_path / 'more.jsonl'}", f"data.test={tmp_path / 'test.jsonl'}",
            f"model.init_from={tmp_path / 'runs' / 'pretrain'}", f"run.out_dir={blocker / 'runs'}"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "--dry-run found 4 problem(s)" in err
    assert f"data.train: {tmp_path / 'more.jsonl'}: no such file or directory" in err
    assert f"data.test: {tmp_path / 'test.jsonl'}: no such file or directory" in err
    assert f"model.init_from: {tmp_path / 'runs' / 'pretrain'}: no such directory" in err
    assert f"run.out_dir: {blocker} is a file, not a directory" in err
    assert main(["classify", "--dry-run", f"data.train={reviews}", f"run.out_dir={tmp_path / 'runs'}",
                 "data.val=hf:imdb@test"]) == 0  # a hub dataset needs the network: not checked
    assert "every input exists" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "corpus.txt", "reviews.jsonl"]  # nothing made


def test_a_pipeline_dry_run_allows_what_an_earlier_stage_makes_and_names_stage_and_field(tmp_path, capsys):
    corpus, reviews = _files(tmp_path)
    out = tmp_path / "runs"
    stages = [{"name": "tok", "verb": "tokenizer", "set": {"data.train": str(corpus)}},
              {"name": "pre", "verb": "pretrain", "set": {"data.train": str(tmp_path / "missing.txt"),
                                                          "model.tokenizer": "${tok}"}},
              {"name": "data", "verb": "demo", "args": ["--data-only", "--out", "${out_dir}/made"],
               "output": "${out_dir}/made"},
              {"name": "cls", "verb": "classify", "set": {"data.train": "${data}/reviews.jsonl",
                                                          "data.test": str(tmp_path / "test.jsonl"),
                                                          "model.init_from": "${pre}"}}]
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"out_dir": str(out), "stages": stages}, sort_keys=False))
    assert main(["pipeline", str(path), "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert "--dry-run found 2 problem(s)" in err  # not model.tokenizer, model.init_from or ${data}: made earlier
    assert re.search(rf"p.yaml:\d+: stage 'pre' \(pretrain\): data.train: {tmp_path / 'missing.txt'}: no such file", err)
    assert f"stage 'cls' (classify): data.test: {tmp_path / 'test.jsonl'}: no such file" in err
    assert not out.exists()
    stages[1]["set"]["data.train"] = str(corpus)
    stages[3]["set"]["data.test"] = str(reviews)
    path.write_text(yaml.safe_dump({"out_dir": str(out), "stages": stages}, sort_keys=False))
    assert main(["pipeline", str(path), "--dry-run"]) == 0
    assert "every input exists (or an earlier stage makes it)" in capsys.readouterr().out and not out.exists()


def test_an_output_directory_that_cannot_be_written_is_reported(tmp_path, capsys):
    _, reviews = _files(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("this user writes anywhere (root): no directory is unwritable")
        assert main(["classify", "--dry-run", f"data.train={reviews}", f"run.out_dir={locked / 'runs'}"]) == 1
        assert f"run.out_dir: {locked} is not writable (to create {locked / 'runs'})" in capsys.readouterr().err
    finally:
        os.chmod(locked, 0o700)
