"""Only `honelm test` reads the test split: training, validation and model selection never touch it."""

from __future__ import annotations

import builtins
import io
import json
import sys

import pytest

from honelm.data import splits as splits_mod
from honelm.errors import TestSplitAccessError
from tests.stages.conftest import FAST, cli


@pytest.fixture
def opened(monkeypatch):
    """Record every file opened in this process, with the function that opened it."""
    paths: list[tuple[str, str]] = []
    real_open, real_io_open = builtins.open, io.open

    def spy(file, *args, **kwargs):
        paths.append((str(file), sys._getframe(1).f_code.co_name))
        return real_open(file, *args, **kwargs)

    def spy_io(file, *args, **kwargs):
        paths.append((str(file), sys._getframe(1).f_code.co_name))
        return real_io_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    monkeypatch.setattr(io, "open", spy_io)
    return paths


def test_training_never_reads_the_test_split(data_dir, tmp_path, opened):
    rows = (data_dir / "reviews.jsonl").read_text().splitlines()
    train, test = tmp_path / "train.jsonl", tmp_path / "held_out_test.jsonl"
    train.write_text("\n".join(rows[:300]) + "\n")
    test.write_text("\n".join(rows[300:] + rows[:1]) + "\n")  # one planted duplicate of a training row
    opened.clear()  # only what honelm opens from here on counts
    before = splits_mod.test_access_count()
    args = [f"data.train={train}", "model.arch=encoder", "model.size=test", "model.vocab_size=400",
            "train.max_steps=6", "train.eval_every=3", "data.max_length=32", *FAST]
    # 1) a user-supplied test file is never parsed by classify: only its bytes are hashed for the
    #    manifest (so `honelm test` can tell if the file changed since training)
    cli("classify", *args, f"data.test={test}", f"run.out_dir={tmp_path}", "run.name=file")
    readers = {fn for p, fn in opened if p.endswith("held_out_test.jsonl")}
    assert readers <= {"_one_file_sha256"}, readers  # the hashing function of honelm.data.splits, nothing else
    # 2) a ratio-split test share is never materialised outside `honelm test`
    cli("classify", *args, "data.split=6:2:2", f"run.out_dir={tmp_path}", "run.name=ratio")
    assert splits_mod.test_access_count() == before
    # 3) `honelm test` does read it, exactly once per look
    cli("test", str(tmp_path / "file"))
    assert {fn for p, fn in opened if p.endswith("held_out_test.jsonl")} - {"_one_file_sha256"}
    cli("test", str(tmp_path / "ratio"))
    assert splits_mod.test_access_count() == before + 2
    metrics = json.loads((tmp_path / "ratio" / "test_metrics.json").read_text())
    assert metrics["n_examples"] == 60
    # duplicates between test and train/val are reported with the test metrics
    assert set(metrics["test_duplicates_of_train_or_val"]) == {"exact", "near"}
    leak = json.loads((tmp_path / "file" / "test_metrics.json").read_text())["test_duplicates_of_train_or_val"]
    assert leak["exact"] >= 1  # the planted row (found at test time: training never opened the file)


def test_the_lock_raises_outside_honelm_test(data_dir):
    from honelm.data.readers import read_examples
    from honelm.data.splits import make_splits

    s = make_splits(read_examples(data_dir / "reviews.jsonl"), ratios="8:1:1")
    with pytest.raises(TestSplitAccessError):
        _ = s.test


def test_honelm_test_takes_the_recorded_split_and_still_refuses_changed_data(data_dir, tmp_path, capsys):
    """`honelm test` takes the split from split_manifest.json when the data is the run's, and computes it (and is
    refused by the seal) when a row changed since training."""
    from honelm.errors import HonelmError
    from honelm.protocol.test import run_test

    rows = (data_dir / "reviews.jsonl").read_text().splitlines()[:200]
    data = tmp_path / "reviews.jsonl"
    data.write_text("\n".join(rows) + "\n")
    cli("classify", f"data.train={data}", "model.arch=encoder", "model.size=test", "model.vocab_size=400",
        "train.max_steps=2", "train.eval_every=0", "data.max_length=32", *FAST, f"run.out_dir={tmp_path}",
        "run.name=r")
    capsys.readouterr()
    cli("test", str(tmp_path / "r"))
    assert "split: taken from split_manifest.json" in capsys.readouterr().err
    edited = json.loads(rows[0])
    edited["text"] += " (edited after training)"
    data.write_text("\n".join([json.dumps(edited), *rows[1:]]) + "\n")
    with pytest.raises(HonelmError, match="rebuilt splits differ from the recorded"):
        run_test(tmp_path / "r", force=True)
