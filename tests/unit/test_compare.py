"""The line of `honelm compare` a person acts on, from numbers worked by hand; how runs are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from honelm.errors import HonelmError
from honelm.protocol.compare import Side, name_runs, summary_line


def test_the_issue_example():
    # 0.881 / 0.9 = 97.89%; 2.9M / 34.8M = 1/12; 940 / 100 = 9.4
    line = summary_line(Side("student", 0.881, 2_900_000, 940.0), Side("teacher", 0.9, 34_800_000, 100.0), "accuracy")
    assert line == ("student keeps 97.9% of teacher's accuracy (loses 1.9 points) at 1/12 of its parameters "
                    "and 9.4× its CPU throughput.")


def test_a_better_larger_slower_model():
    # 0.92 / 0.8 = 115%; 3M / 1M = 3.0x; 50 / 125 = 1/2.5
    line = summary_line(Side("big", 0.92, 3_000_000, 50.0), Side("small", 0.8, 1_000_000, 125.0), "macro_f1", "GPU")
    assert line == ("big reaches 115.0% of small's macro-F1 (gains 12.0 points) at 3.0× its parameters "
                    "and 1/2.5 of its GPU throughput.")


def test_equal_sizes_and_unknown_costs():
    line = summary_line(Side("b", 0.5, 1000, None), Side("a", 0.5, 1010), "accuracy")
    assert line == "b matches a's accuracy at as many parameters (1.0×)."
    line = summary_line(Side("b", 0.5, 1000, 103.0), Side("a", 0.5, 1010, 100.0), "accuracy")
    assert line == "b matches a's accuracy at as many parameters (1.0×) and the same CPU throughput (1.0×)."
    assert summary_line(Side("b", 0.4), Side("a", 0.5), "accuracy") == "b keeps 80.0% of a's accuracy (loses 10.0 points)."


def test_regression_metrics():
    # MSE: lower is better; 0.3 - 0.2 = 0.1 worse, 0.3 / 0.2 = 1.5x
    assert summary_line(Side("s", 0.3), Side("t", 0.2), "mse") == "s loses to t's MSE by 0.1 (1.50× it)."
    assert summary_line(Side("s", 0.1), Side("t", 0.2), "mse") == "s beats t's MSE by 0.1 (0.50× it)."
    # a share of a negative correlation means nothing: the difference alone
    assert summary_line(Side("s", 0.1), Side("t", -0.2), "pearson") == "s gains 0.3 of Pearson r against t."
    assert summary_line(Side("s", 0.45), Side("t", 0.5), "pearson") == "s keeps 90.0% of t's Pearson r (loses 0.05)."


def test_runs_are_named_by_directory_or_explicitly(tmp_path):
    for path in ("x/run", "y/run", "z/solo"):
        (tmp_path / path).mkdir(parents=True)
    named = name_runs([f"teacher={tmp_path / 'z/solo'}", str(tmp_path / "x/run"), str(tmp_path / "y/run")])
    assert [n for n, _ in named] == ["teacher", "x/run", "y/run"]
    assert named[0][1] == tmp_path / "z/solo"
    with pytest.raises(HonelmError, match="NAME=RUN"):
        name_runs([f"a={tmp_path / 'x/run'}", f"a={tmp_path / 'y/run'}"])
    assert name_runs([str(Path("relative/solo"))]) == [("solo", Path("relative/solo"))]
