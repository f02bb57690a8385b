"""No silent minutes: phases say their duration (honelm.tracking.phase); `honelm test` takes the split from the
run's manifest when every row is where it was recorded (honelm.data.splits.reuse_manifest), and computes it (and
is refused by the seal) when anything changed."""

from __future__ import annotations

import sys

import pytest

from honelm import tracking
from honelm.data import splits as S
from honelm.data.readers import Example
from honelm.errors import HonelmError
from tests.unit.test_splits import dataset


def test_a_phase_says_its_duration_and_a_nested_one_shows_no_second_display(monkeypatch):
    said: list[str] = []
    monkeypatch.setattr(tracking, "PHASE_SAYS_AFTER_S", 0.0)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    with tracking.phase(said.append, "outer", total=3) as advance:
        advance(2)
        with tracking.phase(said.append, "inner"):
            assert len(tracking._SHOWN) == 1  # rich shows one live display: the outer one
    assert [line.split(":")[0] for line in said] == ["inner", "outer"] and said[0].endswith(" s")
    assert not tracking._SHOWN
    monkeypatch.setattr(tracking, "PHASE_SAYS_AFTER_S", 2.0)
    with tracking.phase(said.append, "quick"):
        pass
    assert len(said) == 2  # a phase shorter than 2 s says nothing


def test_the_recorded_split_is_reused_exactly_and_changed_data_is_computed_and_refused(monkeypatch):
    rows = dataset({"a": 30, "b": 20, "c": 10})
    first = S.make_splits(rows, "8:1:1", seed=3)
    with S.unlock_test_split("the test"):
        test_rows = first.test

    def no_scan(*args, **kwargs):
        raise AssertionError("the duplicate scan ran although the manifest had it")
    monkeypatch.setattr(S, "_duplicates", no_scan)
    with S.reuse_manifest(first.manifest) as reuse:
        again = S.make_splits(list(reversed(rows)), "8:1:1", seed=3)  # input order never matters
    assert reuse.reused and again.train == first.train and again.val == first.val
    S.verify_manifest(first.manifest, again.manifest)
    assert again.manifest["duplicates"] == first.manifest["duplicates"]
    with S.unlock_test_split("the test"):
        assert again.test == test_rows
    monkeypatch.undo()
    edited = [Example(r.text + " (edited)" if i == 0 else r.text, r.text_pair, r.label, r.source, r.line)
              for i, r in enumerate(rows)]
    with S.reuse_manifest(first.manifest) as reuse:
        changed = S.make_splits(edited, "8:1:1", seed=3)
    assert not reuse.reused
    with pytest.raises(HonelmError, match="differ from the recorded"):
        S.verify_manifest(first.manifest, changed.manifest)
    with S.reuse_manifest(first.manifest) as reuse:
        S.make_splits(rows, "8:1:1", seed=4)  # another seed: another split, computed
    assert not reuse.reused
