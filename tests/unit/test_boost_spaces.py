"""Booster-aware search spaces (`Booster.space`) and adversarial sizes relative to the model's embeddings
(`adversarial.relative`, measured by `Booster.calibrate`)."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from honelm import boosters
from honelm import config as C
from honelm.boosters import adversarial as A
from honelm.boosters import lora
from honelm.boosters.base import Space, range_around, scale_range, widen_range
from honelm.errors import HonelmError
from honelm.objectives.classify import Classify
from honelm.stages.classify import ClassifyConfig
from tests.unit.test_adversarial import NULL, SPECIAL, batch, classifier

TOKENIZER = SimpleNamespace(all_special_ids=SPECIAL)
LR = {"train.lr": {"low": 1e-4, "high": 1e-3, "log": True}}


class Stream:
    """What `calibrate` reads of a training stream: its size and how it collates examples."""

    def __init__(self, n: int = 12) -> None:
        self.n, self.bs, self.seen = n, 4, []

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        self.seen += idx
        return batch(seed=idx[0], rows=len(idx))


def scaled_copy(model: torch.nn.Module, factor: float) -> torch.nn.Module:
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.get_input_embeddings().weight.mul_(factor)
    return other


def test_a_relative_epsilon_is_the_same_perturbation_in_units_of_each_models_embedding_norm():
    small = classifier(seed=0, dropout=0.0)
    large = scaled_copy(small, 10.0)  # the same model with embeddings ten times larger
    cfg = A.AdversarialConfig(method="fgm", epsilon=0.3, relative=True)
    said: list[str] = []
    measured = {}
    for name, model in (("small", small), ("large", large)):
        scale, tokens = A.embedding_scale(model, [batch(seed=0, rows=4), batch(seed=4, rows=4), batch(seed=8, rows=4)],
                                          SPECIAL, perturb_special=False)
        absolute = A.calibrate(cfg, model, Stream(), TOKENIZER, said.append)
        assert not absolute.relative and absolute.epsilon == pytest.approx(0.3 * scale)
        loss = A.Adversarial(Classify(), absolute, SPECIAL).step(model, batch(seed=1), 1.0, NULL)
        size = float(loss.metrics["delta_norm"] / loss.units)  # the mean per-example ‖δ‖ of the step
        measured[name] = (scale, size / scale, tokens)
    assert measured["large"][0] == pytest.approx(10 * measured["small"][0], rel=1e-5)
    assert measured["small"][1] == pytest.approx(0.3, rel=1e-4) and measured["large"][1] == pytest.approx(0.3, rel=1e-4)
    # real tokens only, specials excluded: 3 batches of 4 rows x 10, minus row 0's padding and [CLS]/[SEP]
    assert measured["small"][2] == 3 * (4 * 10 - 4 - 4 - 1)
    assert "relative sizes ×" in said[0] and "epsilon=0.3 →" in said[0]


def test_calibration_scales_every_embedding_unit_size_and_reads_only_the_first_examples():
    model = classifier(seed=0)
    stream = Stream(n=A.SCALE_EXAMPLES + 40)
    freelb = A.calibrate(A.AdversarialConfig(method="freelb", relative=True), model, stream, TOKENIZER, lambda s: None)
    scale, _ = A.embedding_scale(model, [stream.collate(list(range(i, min(i + 4, A.SCALE_EXAMPLES))))
                                         for i in range(0, A.SCALE_EXAMPLES, 4)], SPECIAL, False)
    assert max(stream.seen) == A.SCALE_EXAMPLES - 1
    assert math.isinf(freelb.epsilon)  # no projection stays no projection
    assert freelb.step_size == pytest.approx(0.1 * scale) and freelb.init_mag == pytest.approx(0.2 * scale)
    r3f = A.calibrate(A.AdversarialConfig(method="r3f", relative=True), model, Stream(), TOKENIZER, lambda s: None)
    assert r3f.weight == 1.0 and r3f.epsilon != 1e-5  # λ is not a size; the noise is
    # off, or not relative: nothing is measured
    plain = A.AdversarialConfig(method="fgm")
    assert A.calibrate(plain, model, None, TOKENIZER, lambda s: None) is plain
    off = A.calibrate(A.AdversarialConfig(method="fgm", epsilon=0.0, relative=True), model, None, TOKENIZER, print)
    assert not off.relative and not off.active
    with pytest.raises(HonelmError, match="not measured yet"):
        A.Adversarial(Classify(), A.AdversarialConfig(method="fgm", relative=True), SPECIAL)


def test_the_runner_calibrates_a_stage_config_through_the_booster_hook():
    cfg = C.build(ClassifyConfig, None, ["adversarial.method=pgd", "adversarial.relative=true"])
    model = classifier(seed=0)
    loaded = SimpleNamespace(model=model)
    out = boosters.calibrate(cfg, loaded, SimpleNamespace(stream=Stream()), TOKENIZER, lambda s: None)
    assert out is not cfg and cfg.adversarial.relative and not out.adversarial.relative
    assert out.train is cfg.train and out.adversarial.epsilon > 0 and out.adversarial.epsilon != 0.05
    plain = C.build(ClassifyConfig, None, [])
    assert boosters.calibrate(plain, loaded, SimpleNamespace(stream=Stream()), TOKENIZER, print) is plain


def test_range_helpers():
    assert range_around(1e-3, 3.0) == {"low": pytest.approx(1e-3 / 3), "high": pytest.approx(3e-3), "log": True}
    assert scale_range({"low": 1e-4, "high": 1e-3, "log": True}, 10) == {"low": pytest.approx(1e-3),
                                                                       "high": pytest.approx(1e-2), "log": True}
    assert scale_range([1e-4, 1e-3], 10) == [pytest.approx(1e-3), pytest.approx(1e-2)]


def test_lora_searches_up_to_an_order_of_magnitude_higher_learning_rate():
    """LoRA's range keeps the baseline's bottom and reaches 10x higher: on small models its best rate is 1-3x full
    fine-tuning's and 10x collapses it (docs/benchmarks.md), on RoBERTa-base about 10x (Hu et al. 2021)."""
    on = C.build(ClassifyConfig, None, ["lora.enabled=true", "train.lr=2e-4"])
    moved = boosters.search_space(on, Space(dict(LR)))
    assert moved.ranges["train.lr"] == {"low": pytest.approx(1e-4), "high": pytest.approx(1e-2), "log": True}
    assert widen_range([1e-4, 1e-3], 10) == [1e-4, 1e-3, pytest.approx(1e-2)]
    own = boosters.search_space(on, Space({"train.weight_decay": [0.0, 0.01]}))  # the baseline searches no lr
    assert own.ranges["train.lr"] == widen_range(range_around(2e-4, lora.LR_AROUND), lora.LR_FACTOR)
    assert own.ranges["train.weight_decay"] == [0.0, 0.01]
    off = C.build(ClassifyConfig, None, [])
    assert boosters.search_space(off, Space(dict(LR))) == Space(dict(LR))


