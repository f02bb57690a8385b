"""Choices that repeat (honelm.choices): the thread count and precision are decided with a margin, cached per
machine, model and batch shape, overridable, and kept by a resumed run; a busy machine is named in the log."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import torch

from honelm import choices as ch
from honelm import runtime as rt
from honelm.config import TrainConfig
from honelm.loop import BatchStream, TrainPlan, fit
from honelm.objectives.lm import CausalLM
from tests.unit.test_loop import collate_fn, variable_length_data

KEY = {"machine": {"cpu": "test"}, "model": {"parameters": 1}, "batch": {"input_ids": [2, 8]}}


class Clock:
    """A perf_counter that only the fake probes move: timings exact, whatever the machine is doing."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch, tmp_path):
    fake = Clock()
    monkeypatch.setattr(time, "perf_counter", fake)
    monkeypatch.setenv("HONELM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    yield fake
    torch.set_num_threads(1)


def probe_taking(clock: Clock, seconds: dict[int, float]) -> tuple[object, list[int]]:
    calls: list[int] = []

    def probe() -> None:
        calls.append(torch.get_num_threads())
        clock.now += seconds[torch.get_num_threads()]
    return probe, calls


def test_the_fewest_threads_within_the_margin_win():
    assert ch.pick_threads({1: 1.00, 2: 0.95}) == 1  # 5% faster is noise: one thread stays
    assert ch.pick_threads({1: 1.00, 2: 0.80, 4: 0.78}) == 2
    assert ch.thread_candidates(2) == [1, 2] and ch.thread_candidates(6) == [1, 2, 4, 6]


def test_the_thread_probe_is_cached_overridable_and_refreshed(clock):
    cache = ch.ChoiceCache()
    probe, calls = probe_taking(clock, {1: 0.010, 2: 0.020})
    first = ch.decide_threads("auto", torch.device("cpu"), 1, probe, KEY, True)
    assert first.threads == 1 and "measured 1: 10.0 ms, 2: 20.0 ms" in first.reason and len(calls) == 8
    assert cache.get(KEY, "threads")["threads"] == 1
    again = ch.decide_threads("auto", torch.device("cpu"), 1, probe, KEY, True)
    assert again.threads == 1 and again.reason.startswith("1 (cached") and len(calls) == 8  # nothing measured
    faster_now, more = probe_taking(clock, {1: 0.030, 2: 0.010})
    ignored = ch.decide_threads("auto", torch.device("cpu"), 1, faster_now, KEY, False)
    assert ignored.threads == 2 and more and cache.get(KEY, "threads")["threads"] == 1  # measured, not stored
    refreshed = ch.decide_threads("auto", torch.device("cpu"), 1, faster_now, KEY, "refresh")
    assert refreshed.threads == 2 and cache.get(KEY, "threads")["threads"] == 2
    other_shape = {**KEY, "batch": {"input_ids": [4, 8]}}
    assert cache.get(other_shape, "threads") is None  # a different batch shape is another decision
    assert ch.decide_threads(3, torch.device("cpu"), 1, probe, KEY, True).reason == "3 (asked for)"
    os.environ["OMP_NUM_THREADS"] = "1"  # (the fixture's monkeypatch removes it again)
    assert ch.decide_threads("auto", torch.device("cpu"), 1, probe, KEY, True).reason == "1 (from OMP_NUM_THREADS)"
    assert ch.decide_threads("auto", torch.device("cpu"), 2, probe, KEY, False).threads == 1  # 2 cores, 2 processes


def test_an_unwritable_cache_warns_and_training_goes_on(clock, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("HONELM_CACHE_DIR", str(tmp_path / "file" / "below"))  # a directory below a file
    probe, _ = probe_taking(clock, {1: 0.01, 2: 0.02})
    chosen = ch.decide_threads("auto", torch.device("cpu"), 1, probe, KEY, True)
    assert chosen.threads == 1 and "cannot write the probe cache" in chosen.warning


@pytest.mark.parametrize("bf16_s, chosen, says", [(0.010, "fp32", "does not pay"),
                                                   (0.0086, "fp32", "too close to call"),  # 1.16x: the coin flip
                                                   (0.0070, "bf16", "1.43x faster")])
def test_precision_has_a_band_where_fp32_is_the_fixed_default(clock, monkeypatch, bf16_s, chosen, says):
    monkeypatch.setattr(rt, "cpu_has_fast_bf16", lambda: True)

    def probe(mode: str) -> None:
        clock.now += bf16_s if mode == "bf16" else 0.010
    precision, reason = rt.choose_precision("auto", torch.device("cpu"), probe)
    assert precision == chosen and says in reason, reason


def test_a_busy_machine_is_named_with_what_to_do(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(ch, "load_average", lambda: 5.0)
    warning = ch.busy_warning(2, measured=False)
    assert "busy (load average 5.0 on 2 logical cores)" in warning and "train.threads=1" in warning
    assert "train.probe_cache=refresh" in ch.busy_warning(1, measured=True)
    monkeypatch.setattr(ch, "load_average", lambda: 0.5)
    assert ch.busy_warning(2, measured=False) == ""


def _fit(tiny_llama, run_dir, threads, max_steps=4, resume=False):
    rows = variable_length_data(16, seed=1)
    cfg = TrainConfig(lr=1e-2, batch_size=4, max_steps=max_steps, eval_every=0, save_every=2, precision="fp32",
                      progress=False, tensorboard=False, threads=threads, keep_checkpoints=10)
    plan = TrainPlan(CausalLM(), BatchStream(len(rows), collate_fn(rows), 4, 1, seed=0), None, lambda m, i: None,
                     "val_loss")
    fit(tiny_llama(seed=0), plan, cfg, rt.Runtime(device=torch.device("cpu")), run_dir, resume=resume)
    return [e["message"] for e in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if e["event"] == "info" and e["message"].startswith("threads:")]


def test_later_identical_runs_reuse_the_choice_and_a_resumed_run_keeps_its_own(tiny_llama, tmp_path, clock):
    assert "measured" in _fit(tiny_llama, tmp_path / "a", "auto")[-1]
    assert "(cached" in _fit(tiny_llama, tmp_path / "b", "auto")[-1]  # same machine, model and batch shape
    recorded = json.loads((tmp_path / "b" / "choices.json").read_text())
    assert recorded["threads"] == 1 and recorded["precision"] == "fp32" and recorded["key"]["batch"]
    _fit(tiny_llama, tmp_path / "c", 2)  # asked for 2
    shutil.rmtree(tmp_path / "c" / "checkpoints" / "step-00000004")  # as if killed after step 2
    torch.set_num_threads(1)
    assert _fit(tiny_llama, tmp_path / "c", "auto", resume=True)[-1] == "threads: 2 (recorded by this run)"
    assert torch.get_num_threads() == 2


def _put_many(directory: str, worker: int, n: int) -> None:
    cache = ch.ChoiceCache(__import__("pathlib").Path(directory))
    for i in range(n):
        cache.put({"worker": worker, "i": i}, "threads", {"threads": 1})


def test_runs_writing_the_cache_together_lose_no_entry(tmp_path):
    """Four processes adding entries at once: every entry is there afterwards (the read-add-replace is locked)."""
    import multiprocessing
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_put_many, args=(str(tmp_path), w, 25)) for w in range(4)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(60)
        assert p.exitcode == 0
    cache = ch.ChoiceCache(tmp_path)
    missing = [(w, i) for w in range(4) for i in range(25) if cache.get({"worker": w, "i": i}, "threads") is None]
    assert not missing, f"{len(missing)} of 100 entries lost"
