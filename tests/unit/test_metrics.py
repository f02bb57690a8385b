"""Hand-worked checks of honelm.metrics' classifier-probability metrics: confusion matrix, calibration bins, ECE."""

from __future__ import annotations

import pytest

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
