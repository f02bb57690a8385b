"""Bounded validation (honelm.validation): periodic validations on one fixed subset, the whole set at the end."""

from __future__ import annotations

import json

import pytest
import torch

from honelm import runtime as rt
from honelm.config import TrainConfig
from honelm.loop import BatchStream, TrainPlan, fit
from honelm.objectives.lm import CausalLM
from honelm.validation import AUTO_MIN_BATCHES, Validation, eval_cap, spread
from tests.unit.test_loop import collate_fn, variable_length_data


def test_the_subset_is_evenly_spread_and_the_auto_cap_follows_the_training_between_validations():
    assert spread(list(range(10)), 4) == [0, 2, 5, 7] and spread([1, 2], 5) == [1, 2]
    cfg = TrainConfig(eval_every=100, eval_batch_size=32)
    assert eval_cap(cfg, step_items=16) == 533  # a third of the 1,600 items trained between two validations
    assert eval_cap(TrainConfig(eval_every=2, eval_batch_size=8), 4) == AUTO_MIN_BATCHES * 8  # never below the floor
    assert eval_cap(TrainConfig(eval_max_batches=3, eval_batch_size=8), 4) == 24
    assert eval_cap(TrainConfig(eval_max_batches=0), 4) == 0 and eval_cap(TrainConfig(eval_every=0), 4) == 0


@pytest.mark.parametrize("full_loss, winner", [({2: 0.9, 4: 0.5}, 4), ({2: 0.5, 4: 0.9}, 2)],
                         ids=["final-wins", "best-wins"])
def test_periodic_validations_score_one_subset_and_the_end_chooses_on_the_whole_set(tiny_llama, tmp_path, full_loss,
                                                                                    winner):
    """The subset's numbers choose the best so far (step 2 of 4); at the end the whole set scores both the best and
    the final model (told apart by their weights) and the better one is best/, its full numbers recorded."""
    rows = variable_length_data(16, seed=1)
    scored: list[list[int]] = []
    weights_at: dict[int, torch.Tensor] = {}
    subset_losses = iter([(1, 3.0), (2, 1.0), (3, 2.0), (4, 2.5)])

    def of_subset(idx: list[int]):
        def score(model) -> dict[str, float]:
            scored.append(idx)
            step, loss = next(subset_losses)
            weights_at[step] = model.lm_head.weight.detach().clone()
            return {"val_loss": loss}
        return score

    def full(model) -> dict[str, float]:
        scored.append(list(range(12)))
        step = next(s for s, w in weights_at.items() if torch.equal(w, model.lm_head.weight))
        return {"val_loss": full_loss[step]}

    validation = Validation(full, lambda n: (of_subset(spread(list(range(12)), n)), n), 12)
    saved: list[dict] = []
    cfg = TrainConfig(lr=1e-2, batch_size=4, max_steps=4, eval_every=1, eval_batch_size=2, eval_max_batches=2,
                      precision="fp32", progress=False, tensorboard=False, save_every=0, threads=1)
    plan = TrainPlan(CausalLM(), BatchStream(16, collate_fn(rows), 4, 1, seed=0), validation,
                     lambda m, info: saved.append({**info, "weights": m.lm_head.weight.detach().clone()}), "val_loss")
    model = tiny_llama(seed=0)
    result = fit(model, plan, cfg, rt.Runtime(device=torch.device("cpu")), tmp_path)
    periodic, ends = scored[:4], scored[4:]
    assert all(s == [0, 3, 6, 9] for s in periodic)  # the same 4 of 12, every time
    assert ends == [list(range(12))] * (3 if winner == 2 else 2)  # best, final (and the winning best again: its records)
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {e["model_step"]: e["val_loss"] for e in events if e["event"] == "eval_full"} == full_loss
    assert len(saved) == 1 and saved[0]["validation"] == "full"  # best/ written once, from the whole set
    assert saved[0]["value"] == 0.5 == result.best_value and saved[0]["step"] == result.best_step == winner
    assert torch.equal(saved[0]["weights"], weights_at[winner])  # the winner's weights were saved
    assert torch.equal(model.lm_head.weight, weights_at[4])  # and the final weights are back after
    assert not (tmp_path / ".best-weights.pt").exists()


def test_a_resumed_capped_run_keeps_the_subset_and_the_best_weights_of_before_the_kill(tiny_llama, tmp_path):
    """Killed after step 3 (best so far: step 2, its weights kept, checkpoint at step 2), resumed by a fresh model:
    the same subset is scored, and at the end the kept step-2 weights compete on the whole set, and win."""
    from honelm.loop import Callback

    rows = variable_length_data(16, seed=1)
    at: dict[str, int] = {"step": 0}
    weights_at: dict[int, torch.Tensor] = {}
    subset_loss = {1: 3.0, 2: 1.0, 3: 2.0, 4: 2.5}
    scored: list[list[int]] = []

    class Steps(Callback):
        def __init__(self, kill_at: int = 0) -> None:
            self.kill_at = kill_at

        def after_step(self, state) -> None:
            at["step"] = state.step
            if state.step == self.kill_at:
                raise RuntimeError("killed")

    def of_subset(idx: list[int]):
        def score(model) -> dict[str, float]:
            scored.append(idx)
            weights_at[at["step"]] = model.lm_head.weight.detach().clone()
            return {"val_loss": subset_loss[at["step"]]}
        return score

    def full(model) -> dict[str, float]:
        step = next(s for s, w in weights_at.items() if torch.equal(w, model.lm_head.weight))
        return {"val_loss": {2: 0.5, 4: 0.9}[step]}

    saved: list[dict] = []

    def run(resume: bool, kill_at: int) -> None:
        cfg = TrainConfig(lr=1e-2, batch_size=4, max_steps=4, eval_every=1, eval_batch_size=2, eval_max_batches=2,
                          precision="fp32", progress=False, tensorboard=False, save_every=2, threads=1)
        plan = TrainPlan(CausalLM(), BatchStream(16, collate_fn(rows), 4, 1, seed=0),
                         Validation(full, lambda n: (of_subset(spread(list(range(12)), n)), n), 12),
                         lambda m, info: saved.append(info), "val_loss")
        fit(tiny_llama(seed=0 if not resume else 5), plan, cfg, rt.Runtime(device=torch.device("cpu")), tmp_path,
            resume=resume, callbacks=[Steps(kill_at)])

    with pytest.raises(RuntimeError, match="killed"):
        run(resume=False, kill_at=3)
    assert (tmp_path / ".best-weights.pt").exists() and not saved  # no best/ from a subset
    run(resume=True, kill_at=0)
    assert all(s == [0, 3, 6, 9] for s in scored)
    assert len(saved) == 1 and saved[0]["step"] == 2 and saved[0]["value"] == 0.5 and saved[0]["validation"] == "full"
