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


# --------------------------------------------------------------------------------------------
# Per-example predictions: confusion matrix, calibration, regression scatter
# --------------------------------------------------------------------------------------------

# 3 classes, 8 examples. Confusion (row gold, column predicted):
#   neg: 2 right, 1 as pos   → [2, 0, 1]
#   neu: 1 right             → [0, 1, 0]
#   pos: 1 as neg, 3 right   → [1, 0, 3]
CLASSIFIED = [  # (gold, pred, max prob)
    (0, 0, 0.9), (0, 0, 0.8), (0, 2, 0.6), (1, 1, 0.5), (2, 0, 0.7), (2, 2, 0.95), (2, 2, 0.95), (2, 2, 0.85),
]


def _probs(pred: int, top: float) -> list[float]:
    rest = round((1 - top) / 2, 6)
    return [top if k == pred else rest for k in range(3)]


def _classify_run(root: Path, file: str = "test_predictions.jsonl") -> Path:
    run = _full_run(root)
    (run / "labels.json").write_text(json.dumps({"task": "classification",
                                                 "id2label": {"0": "neg", "1": "neu", "2": "pos"}}), encoding="utf-8")
    rows = [{"i": i, "gold": g, "pred": p, "probs": _probs(p, c)} for i, (g, p, c) in enumerate(CLASSIFIED)]
    (run / file).parent.mkdir(exist_ok=True)
    _write_jsonl(run / file, rows)
    return run


def test_classification_report_confusion_and_calibration(tmp_path: Path) -> None:
    from honelm import metrics as M

    run = _classify_run(tmp_path)
    text = write_report(run).read_text(encoding="utf-8")
    assert "## Classification quality (test split)" in text
    assert "From `test_predictions.jsonl` (8 examples). Accuracy 0.75." in text
    assert "| gold \\ predicted | neg | neu | pos | total | recall |" in text
    assert "| neg | 2 | 0 | 1 | 3 | 66.7% |" in text
    assert "| neu | 0 | 1 | 0 | 1 | 100.0% |" in text
    assert "| pos | 1 | 0 | 3 | 4 | 75.0% |" in text
    ece = M.expected_calibration_error([c for _, _, c in CLASSIFIED], [g == p for g, p, _ in CLASSIFIED])
    # by hand: (0.4,0.5] 1 right at .5 → .5; (0.5,0.6] wrong .6 → .6; (0.6,0.7] wrong .7 → .7;
    # (0.7,0.8] right .8 → .2; (0.8,0.9] right .9 and .85 → 2·(1 − .875); (0.9,1] right .95, .95 → 2·.05;
    # all over N = 8
    assert ece == pytest.approx((0.5 + 0.6 + 0.7 + 0.2 + 2 * 0.125 + 2 * 0.05) / 8)
    assert f"**Expected calibration error (ECE): {ece:.4f}**" in text
    assert "| (0.9, 1.0] | 2 | 1 | 0.95 |" in text
    assert "](plots/confusion.png)" in text and "](plots/calibration.png)" in text
    _assert_valid_png(run / "plots" / "confusion.png")
    _assert_valid_png(run / "plots" / "calibration.png")
    assert not (run / "plots" / "pred_vs_gold.png").exists()


def test_untested_run_uses_best_val_predictions_and_stale_plots_go(tmp_path: Path) -> None:
    run = _classify_run(tmp_path, "best/val_predictions.jsonl")
    (run / "best" / "best.json").write_text(json.dumps({"step": 200}), encoding="utf-8")
    text = write_report(run).read_text(encoding="utf-8")
    assert "## Classification quality (validation split, best checkpoint (step 200))" in text
    assert "From `best/val_predictions.jsonl`" in text and "optimistic" in text
    assert (run / "plots" / "confusion.png").exists()
    (run / "best" / "val_predictions.jsonl").unlink()
    text = write_report(run).read_text(encoding="utf-8")
    assert "Classification quality" not in text
    assert not (run / "plots" / "confusion.png").exists() and not (run / "plots" / "calibration.png").exists()


def test_regression_predictions_scatter(tmp_path: Path) -> None:
    run = _full_run(tmp_path)
    _write_jsonl(run / "test_predictions.jsonl",
                 [{"i": i, "gold": g, "pred": p} for i, (g, p) in enumerate([(1.0, 1.5), (4.0, 3.0), (2.5, 2.5)])])
    text = write_report(run).read_text(encoding="utf-8")
    assert "## Regression predictions (test split)" in text and "Mean absolute error: 0.5." in text
    assert "Confusion" not in text and "calibration" not in text.lower()
    _assert_valid_png(run / "plots" / "pred_vs_gold.png")


