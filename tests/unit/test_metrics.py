"""Hand-worked checks of honelm.metrics: the confusion matrix, calibration bins, ECE, and the one-class watch
(whose streak each fit starts afresh)."""

from __future__ import annotations

import pytest
import torch

from honelm import metrics as M


def test_confusion_matrix_by_hand() -> None:
    gold = [0, 0, 1, 2, 2, 2]
    pred = [0, 1, 1, 2, 0, 2]
    # row = gold, column = predicted
    assert M.confusion_matrix(gold, pred, 3) == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    assert M.confusion_matrix([], [], 2) == [[0, 0], [0, 0]]
    with pytest.raises(ValueError, match="out of range"):
        M.confusion_matrix([0, 3], [0, 0], 3)
    with pytest.raises(ValueError, match="2 gold labels but 1"):
        M.confusion_matrix([0, 1], [0], 2)


def test_ece_by_hand() -> None:
    confidence = [0.95, 0.91, 0.85, 0.3, 0.35, 0.62]
    correct = [True, True, False, True, False, True]
    # bins: (0.9, 1]: 2 examples, acc 1, conf 0.93 → 2/6 · 0.07
    #       (0.8, 0.9]: acc 0, conf 0.85 → 1/6 · 0.85
    #       (0.2, 0.3]: 0.3 sits on the right edge, so here, not in (0.3, 0.4]: acc 1, conf 0.3 → 1/6 · 0.7
    #       (0.3, 0.4]: acc 0, conf 0.35 → 1/6 · 0.35
    #       (0.6, 0.7]: acc 1, conf 0.62 → 1/6 · 0.38
    expected = (2 * 0.07 + 0.85 + 0.7 + 0.35 + 0.38) / 6
    assert M.expected_calibration_error(confidence, correct) == pytest.approx(expected)
    assert expected == pytest.approx(0.403333, abs=1e-6)
    bins = M.calibration_bins(confidence, correct)
    assert [b.count for b in bins] == [0, 0, 1, 1, 0, 0, 1, 0, 1, 2]
    assert bins[2].upper == pytest.approx(0.3) and bins[2].accuracy == 1.0 and bins[2].confidence == 0.3
    assert bins[9].confidence == pytest.approx(0.93) and bins[0].accuracy is None


def test_ece_edges() -> None:
    assert M.expected_calibration_error([1.0, 1.0], [True, True]) == 0.0  # 1.0 lands in the last bin
    assert M.calibration_bins([1.0], [True])[-1].count == 1
    assert M.expected_calibration_error([0.5, 0.5], [True, False]) == pytest.approx(0.0)
    assert M.expected_calibration_error([], []) != M.expected_calibration_error([], [])  # NaN
    with pytest.raises(ValueError, match="outside"):
        M.calibration_bins([1.5], [True])


def test_each_fit_starts_its_one_class_streak_and_validation_records_afresh(monkeypatch):
    """A booster's sub-run (plae's teacher) shares the run's `ctx.extra`: the teacher's last validations must not
    count toward the student's one-class streak, nor its kept records describe the student's best/. fit_plan drops
    both before the loop starts; the streak itself warns on the second one-class validation in a row only."""
    from types import SimpleNamespace

    from honelm.metrics import OneClassWatch
    from honelm.stages import runner
    from honelm.stages.contract import Plan

    said: list[str] = []
    watch = OneClassWatch(said.append)
    constant, labels = torch.tensor([[0.0, 5.0]] * 4), torch.tensor([0, 1, 0, 1])
    watch(constant, labels, None)  # a teacher's last validation: one class
    extra = {"one_class": watch, "val_records": ["the teacher's"]}
    seen: dict = {}
    monkeypatch.setattr(runner, "fit", lambda *a, **k: seen.update(extra=dict(extra)))
    monkeypatch.setattr(runner.boosters, "lr_scale", lambda cfg: None)
    monkeypatch.setattr(runner.boosters, "lr_hold", lambda cfg: None)
    ctx = SimpleNamespace(extra=extra, loaded=SimpleNamespace(base_pending=False), run_dir=None,
                          cfg=SimpleNamespace(train=None), runtime=None, tracker=None, save_best=None, kept_files=None)
    runner.fit_plan(ctx, Plan(objective=None, stream=None, evaluate=None, metric="val_accuracy"), None, None, False)
    assert "one_class" not in seen["extra"] and "val_records" not in seen["extra"]
    fresh = OneClassWatch(said.append)  # the student's own watch (classify sets one up on its first validation)
    fresh(constant, labels, None)
    assert said == []  # one one-class validation of its own: not yet a streak
    fresh(constant, labels, None)
    assert len(said) == 1 and "two validations in a row" in said[0]
    watch(constant, labels, None)  # without the reset, the teacher's watch would have warned at once
    assert len(said) == 2