def test_each_adversarial_method_adds_its_strength_in_relative_units():
    assert set(A.SEARCH_RANGES) == set(A.REGISTRY)  # every method has its range
    for method, (key, low, high) in A.SEARCH_RANGES.items():
        cfg = C.build(ClassifyConfig, None, [f"adversarial.method={method}"])
        space = boosters.search_space(cfg, Space(dict(LR)))
        assert space.ranges == {**LR, f"adversarial.{key}": {"low": low, "high": high, "log": True}}
        assert space.fixed == {"adversarial.relative": True}
        assert key in A.REGISTRY[method].reads() and low < high
        default = getattr(A.REGISTRY[method](), key)
        assert low <= default <= high  # the defaults sit inside
    both = C.build(ClassifyConfig, None, ["lora.enabled=true", "adversarial.method=fgm"])
    space = boosters.search_space(both, Space(dict(LR)))
    assert set(space.ranges) == {"train.lr", "adversarial.epsilon"} and space.ranges["train.lr"]["high"] == pytest.approx(1e-2)


@pytest.mark.parametrize("settings", [["adversarial.epsilon=0.1"], ["adversarial.step_size=0.01"], []])
def test_a_strength_the_user_set_is_not_searched(settings):
    method = "pgd" if settings else "none"
    cfg = C.build(ClassifyConfig, None, [f"adversarial.method={method}", *settings])
    assert boosters.search_space(cfg, Space(dict(LR))) == Space(dict(LR))
    relative = C.build(ClassifyConfig, None, ["adversarial.method=pgd", "adversarial.relative=true",
                                              "adversarial.step_size=0.01"])
    assert "adversarial.epsilon" in boosters.search_space(relative, Space(dict(LR))).ranges


def test_lora_plus_multiplier_reaches_the_run_through_the_booster_registry():
    """`lora.lr_ratio` from a stage config: what the runner hands the optimizer (boosters.lr_scale)."""
    plus = C.build(ClassifyConfig, None, ["lora.enabled=true", "lora.lr_ratio=4"])
    scale = boosters.lr_scale(plus)
    assert scale is not None
    assert scale("base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.default.weight") == 4.0
    assert scale("base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default.weight") == 1.0
    assert scale("base_model.model.classifier.modules_to_save.default.weight") == 1.0
    assert boosters.lr_scale(C.build(ClassifyConfig, None, ["lora.enabled=true"])) is None  # plain LoRA: one lr
    assert boosters.lr_scale(C.build(ClassifyConfig, None, ["lora.lr_ratio=4"])) is None  # LoRA off: nothing scaled
    with pytest.raises(HonelmError, match="lora.lr_ratio"):
        C.build(ClassifyConfig, None, ["lora.enabled=true", "lora.lr_ratio=0"])
