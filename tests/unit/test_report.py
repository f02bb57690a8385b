"""Tests for honelm.protocol.report: report.md contents, valid PNG plots, determinism, sparse runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from honelm.protocol.report import find_overfit, series, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
T0 = 1_700_000_000.0


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _full_run(root: Path) -> Path:
    run = root / "run-abc"
    run.mkdir()
    config = {"run": {"name": "run-abc", "stage": "sft", "seed": 3}, "train": {"lr": 3e-4, "max_steps": 400}}
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")

    events: list[dict] = [{"event": "info", "step": 0, "message": "precision: bf16 autocast", "time": T0}]
    # Train loss falls all the way; val_loss falls to a minimum at step 200 then rises by far more than 2%.
    val = {100: 2.4, 200: 2.0, 300: 2.2, 400: 2.5}
    for step in range(10, 401, 10):
        events.append(
            {"event": "train", "step": step, "epoch": step / 100, "loss": 3.0 - step / 200,
             "lr": 3e-4 * min(1.0, step / 50), "grad_norm": 1.0, "tokens_per_s": 5000.0, "time": T0 + step}
        )
        if step in val:
            events.append(
                {"event": "eval", "step": step, "split": "val", "val_loss": val[step],
                 "val_accuracy": 0.5 + step / 1000, "val_ppl": 2.718 ** val[step], "time": T0 + step}
            )
            if step == 200 or step == 100:
                events.append(
                    {"event": "best", "step": step, "metric": "val_loss", "value": val[step], "time": T0 + step}
                )
    events.append({"event": "checkpoint", "step": 400, "path": "checkpoints/step-00000400", "time": T0 + 401})
    events.append(
        {"event": "end", "step": 400, "reason": "max_steps", "best_step": 200, "best_metric": "val_loss",
         "best_value": 2.0, "train_time_s": 4321.5, "time": T0 + 402}
    )
    _write_jsonl(run / "metrics.jsonl", events)

    manifest = {
        "counts": {"train": 8123, "val": 977, "test": 1011},
        "label_histogram": {"train": {"pos": 4000, "neg": 4123}, "val": {"pos": 480, "neg": 497},
                            "test": {"pos": 500, "neg": 511}},
        "duplicates": {"exact": {"count": 7, "pairs": [["train:1", "test:4"]]},
                       "near": {"count": 13, "threshold": 0.9, "pairs": []}},
        "dedup": {"enabled": True, "removed_from_train": 5},
        "seed": 13,
        "ratios": [0.8, 0.1, 0.1],
        "some_future_key": {"ignored": True},
    }
    (run / "split_manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    (run / "test_metrics.json").write_text(json.dumps({"test_accuracy": 0.8765, "test_loss": 1.2345}), encoding="utf-8")
    _write_jsonl(
        run / "test_looks.jsonl",
        [{"time": T0 + 500, "forced": False, "metrics": {"test_accuracy": 0.8765}},
         {"time": T0 + 900, "forced": True, "metrics": {"test_accuracy": 0.8801}}],
    )
    return run


def _assert_valid_png(path: Path) -> None:
    assert path.is_file(), path
    raw = path.read_bytes()
    assert raw[:8] == PNG_SIGNATURE
    assert len(raw) > 1024
    from PIL import Image

    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.size[0] > 300 and img.size[1] > 200


def test_full_report(tmp_path: Path) -> None:
    run = _full_run(tmp_path)
    report_path = write_report(run)
    assert report_path == run / "report.md"
    text = report_path.read_text(encoding="utf-8")

    assert "run-abc" in text and "sft" in text
    # Summary: best step and value, end reason, train time, final train loss (3.0 - 400/200 = 1).
    assert "| Best step | 200 |" in text
    assert "2 (val_loss" in text
    assert "max_steps" in text
    assert "4321.5 s" in text
    assert "| Final train loss | 1 (step 400) |" in text
    # Plots embedded with relative paths.
    assert "](plots/loss.png)" in text and "](plots/lr.png)" in text and "](plots/val_metrics.png)" in text
    # Overfitting: min val_loss at step 200, later 2.5 (+25%) while train kept falling.
    assert "Overfitting starts at step 200" in text
    # Split manifest: counts, label histogram, duplicates, dedup.
    for needle in ("8123", "977", "1011", "| pos |", "4123", "| exact | 7 |", "| near | 13 |", "removed from train: 5"):
        assert needle in text, needle
    # Test metrics and looks (two looks: flagged).
    assert "0.8765" in text and "test_accuracy" in text
    assert "looked at 2 times" in text
    assert "not evaluated yet" not in text
    # Config as fenced YAML.
    assert "```yaml\nrun:\n  name: run-abc" in text
    assert "max_steps: 400" in text

    for name in ("loss.png", "lr.png", "val_metrics.png"):
        _assert_valid_png(run / "plots" / name)
    import matplotlib.image

    assert matplotlib.image.imread(run / "plots" / "loss.png").ndim == 3


def test_report_is_deterministic(tmp_path: Path) -> None:
    run = _full_run(tmp_path)
    first = write_report(run).read_bytes()
    second = write_report(run).read_bytes()
    assert first == second


def test_train_only_run(tmp_path: Path) -> None:
    run = tmp_path / "tiny"
    run.mkdir()
    _write_jsonl(run / "metrics.jsonl", [{"event": "train", "step": 1, "loss": 5.5, "lr": 1e-3, "time": T0}])
    text = write_report(run).read_text(encoding="utf-8")
    assert "| Best step | — |" in text
    assert "# Run report: tiny" in text
    assert "no end event" in text
    assert "Test split not evaluated yet — run `honelm test" in text
    assert "No `split_manifest.json`" in text
    assert "No `config.yaml`" in text
    assert "Not enough eval points" in text
    _assert_valid_png(run / "plots" / "loss.png")
    _assert_valid_png(run / "plots" / "lr.png")
    assert not (run / "plots" / "val_metrics.png").exists()
    assert "val_metrics.png" not in text


def test_stale_val_plot_removed_and_torn_line_tolerated(tmp_path: Path) -> None:
    run = _full_run(tmp_path)
    write_report(run)
    assert (run / "plots" / "val_metrics.png").exists()
    # Rewrite the run with no eval events and a torn final line (as from a killed process).
    rows = [{"event": "train", "step": s, "loss": 3.0 - s / 100, "lr": 1e-3, "time": T0 + s} for s in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"event": "tra', encoding="utf-8")
    text = write_report(run).read_text(encoding="utf-8")
    assert not (run / "plots" / "val_metrics.png").exists()
    assert "Skipped 1 unreadable line(s) in metrics.jsonl: [4]" in text


def test_missing_run_dir_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_report(tmp_path / "nope")


@pytest.mark.parametrize(
    "val, train, expected_step, overfitting",
    [
        ([(1, 2.0), (2, 1.5), (3, 1.52)], [(1, 3.0), (3, 2.0)], None, None),  # +1.3%: noise, not flagged
        ([(1, 2.0), (2, 1.5), (3, 1.6)], [(1, 3.0), (2, 2.5), (3, 2.0)], 2, True),
        ([(1, 2.0), (2, 1.5), (3, 1.6)], [(1, 3.0), (2, 2.0), (3, 2.5)], 2, False),  # train rising: instability
        ([(1, 2.0), (2, 1.5), (3, 1.4)], [(1, 3.0), (3, 2.0)], None, None),  # still improving
    ],
)
def test_overfit_rule(
    val: list[tuple[int, float]], train: list[tuple[int, float]], expected_step: int | None, overfitting: bool | None
) -> None:
    found = find_overfit(val, train)
    if expected_step is None:
        assert found is None
    else:
        assert found is not None and found.step == expected_step and found.is_overfitting is overfitting


def test_series_resumed_run_later_line_wins() -> None:
    # A run resumed from step 2 re-logs steps 3..; the resumed values are the ones that count.
    events = [
        {"event": "train", "step": 1, "loss": 3.0},
        {"event": "train", "step": 3, "loss": 9.9},
        {"event": "train", "step": 3, "loss": 2.0},
        {"event": "train", "step": 2, "loss": "nan?"},
        {"event": "eval", "step": 1, "loss": 1.0},
    ]
    assert series(events, "train", "loss") == [(1, 3.0), (3, 2.0)]


def test_end_without_eval_has_no_best(tmp_path: Path) -> None:
    run = tmp_path / "noeval"
    run.mkdir()
    _write_jsonl(
        run / "metrics.jsonl",
        [{"event": "train", "step": 5, "loss": 4.0, "lr": 1e-3, "time": T0},
         {"event": "end", "step": 5, "reason": "max_steps", "best_step": 0, "best_metric": "val_loss",
          "best_value": None, "train_time_s": 1.5, "time": T0 + 2}],
    )
    text = write_report(run).read_text(encoding="utf-8")
    assert "| Best step | — |" in text and "| Steps run | 5 |" in text and "max_steps" in text
