"""Every numeric config field declares its range, and a value outside it is one clean line before anything runs."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from honelm import bounds as B
from honelm import config as C
from honelm import registry
from honelm.cli import main
from honelm.pipeline import PipelineConfig
from honelm.protocol.ablate import AblateConfig
from honelm.protocol.boost import BoostConfig
from honelm.protocol.search import SearchConfig

SPEC_FILES = (PipelineConfig, SearchConfig, AblateConfig, BoostConfig)  # the files of pipeline, search, ablate, boost


def _sections(cls: type, prefix: str, seen: set[type]) -> typing.Iterator[tuple[type, str]]:
    """`cls` and every section below it (a list or mapping of sections included), each once, with a dotted place."""
    if cls in seen:
        return
    seen.add(cls)
    yield cls, prefix
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner = tp if C._is_section(tp) else C._item_section(tp)[0]
        if inner is not None:
            yield from _sections(inner, f"{prefix}{f.name}.", seen)


def _all_sections() -> list[tuple[type, str]]:
    seen: set[type] = set()
    roots = [(registry.config_class(v.name), v.name) for v in registry.VERBS.values() if v.kind != "command"]
    roots += [(cls, cls.__name__) for cls in SPEC_FILES]
    return [found for cls, name in roots for found in _sections(cls, f"{name}:", seen)]


def test_every_numeric_field_of_every_verb_declares_its_range():
    sections = _all_sections()
    assert len(sections) > 40  # the walk reaches the stage sections, not only the roots
    missing, checked = [], 0
    for cls, where in sections:
        declared = B.bounds_of(cls)
        for name in B.numeric_fields(cls):
            checked += 1
            if name not in declared:
                missing.append(f"{where}{name} ({cls.__module__}.{cls.__qualname__})")
    assert checked > 100
    assert not missing, "numeric fields without Annotated[..., Bound]: " + ", ".join(missing)


def test_every_default_is_within_its_own_range():
    for cls, where in _all_sections():
        C.check_bounds(cls(), where)  # raises for a default outside its declared range


def test_a_bound_describes_what_it_allows():
    assert B.at_least(1).describe(True) == "an integer >= 1"
    assert B.between(0, 1, open_hi=True).describe(False) == "a number in [0, 1)"
    assert B.at_least(0, -1, note="-1 = derive").describe(True) == "an integer >= 0, or -1 (-1 = derive)"
    assert B.above(0).allows(1e-9) and not B.above(0).allows(0.0)
    assert B.at_least(0, -1).allows(-1) and not B.at_least(0, -1).allows(-2)
    assert not B.PROBABILITY.allows(float("nan"))


# The 11 values, and the ones it found accepted silently, each: (verb, override, what the line names).
INVALID = [
    ("classify", "train.batch_size=0", "train.batch_size=0: must be an integer >= 1"),
    ("classify", "train.batch_size=-4", "train.batch_size=-4: must be an integer >= 1"),
    ("classify", "train.grad_accum=0", "train.grad_accum=0: must be an integer >= 1"),
    ("classify", "train.grad_accum=-1", "train.grad_accum=-1: must be an integer >= 1"),
    ("classify", "train.lr=-0.001", "train.lr=-0.001: must be a number > 0"),
    ("classify", "model.dropout=2", "model.dropout=2.0: must be a number in [0, 1)"),
    ("classify", "train.adam_beta2=1.5", "train.adam_beta2=1.5: must be a number in [0, 1)"),
    ("classify", "data.split=9:1", "data.split: '9:1': expected 3 parts"),
    ("classify", "data.split=0:0:1", "data.split: '0:0:1': the train part must be > 0"),
    ("classify", "data.split=a:b:c", "data.split: 'a:b:c': expected three numbers"),
    ("classify", "data.split=9:-1:2", "data.split: '9:-1:2': parts must not be negative"),
    ("classify", "data.split=9:0:1", "data.split: '9:0:1' leaves nothing for validation"),
    ("classify", "data.max_length=0", "data.max_length=0: must be an integer >= 1"),
    ("classify", "train.max_steps=-5", "train.max_steps=-5: must be an integer >= 0"),
    ("classify", "train.epochs=0", "train.epochs=0.0: must be a number > 0"),
    ("classify", "train.epochs=-1", "train.epochs=-1.0: must be a number > 0"),
    ("classify", "train.warmup_steps=-2", "train.warmup_steps=-2: must be an integer >= 0, or -1"),
    ("classify", "lora.dropout=1", "lora.dropout=1.0: must be a number in [0, 1)"),
    ("pretrain", "data.block_size=1", "data.block_size=1: must be an integer >= 2"),
    ("pretrain", "run.seed=-1", "run.seed=-1: must be an integer >= 0"),
    ("sft", "data.max_length=0", "data.max_length=0: must be an integer >= 2"),
    ("dpo", "dpo.beta=0", "dpo.beta=0.0: must be a number > 0"),
    ("ppo", "ppo.gamma=1.5", "ppo.gamma=1.5: must be a number in [0, 1]"),
    ("adapt", "adapt.mlm_probability=0", "adapt.mlm_probability=0.0: must be a number in (0, 1)"),
    ("generate", "sampling.top_p=0", "sampling.top_p=0.0: must be a number in (0, 1]"),
]


@pytest.mark.parametrize("verb, override, message", INVALID, ids=[f"{v}:{o}" for v, o, _ in INVALID])
def test_an_invalid_value_is_one_line_naming_key_value_and_range(verb, override, message, capsys, tmp_path,
                                                                monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = "nowhere" if verb == "generate" else "data.train=nowhere.jsonl"  # never read: refused before
    assert main([verb, source, override]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"honelm {verb}: error: ") and message in lines[0], err
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_a_spec_file_value_outside_its_range_names_the_file(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("verb: classify\nout_dir: x\nmetric: val_accuracy\nn_trials: -1\nspace:\n  train.lr: [0.1, 0.2]\n")
    with pytest.raises(C.ConfigError, match=r"s.yaml: n_trials=-1: must be an integer >= 0"):
        C.from_mapping(SearchConfig, C.read_yaml(path, "search file", C.LineLoader), path)
    path.write_text("verb: classify\nout_dir: x\nmetric: val_accuracy\nspace:\n  train.lr: {low: 0.1, high: 0.2, "
                    "step: -1}\n")
    with pytest.raises(C.ConfigError, match=r"s.yaml:5: space.train.lr.step=-1: must be a number > 0"):
        C.from_mapping(SearchConfig, C.read_yaml(path, "search file", C.LineLoader), path)
