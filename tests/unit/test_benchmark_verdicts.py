"""benchmarks/lora_memory.py's verdict: PASS/FAIL on the median of per-round ratios, and `not settled`
when too few rounds agree with it (a one-sided sign test, p > 0.05). The benchmark itself is run by
hand; this checks only the arithmetic that prints its verdict, the step clock's wait for the device and
lora_curves.py's record of a failed run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def lora_memory():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("lora_memory_under_test", BENCH / "lora_memory.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCH))


def runs_with(step_ratios: list[float], rss_ratio: float = 0.6) -> dict[str, list[dict]]:
    full = {"step_s": 1.0, "step_s_median": 1.0, "peak_rss_mib": 1000.0, "peak_increase_mib": 500.0}
    lora = [{"step_s": r, "step_s_median": r, "peak_rss_mib": 1000.0 * rss_ratio, "peak_increase_mib": 200.0}
            for r in step_ratios]
    return {"honelm_lora": lora, "honelm_full": [dict(full) for _ in step_ratios]}


def test_sign_test_counts_and_p_values(lora_memory):
    assert lora_memory.sign_test([0.8] * 5, 0.9, True) == (5, 1 / 32)
    agree, p = lora_memory.sign_test([0.8] * 12 + [0.95] * 3, 0.9, True)
    assert agree == 12 and p == pytest.approx(576 / 32768)  # C(15,12)+C(15,13)+C(15,14)+C(15,15) = 576
    assert lora_memory.sign_test([0.95, 0.8, 0.96], 0.9, False) == (2, 0.5)


def test_verdicts_settled_and_not(lora_memory):
    lines, ratios = lora_memory.ratio_lines(runs_with([0.86, 0.77, 0.79, 0.92, 0.89]))
    step = ratios["honelm_lora/honelm_full step_s"]
    assert step["pass"] and not step["settled"] and step["rounds_agreeing"] == 4
    assert "PASS (not settled: 4 of 5 rounds agree" in lines[1]
    rss = ratios["honelm_lora/honelm_full peak_rss_mib"]
    assert rss["pass"] and rss["settled"] and "PASS   (" in lines[0]

    lines, ratios = lora_memory.ratio_lines(runs_with([0.95, 0.97, 0.99, 0.93, 0.96], rss_ratio=0.75))
    assert "step time   0.96x   target <= 0.90x   FAIL   (" in lines[1]  # all 5 agree: settled
    assert not ratios["honelm_lora/honelm_full peak_rss_mib"]["pass"] and "FAIL   (" in lines[0]


def test_step_clock_waits_for_the_device_before_every_mark():
    """benchmarks/_common.StepClock(sync=): on a GPU the queued work must have finished before a mark is taken, so
    `sync` runs before every timestamp (and is never needed on a CPU: None reads the clock directly)."""
    import time

    sys.path.insert(0, str(BENCH))
    try:
        from _common import StepClock
    finally:
        sys.path.remove(str(BENCH))
    events: list[tuple[str, float]] = []
    clock = StepClock(warmup=1, steps=3, sync=lambda: events.append(("sync", time.perf_counter())))
    for _ in range(5):
        clock.mark()
    assert [e[0] for e in events] == ["sync"] * 5  # one sync per mark
    assert all(s <= m for (_, s), m in zip(events, clock.marks))  # each sync before its timestamp
    assert clock.seconds() == clock.marks[4] - clock.marks[1] and len(clock.cpu) == 2
    plain = StepClock(warmup=0, steps=1)
    plain.mark()
    plain.mark()
    assert len(plain.marks) == 2 and plain.seconds() >= 0


def test_lora_curves_records_a_failed_run_as_a_result_of_the_sweep(tmp_path):
    """benchmarks/lora_curves.py: a run that fails (diverges at a high learning rate) is listed with why, below the
    table of the runs that finished, and the gap line compares only finished runs."""
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("lora_curves_under_test", BENCH / "lora_curves.py")
        curves = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(curves)
    finally:
        sys.path.remove(str(BENCH))

    def finished(name: str, kind: str, lr: float, accs: list[float]) -> dict:
        return {"name": name, "kind": kind, "lr": lr, "curve": {
            "steps": [10 * (i + 1) for i in range(len(accs))], "val_accuracy": accs, "val_loss": [1.0] * len(accs),
            "train": [], "train_time_s": 12.0, "trainable_params": 1000, "best": max(accs), "last": accs[-1]}}

    runs = [finished("full-lr1e-4", "full", 1e-4, [0.5, 0.8]), finished("lora-lr1e-3", "lora", 1e-3, [0.5, 0.79]),
            {"name": "lora-lr1e-2", "kind": "lora", "lr": 1e-2, "failed": "failed (exit 1): non-finite gradient norm"}]
    curves.write_results(tmp_path, runs, "demo")
    text = (tmp_path / "results.md").read_text()
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table) == 4 and not any("lora-lr1e-2" in line for line in table)  # header, rule, the two finished
    assert "Best LoRA (lora-lr1e-3) − best full (full-lr1e-4): -1.00 points" in text
    assert "lora-lr1e-2 (lr 0.01): failed (exit 1): non-finite gradient norm" in text
    assert (tmp_path / "curves.png").is_file() and "failed" in (tmp_path / "results.json").read_text()
