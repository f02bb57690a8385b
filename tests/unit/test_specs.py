"""The files of `honelm pipeline`, `search` and `ablate` as config dataclasses read by `C.from_mapping`:
a shipped search keeps its study identity, errors name file, line and dotted field, unknown keys get a
did-you-mean, sections nest (one, a list, a mapping of named ones) and may have a short form."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from honelm import config as C
from honelm.errors import ConfigError
from honelm.pipeline import load
from honelm.protocol import search as S

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name, identity, variables", [("demo.yaml", "ec395bdc14f1b102", None),
                                                      ("sst2-minilm.yaml", "1265f38d75dc7fd3", {"data": "/data/sst2"})])
def test_a_shipped_search_keeps_its_study_identity(name, identity, variables):
    """A resumed study refuses a spec whose identity changed; these values are what the hand-written
    parser gave before the search file became a config dataclass (where the preset's data is, --var, is not part
    of it)."""
    assert S.load_spec(ROOT / "configs" / "search" / name, variables=variables).identity() == identity


@dataclass
class Item:
    """A section of the test file."""

    name: str = ""
    """Its name."""
    size: int | float | None = None
    """Its size, an int or a float as written."""

    @staticmethod
    def shorthand(value: Any) -> dict[str, Any]:
        if not isinstance(value, str):
            raise ValueError("must be a name or a mapping")
        return {"name": value}

    def validate(self) -> None:
        if self.name == "bad":
            raise C.FieldError("name", "is bad")


@dataclass
class File:
    """The test file."""

    out: str = "o"
    """Where it goes."""
    items: list[Item] = field(default_factory=list)
    """Items in order."""
    named: dict[str, Item] = field(default_factory=dict)
    """Items by name."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Raw YAML values."""


def read(tmp_path: Path, text: str) -> File:
    path = tmp_path / "f.yaml"
    path.write_text(text)
    return C.from_mapping(File, C.read_yaml(path, "test file", C.LineLoader), path)


def test_sections_nest_and_keep_what_was_written(tmp_path):
    cfg = read(tmp_path, "out:\nitems:\n  - {name: a, size: 4}\n  - b\n  - {name: c, size: 4.0}\n"
                         "named:\n  x: {name: d}\n  y:\nextra: {k: [{a: 1}]}\n")
    assert cfg.out == "o"  # empty: the default
    assert [(i.name, i.size) for i in cfg.items] == [("a", 4), ("b", None), ("c", 4.0)]
    assert isinstance(cfg.items[0].size, int) and isinstance(cfg.items[2].size, float)
    assert cfg.named == {"x": Item("d"), "y": Item()}
    assert yaml.safe_dump(cfg.extra)  # plain values: no line-carrying mapping left inside
    keys = [row[0] for row in C.describe(File)]
    assert "items[].size" in keys and "named.<key>.name" in keys


@pytest.mark.parametrize("text, message", [
    ("items:\n  - name: a\n    sise: 3\n", r"f.yaml:2: items\[0\]: unknown field\(s\) sise; did you mean 'size'\?"),
    ("named:\n  x:\n    name: bad\n", r"f.yaml:3: named.x.name: is bad"),
    ("items: [3]\n", r"f.yaml: items\[0\]: must be a name or a mapping"),
    ("items:\n  - size: big\n", r"f.yaml:2: items\[0\].size: 'big' is not a valid int \| float \| None"),
    ("itemz: []\n", r"f.yaml: unknown field\(s\) itemz; did you mean 'items'\?"),
    ("extra: [1]\n", r"f.yaml: extra: expected a mapping"),
])
def test_errors_name_the_file_the_line_and_the_field(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        read(tmp_path, text)


def test_a_misspelt_pipeline_stage_field_gets_a_suggestion(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("out_dir: x\nstages:\n  - verb: pretrain\n  - verb: tokenizer\n    sett: {}\n")
    with pytest.raises(ConfigError, match=r"p.yaml:4: stages\[1\]: unknown field\(s\) sett; did you mean 'set'\?"):
        load(path)
