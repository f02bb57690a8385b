"""The project's test ledger: every `honelm test` look recorded by split hash; a look by another run flagged and counted
in `honelm test`'s output, the run report and `honelm compare`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from honelm.protocol import ledger as L
from tests.stages.conftest import FAST, cli

TINY = ["model.arch=encoder", "model.size=test", "model.vocab_size=400", "data.max_length=32", "train.max_steps=4",
        "train.eval_every=2", "train.batch_size=8", *FAST]


def _train(data_dir: Path, out: Path, name: str, *extra: str) -> Path:
    cli("classify", f"data.train={data_dir / 'reviews.jsonl'}", *TINY, f"run.out_dir={out}", f"run.name={name}", *extra)
    return out / name


def test_where_the_ledger_lives(tmp_path, monkeypatch):
    run = tmp_path / "project" / "runs" / "classify" / "r1"
    run.mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "project")
    assert L.ledger_path(run) == (tmp_path / "project" / ".honelm" / "test_ledger.jsonl").resolve()  # inside the cwd
    monkeypatch.chdir(tmp_path)
    (tmp_path / "project" / "runs" / ".honelm").mkdir()
    assert L.ledger_path(run) == (tmp_path / "project" / "runs" / ".honelm" / "test_ledger.jsonl").resolve()
    elsewhere = tmp_path / "other" / "r2"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "project")  # outside the cwd, no .honelm/ above: beside the run
    assert L.ledger_path(elsewhere) == (tmp_path / "other" / ".honelm" / "test_ledger.jsonl").resolve()
    assert L.ledger_path(elsewhere, "mine.jsonl") == Path("mine.jsonl")


@pytest.mark.slow  # CI runs it in its own step (.ci/run); kept out of the 3-minute default suite
def test_a_second_look_at_a_split_by_another_run_is_flagged_and_counted(data_dir, tmp_path, capsys):
    out = tmp_path / "runs"
    first, second = _train(data_dir, out, "first"), _train(data_dir, out, "second", "run.seed=1")
    other_split = _train(data_dir, out, "other-split", "data.seed=7")
    capsys.readouterr()
    cli("test", str(first))
    assert "warning" not in capsys.readouterr().out  # the split's first look
    cli("test", str(other_split))
    assert "warning" not in capsys.readouterr().out  # another split: its own count
    cli("test", str(second))
    printed = capsys.readouterr().out
    assert "warning: this test split has been looked at 2 times by 2 runs" in printed

    ledger = out / ".honelm" / "test_ledger.jsonl"  # outside the cwd, no .honelm/ above: beside the runs
    rows = [json.loads(line) for line in ledger.read_text().splitlines()]
    assert [Path(r["run_dir"]).name for r in rows] == ["first", "other-split", "second"]
    assert [r["flagged"] for r in rows] == [False, False, True]
    assert rows[0]["test_hash"] == rows[2]["test_hash"] == L.test_hash_of(first) != rows[1]["test_hash"]
    assert rows[2]["metrics"]["test_accuracy"] == json.loads((second / "test_metrics.json").read_text())["test_accuracy"]

    # the run's report shows the count (and who looked); an untested run on that split shows it too
    cli("report", str(first))
    report = (first / "report.md").read_text()
    assert "**This test split has been looked at 2 times by 2 runs**" in report and "`" + str(second.resolve()) in report
    cli("report", str(other_split))
    assert "looked at once by 1 run" in (other_split / "report.md").read_text()

    # compare is legitimate (nothing refused) and says how many looks the split has had
    cli("compare", f"a={first}", f"b={second}", "--out", str(tmp_path / "cmp"), "--no-timing", "--bootstrap", "200")
    assert "test ledger: this test split has been looked at 2 times by 2 runs" in capsys.readouterr().out
    text = (tmp_path / "cmp" / "compare.md").read_text()
    assert "Test ledger: this test split has been looked at 2 times by 2 runs." in text
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["test_split"]["ledger"]["runs"] == 2

    # a forced second look by the same run is one more look, not one more run
    cli("test", str(first), "--force")
    assert "looked at 3 times by 2 runs" in capsys.readouterr().out


def test_a_ledger_above_the_project_is_never_used(tmp_path, monkeypatch):
    (tmp_path / ".honelm").mkdir()  # a stray ledger above the project (say /tmp/.honelm or ~/.honelm)
    run = tmp_path / "project" / "runs" / "classify" / "r1"
    run.mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "project")
    assert L.ledger_path(run) == (tmp_path / "project" / ".honelm" / "test_ledger.jsonl").resolve()
    other = tmp_path / "elsewhere" / "r2"
    other.mkdir(parents=True)
    assert L.ledger_path(other) == (tmp_path / "elsewhere" / ".honelm" / "test_ledger.jsonl").resolve()
