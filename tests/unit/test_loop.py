"""The loop: exact gradient accumulation, deterministic sharded batches, resume ≡ uninterrupted, NaN stop."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

from honelm import runtime as rt
from honelm.config import TrainConfig
from honelm.errors import HonelmError, TrainingError
from honelm.loop import BatchStream, Callback, TrainPlan, accumulate, fit
from honelm.objectives.base import Loss, Objective
from honelm.objectives.lm import CausalLM


def variable_length_data(n: int = 8, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 64, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g) for _ in range(n)]


def collate_fn(rows: list[torch.Tensor]):
    def collate(idx: list[int]) -> dict[str, torch.Tensor]:
        width = max(len(rows[i]) for i in idx)
        ids = torch.zeros(len(idx), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(idx):
            ids[r, : len(rows[i])] = rows[i]
            mask[r, : len(rows[i])] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    return collate


def grads_after(model, micro) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    accumulate(model, CausalLM(), micro, rt.Runtime(device=torch.device("cpu")))
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_accumulation_is_exact_on_variable_lengths(tiny_llama):
    rows = variable_length_data()
    collate = collate_fn(rows)
    model = tiny_llama()
    one = grads_after(model, [collate(list(range(8)))])  # micro 8, accum 1
    four = grads_after(model, [collate([0, 1]), collate([2, 3]), collate([4, 5]), collate([6, 7])])  # micro 2, accum 4
    for name in one:
        torch.testing.assert_close(four[name], one[name], rtol=1e-4, atol=1e-6)
    # the naive mean of micro-batch means differs on variable lengths: this test can tell the two apart
    model.zero_grad(set_to_none=True)
    for pair in ([0, 1], [2, 3], [4, 5], [6, 7]):
        b = collate(pair)
        loss = CausalLM()(model, b)
        (loss.value / loss.units / 4).backward()
    naive = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert any(not torch.allclose(naive[n], one[n], rtol=1e-3, atol=1e-6) for n in one)


def test_stream_is_deterministic_and_sharding_matches_accumulation():
    collate = lambda idx: {"idx": idx}  # noqa: E731
    single = BatchStream(10, collate, batch_size=2, grad_accum=2, seed=3)
    rank0 = BatchStream(10, collate, batch_size=2, grad_accum=1, seed=3, world=2, rank=0)
    rank1 = BatchStream(10, collate, batch_size=2, grad_accum=1, seed=3, world=2, rank=1)
    for _ in range(7):  # crosses epoch boundaries
        a = [b["idx"] for b in single.next_step()]
        assert sorted(sum(a, [])) == sorted(rank0.next_step()[0]["idx"] + rank1.next_step()[0]["idx"])
    again = BatchStream(10, collate, batch_size=2, grad_accum=2, seed=3)
    again.position = 8
    fresh = BatchStream(10, collate, batch_size=2, grad_accum=2, seed=3)
    fresh.next_step(); fresh.next_step()
    assert again.next_step() == fresh.next_step()
    # every item appears exactly once per epoch
    s = BatchStream(10, collate, batch_size=5, grad_accum=1, seed=1)
    assert sorted(s.next_step()[0]["idx"] + s.next_step()[0]["idx"]) == list(range(10))


def test_length_grouping_keeps_every_item():
    lengths = [int(x) for x in torch.randint(1, 50, (40,))]
    s = BatchStream(40, lambda idx: {"idx": idx}, batch_size=4, grad_accum=1, seed=0, lengths=lengths)
    seen = sum((s.next_step()[0]["idx"] for _ in range(10)), [])
    assert sorted(seen) == list(range(40))


def _train(tiny_llama, tmp_path, name, max_steps, resume=False, model=None, dropout=0.1):
    rows = variable_length_data(24, seed=1)
    cfg = TrainConfig(lr=1e-2, batch_size=4, grad_accum=2, max_steps=max_steps, eval_every=3, save_every=3,
                      log_every=2, precision="fp32", progress=False, tensorboard=False, warmup_steps=2,
                      keep_checkpoints=10)
    model = model or tiny_llama(seed=0, dropout=dropout)
    collate = collate_fn(rows)
    stream = BatchStream(len(rows), collate, 4, 2, seed=0)
    val = collate(list(range(6)))
    evaluate = lambda m: {"val_loss": float(CausalLM()(m, val).value) / CausalLM().units(val)}  # noqa: E731
    torch.manual_seed(0)
    fit(model, TrainPlan(CausalLM(), stream, evaluate, lambda m, info: None, "val_loss"), cfg,
        rt.Runtime(device=torch.device("cpu")), tmp_path / name, resume=resume)
    return model


def test_resume_is_bit_identical(tiny_llama, tmp_path):
    # the uninterrupted run
    full = _train(tiny_llama, tmp_path, "full", max_steps=10)
    # a run stopped after step 6 (its checkpoint), then resumed by a *fresh* model and process state
    _train(tiny_llama, tmp_path, "cut", max_steps=10, dropout=0.1)
    import shutil
    ckpts = sorted((tmp_path / "cut" / "checkpoints").iterdir())
    for c in ckpts:  # keep only step 6: as if killed between step 6 and the end
        if not c.name.endswith("00000006"):
            shutil.rmtree(c)
    torch.manual_seed(123)  # garbage RNG state: resume must restore the saved one
    resumed = _train(tiny_llama, tmp_path, "cut", max_steps=10, resume=True, model=tiny_llama(seed=99, dropout=0.1))
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), n


class ExplodingObjective(Objective):
    def __init__(self, at_call: int):
        self.calls, self.at = 0, at_call

    def __call__(self, model, batch):
        self.calls += 1
        loss = CausalLM()(model, batch)
        if self.calls >= self.at:
            loss = Loss(value=loss.value * float("nan"), units=loss.units)
        return loss

    def units(self, batch):
        return CausalLM().units(batch)


def test_nan_loss_stops_and_names_the_step(tiny_llama, tmp_path):
    rows = variable_length_data(16)
    cfg = TrainConfig(max_steps=10, batch_size=4, precision="fp32", progress=False, tensorboard=False, save_every=0)
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # the precision probe is skipped with fp32, so call k is micro-batch k: step 3 is the first bad one
    with pytest.raises(TrainingError, match="non-finite loss .* at step 3"):
        plan = TrainPlan(ExplodingObjective(at_call=3), BatchStream(16, collate_fn(rows), 4, 1, seed=0), None,
                         lambda m, i: None, "val_loss")
        fit(model, plan, cfg, rt.Runtime(device=torch.device("cpu")), tmp_path / "nan")
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())  # the bad update never happened
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # steps 1-2 did


def test_metrics_jsonl_events(tiny_llama, tmp_path):
    _train(tiny_llama, tmp_path, "m", max_steps=6)
    events = [json.loads(x) for x in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()]
    kinds = {e["event"] for e in events}
    assert {"train", "eval", "best", "checkpoint", "end"} <= kinds
    train = [e for e in events if e["event"] == "train"]
    assert all(k in train[0] for k in ("loss", "lr", "grad_norm", "tokens_per_s", "epoch"))


def test_gradient_checkpointing_gives_the_same_gradients(tiny_llama):
    from honelm.loop import enable_gradient_checkpointing

    rows = variable_length_data()
    batch = collate_fn(rows)(list(range(8)))
    model = tiny_llama()
    model.train()
    plain = grads_after(model, [batch])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # transformers 5 deprecated gradient_checkpointing_enable
        enable_gradient_checkpointing(model)
    assert model.model.gradient_checkpointing
    again = grads_after(model, [batch])
    for name in plain:
        torch.testing.assert_close(again[name], plain[name], rtol=1e-5, atol=1e-7)


def test_gradient_checkpointing_under_lora(tiny_llama):
    from honelm.boosters.lora import LoraConfig, apply_lora
    from honelm.loop import enable_gradient_checkpointing
    from honelm.models import LoadedModel

    batch = collate_fn(variable_length_data())(list(range(4)))
    model = apply_lora(LoadedModel.built(tiny_llama()), LoraConfig(enabled=True), "lm", lambda _: None).model
    model.train()
    plain = grads_after(model, [batch])
    enable_gradient_checkpointing(model)
    again = grads_after(model, [batch])
    assert plain and plain.keys() == again.keys()  # frozen embeddings: grads still reach the adapters
    for name in plain:
        torch.testing.assert_close(again[name], plain[name], rtol=1e-5, atol=1e-7)


def test_gradient_checkpointing_reaches_a_wrapper_with_its_own_entry_point(tiny_llama):
    from honelm.loop import enable_gradient_checkpointing
    from honelm.rl.policy import PolicyWithValue

    policy = tiny_llama()
    wrapper = PolicyWithValue(policy, torch.nn.Linear(policy.config.hidden_size, 1))
    enable_gradient_checkpointing(wrapper)  # PPO's wrapper: not a transformers model, turns it on inside
    assert policy.model.gradient_checkpointing
    with pytest.raises(HonelmError, match="does not support it"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("losses, stops_at, best_step", [
    ([1.0, 0.9, 0.8, 0.7, 0.6, 0.5], None, 6),   # accuracy ties while the loss falls: progress, never stops
    ([1.0, 1.0, 1.0, 1.0, 1.0, 1.0], 3, 1),      # ties with no lower loss: patience runs out after 2
    ([1.0, 1.1, 0.9, 1.2, 1.3, 1.4], 5, 3),      # a lower loss than the best's resets patience once
])
def test_a_metric_tie_with_a_lower_validation_loss_is_progress(tiny_llama, tmp_path, losses, stops_at, best_step):
    rows = variable_length_data(16)
    cfg = TrainConfig(max_steps=6, batch_size=4, eval_every=1, patience=2, precision="fp32", progress=False,
                      tensorboard=False, save_every=0)
    seen = iter(losses)
    evaluate = lambda m: {"val_accuracy": 0.5, "val_loss": next(seen)}  # noqa: E731
    saved: list[int] = []
    plan = TrainPlan(CausalLM(), BatchStream(16, collate_fn(rows), 4, 1, seed=0), evaluate,
                     lambda m, info: saved.append(info["step"]), "val_accuracy")
    result = fit(tiny_llama(), plan, cfg, rt.Runtime(device=torch.device("cpu")), tmp_path / "tie")
    events = [json.loads(x) for x in (tmp_path / "tie" / "metrics.jsonl").read_text().splitlines()]
    stops = [e["step"] for e in events if e["event"] == "early_stop"]
    assert stops == ([] if stops_at is None else [stops_at])
    assert saved[-1] == best_step and result.best_step == best_step


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_heap_is_handed_back_before_a_run_starts():
    from honelm.runtime import release_freed_memory

    def rss_mib() -> int:
        with open("/proc/self/status") as handle:
            return next(int(line.split()[1]) // 1024 for line in handle if line.startswith("VmRSS"))

    blocks = [torch.ones(16 * 1024) for _ in range(3000)]  # 64 KiB each: glibc's heap, not mmap
    kept = blocks[1::2]  # free every other block: ~94 MiB free but fragmented, so the heap top cannot shrink
    del blocks
    before = rss_mib()
    if not release_freed_memory():
        pytest.skip("no malloc_trim in this libc")
    assert before - rss_mib() >= 40
    assert len(kept) == 1500


def test_freed_heap_is_handed_back_around_every_validation(tiny_llama, tmp_path, monkeypatch):
    calls: list[bool] = []
    monkeypatch.setattr(rt, "release_freed_memory", lambda collect=True: calls.append(collect) or True)
    _train(tiny_llama, tmp_path, "trim", max_steps=6)  # validation at steps 3 and 6
    assert calls == [False] * 4  # before and after each validation, without a garbage collection


def test_a_stop_during_the_final_checkpoint_finishes_the_run_and_is_reported(tiny_llama, tmp_path, stop_during_checkpoint):
    """Ctrl-C after the last step's check (while the final checkpoint is written) cannot interrupt the
    run any more: it ends complete and saved, and says that a stop was asked for so callers stop."""
    stop_during_checkpoint(4)  # the final one
    rows = variable_length_data()
    cfg = TrainConfig(lr=1e-3, batch_size=2, max_steps=4, eval_every=0, save_every=0, precision="fp32",
                      progress=False, tensorboard=False)

    def plan() -> TrainPlan:
        return TrainPlan(CausalLM(), BatchStream(len(rows), collate_fn(rows), 2, 1, seed=0), None,
                         lambda m, info: None, metric="loss")

    result = fit(tiny_llama(), plan(), cfg, rt.Runtime(device=torch.device("cpu")), tmp_path)
    assert (result.steps, result.reason, result.stop_requested) == (4, "max_steps", True)
    state = json.loads((tmp_path / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert state["finished"] is True  # nothing is left to resume
    assert "stop requested while the final checkpoint was written" in (tmp_path / "log.txt").read_text()
    # without a stop the flag stays down
    stop_during_checkpoint.disarm()
    again = fit(tiny_llama(), plan(), cfg, rt.Runtime(device=torch.device("cpu")), tmp_path / "b")
    assert not again.stop_requested


class Recorder(Callback):
    """Records every call; stops the run after the validation of step `stop_at` (0: never)."""

    def __init__(self, stop_at: int = 0):
        self.calls: list[tuple] = []
        self.stop_at = stop_at

    def on_start(self, state):
        self.calls.append(("start", state.step, state.precision, state.resumed))

    def after_step(self, state):
        self.calls.append(("step", state.step))

    def after_eval(self, state, metrics):
        self.calls.append(("eval", state.step, sorted(metrics)))
        return "enough" if state.step == self.stop_at else None

    def on_end(self, state, result):
        self.calls.append(("end", result.steps, result.reason))


def test_callbacks_see_the_run_and_a_reason_from_after_eval_stops_it(tiny_llama, tmp_path):
    rows = variable_length_data(16)
    cfg = TrainConfig(max_steps=8, batch_size=4, eval_every=2, save_every=0, precision="fp32", progress=False,
                      tensorboard=False)
    watch, stopper = Recorder(), Recorder(stop_at=4)
    plan = TrainPlan(CausalLM(), BatchStream(16, collate_fn(rows), 4, 1, seed=0), lambda m: {"val_loss": 1.0},
                     lambda m, info: None, "val_loss")
    result = fit(tiny_llama(), plan, cfg, rt.Runtime(device=torch.device("cpu")), tmp_path / "cb",
                 callbacks=[watch, stopper])
    assert (result.steps, result.reason) == (4, "enough")
    assert watch.calls == [("start", 0, "fp32", False), ("step", 1), ("step", 2), ("eval", 2, ["val_loss"]),
                           ("step", 3), ("step", 4), ("eval", 4, ["val_loss"]), ("end", 4, "enough")]
    events = [json.loads(x) for x in (tmp_path / "cb" / "metrics.jsonl").read_text().splitlines()]
    assert [e["message"] for e in events if e["event"] == "info"][-1] == "stopped by enough after this validation"
    assert events[-1]["event"] == "end" and events[-1]["reason"] == "enough"
    state = json.loads((tmp_path / "cb" / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert state["finished"] is True  # stopped cleanly: nothing left to resume


def test_resumed_runs_start_callbacks_too_and_checkpoints_keep_their_keys(tiny_llama, tmp_path):
    rows = variable_length_data(16)
    cfg = TrainConfig(max_steps=4, batch_size=4, eval_every=2, save_every=1, precision="fp32", progress=False,
                      tensorboard=False, keep_checkpoints=10)
    values = iter([2.0, 1.0, 1.0])

    def plan() -> TrainPlan:
        return TrainPlan(CausalLM(), BatchStream(16, collate_fn(rows), 4, 1, seed=0),
                         lambda m: {"val_loss": next(values)}, lambda m, info: None, "val_loss")

    fit(tiny_llama(), plan(), cfg, rt.Runtime(device=torch.device("cpu")), tmp_path)
    ckpts = tmp_path / "checkpoints"
    keys = ["step", "position", "best_value", "best_step", "bad_evals", "precision", "precision_reason",
            "train_time_s", "finished"]
    assert list(json.loads((ckpts / "step-00000001" / "trainer_state.json").read_text())) == keys  # no best yet
    state = json.loads((ckpts / "step-00000004" / "trainer_state.json").read_text())
    assert list(state) == keys + ["best_loss"] and state["best_step"] == 4 and state["best_value"] == 1.0
    for c in ckpts.iterdir():  # as if killed after step 3: resume from its checkpoint
        if not c.name.endswith("00000003"):
            shutil.rmtree(c)
    seen = Recorder()
    result = fit(tiny_llama(), plan(), cfg, rt.Runtime(device=torch.device("cpu")), tmp_path, resume=True,
                 callbacks=[seen])
    assert seen.calls[0] == ("start", 3, "fp32", True) and result.steps == 4
    again = Recorder()
    done = fit(tiny_llama(), plan(), cfg, rt.Runtime(device=torch.device("cpu")), tmp_path, resume=True,
               callbacks=[again])
    assert done.reason == "already finished" and again.calls == []  # a finished run starts nothing