def test_malformed_predictions_are_reported_not_dropped(tmp_path: Path) -> None:
    run = _classify_run(tmp_path)
    lines = (run / "test_predictions.jsonl").read_text(encoding="utf-8").splitlines()
    lines[3] = json.dumps({"i": 3, "gold": 7, "pred": 1, "probs": [0.2, 0.5, 0.3]})  # gold outside the 3 classes
    (run / "test_predictions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    text = write_report(run).read_text(encoding="utf-8")
    assert "`test_predictions.jsonl` could not be used:" in text and "test_predictions.jsonl:4" in text
    assert "label id in 0..2" in text and "Classification quality" not in text


def test_prediction_records_format_and_reader(tmp_path: Path) -> None:
    import torch

    from honelm import predictions as P

    logits = torch.tensor([[0.0, 0.0], [1.0, 3.0]], dtype=torch.bfloat16)
    rows = P.prediction_records(logits, [1, 1], regression=False)
    assert rows[0] == {"i": 0, "gold": 1, "pred": 0, "probs": [0.5, 0.5]}
    assert rows[1]["pred"] == 1 and rows[1]["probs"] == [0.119203, 0.880797]  # softmax([1, 3]) to 6 places
    P.write_records(tmp_path / "p.jsonl", rows)
    first = (tmp_path / "p.jsonl").read_text(encoding="utf-8").splitlines()[0]
    assert first == '{"i": 0, "gold": 1, "pred": 0, "probs": [0.5, 0.5]}'
    assert P.read_records(tmp_path / "p.jsonl") == rows
    reg = P.prediction_records(torch.tensor([[2.9000001], [0.1]]), [3.2, 0.0], regression=True)
    assert reg == [{"i": 0, "gold": 3.2, "pred": 2.9}, {"i": 1, "gold": 0.0, "pred": 0.1}]
    _write_jsonl(tmp_path / "bad.jsonl", [{"i": 0, "gold": 1, "pred": 1}, {"i": 2, "gold": 1, "pred": 1}])
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected i=1"):
        P.read_records(tmp_path / "bad.jsonl")
    P.write_labels(tmp_path, {1: "pos", 0: "neg"})
    assert P.read_labels(tmp_path) == {0: "neg", 1: "pos"}


# --------------------------------------------------------------------------------------------
# report.html
# --------------------------------------------------------------------------------------------


def test_report_html_is_self_contained(tmp_path: Path) -> None:
    import re

    run = _classify_run(tmp_path)
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    events.insert(1, {"event": "info", "step": 0, "message": "data <script>alert(1)</script> & more", "time": T0})
    _write_jsonl(run / "metrics.jsonl", events)
    write_report(run)
    page = (run / "report.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "<title>Run report: run-abc (stage: sft)</title>" in page
    sources = re.findall(r'<img [^>]*src="([^"]*)"', page)
    assert len(sources) == 5  # loss, lr, val metrics, confusion, calibration
    assert all(src.startswith("data:image/png;base64,") for src in sources)
    assert "plots/" not in "".join(sources) and "http" not in "".join(sources)
    assert "<script>" not in page and "data &lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in page
    assert "<table>" in page and "<th>gold \\ predicted</th>" in page and "<td>neg</td>" in page
    assert '<pre><code class="language-yaml">run:\n  name: run-abc' in page


def test_report_html_is_deterministic(tmp_path: Path) -> None:
    run = _classify_run(tmp_path)
    write_report(run)
    first = (run / "report.html").read_bytes()
    write_report(run)
    assert (run / "report.html").read_bytes() == first


def test_md_to_html_subset(tmp_path: Path) -> None:
    from honelm.protocol.report import md_to_html, write_html

    md = "\n".join([
        "# T `x` <b>", "",
        "Some **bold `a|b`** text, a [link](https://example.org/?a=1&b=2), a [bad one](javascript:alert) and "
        "<i>tags</i>",
        "on two lines.", "",
        "- one", "  continued", "- `two`", "",
        "| a | b \\| c |", "|---|---:|", "| 1 | `x\\|y` |", "",
        "> quoted **line**", "",
        "````md", "```", "<not html>", "````", "",
        "![missing](plots/none.png)", "",
        "![remote](https://example.org/x.png)",
    ])
    page = md_to_html(md, tmp_path, "a <title>")
    assert "<title>a &lt;title&gt;</title>" in page
    assert "<h1>T <code>x</code> &lt;b&gt;</h1>" in page
    assert "<strong>bold <code>a|b</code></strong>" in page
    assert '<a href="https://example.org/?a=1&amp;b=2">link</a>' in page
    assert "javascript" not in page and "bad one" in page and "&lt;i&gt;tags&lt;/i&gt;" in page
    assert "<li>one continued</li>" in page and "<li><code>two</code></li>" in page
    assert '<th style="text-align: right">b | c</th>' in page and '<code>x|y</code>' in page
    assert "<blockquote>\n<p>quoted <strong>line</strong></p>\n</blockquote>" in page
    assert '<pre><code class="language-md">```\n&lt;not html&gt;</code></pre>' in page
    assert "image not embedded: plots/none.png: file not found" in page
    assert "<img" not in page  # neither the missing nor the remote image becomes an <img>
    (tmp_path / "r.md").write_text("# R\n\n![p](p.png)\n", encoding="utf-8")
    (tmp_path / "p.png").write_bytes(PNG_SIGNATURE + b"fake")
    out = write_html(tmp_path / "r.md")
    assert out == tmp_path / "r.html"
    assert '<img alt="p" src="data:image/png;base64,iVBORw0KGgpmYWtl">' in out.read_text(encoding="utf-8")
