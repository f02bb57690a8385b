"""A run's pinned inputs (honelm.pins): the same bytes from anywhere pass, other bytes are refused or, when
allowed, recorded."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from honelm.config import ModelConfig
from honelm.data.sources import SplitDataConfig
from honelm.errors import HonelmError
from honelm.pins import PINS_FILE, check_inputs, pin_inputs, record_inputs


def _cfg(train: str, tokenizer: str = "") -> SimpleNamespace:
    return SimpleNamespace(data=SplitDataConfig(train=train), model=ModelConfig(tokenizer=tokenizer))


@pytest.fixture
def started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A run that started in tmp/a on a.txt (by a relative path) and a tokenizer directory; returns the run."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "corpus.txt").write_text("one\ntwo\n", encoding="utf-8")
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"v": 1}', encoding="utf-8")
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.chdir(tmp_path / "a")
    record_inputs(run, _cfg("corpus.txt", str(tok)))
    return run


def test_inputs_are_pinned_by_absolute_path_and_hash(started: Path, tmp_path: Path) -> None:
    pins = json.loads((started / PINS_FILE).read_text())["inputs"]
    assert pins["data.train"]["files"][0]["path"] == str(tmp_path / "a" / "corpus.txt")
    assert len(pins["data.train"]["files"][0]["sha256"]) == 64
    assert [Path(f["path"]).name for f in pins["model.tokenizer"]["files"]] == ["tokenizer.json"]


def test_the_same_bytes_from_another_directory_pass(started: Path, tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "corpus.txt").write_text("one\ntwo\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path / "b")
    said: list[str] = []
    check_inputs(started, _cfg("corpus.txt", str(tmp_path / "tok")), False, said.append)
    assert said == []


def test_changed_bytes_are_refused_naming_the_file_and_both_hashes(started: Path, tmp_path: Path) -> None:
    before = json.loads((started / PINS_FILE).read_text())
    (tmp_path / "tok" / "tokenizer.json").write_text('{"v": 2}', encoding="utf-8")
    with pytest.raises(HonelmError, match=r"model.tokenizer: .*tokenizer.json has sha256 [0-9a-f]{16}…, but the run "
                                          r"was trained on .*tokenizer.json with sha256 [0-9a-f]{16}…"):
        check_inputs(started, _cfg("corpus.txt", str(tmp_path / "tok")), False, print)
    assert json.loads((started / PINS_FILE).read_text()) == before  # a refusal changes nothing


def test_allowed_changes_are_said_recorded_and_pinned(started: Path, tmp_path: Path) -> None:
    (tmp_path / "a" / "corpus.txt").write_text("three\n", encoding="utf-8")
    said: list[str] = []
    check_inputs(started, _cfg("corpus.txt", str(tmp_path / "tok")), True, said.append)
    assert len(said) == 1 and said[0].startswith("warning: data.train:")
    pins = json.loads((started / PINS_FILE).read_text())
    assert pins["inputs"] == pin_inputs(_cfg("corpus.txt", str(tmp_path / "tok")))["inputs"]
    assert len(pins["changes"]) == 1


def test_an_input_that_cannot_be_read_from_here_is_named(started: Path, tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "empty")
    with pytest.raises(HonelmError, match=f"data.train=corpus.txt cannot be read from here \\(the run read "
                                          f"{tmp_path / 'a' / 'corpus.txt'}\\)"):
        check_inputs(started, _cfg("corpus.txt", str(tmp_path / "tok")), False, print)


def test_a_run_from_before_pins_resumes_with_a_note_and_is_pinned(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_text("x\n", encoding="utf-8")
    said: list[str] = []
    check_inputs(tmp_path, _cfg("corpus.txt"), False, said.append)
    assert "not checked on this resume" in said[0] and (tmp_path / PINS_FILE).is_file()


def test_an_unreadable_pins_file_is_one_clear_error(started: Path) -> None:
    (started / PINS_FILE).write_text("{", encoding="utf-8")
    with pytest.raises(HonelmError, match="inputs.json: unreadable .*delete it to resume without the check"):
        check_inputs(started, _cfg("corpus.txt"), False, print)


def test_a_teacher_and_a_reward_model_are_pinned_and_a_changed_teacher_refused(tmp_path: Path) -> None:
    """Models the run reads but does not train (a distillation teacher, a PPO/GRPO reward model) are inputs too:
    a teacher retrained in place under the same path must not silently teach the resumed half of a run."""
    for name in ("teacher", "rm"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text('{"v": 1}', encoding="utf-8")
    (tmp_path / "corpus.txt").write_text("one\n", encoding="utf-8")
    cfg = SimpleNamespace(data=SplitDataConfig(train=str(tmp_path / "corpus.txt")), model=ModelConfig(),
                          teacher=SimpleNamespace(model=str(tmp_path / "teacher"), tokenizer=""),
                          reward=SimpleNamespace(model=str(tmp_path / "rm")))
    run = tmp_path / "run"
    run.mkdir()
    record_inputs(run, cfg)
    pins = json.loads((run / PINS_FILE).read_text())["inputs"]
    assert sorted(pins) == ["data.train", "reward.model", "teacher.model"]
    (tmp_path / "teacher" / "config.json").write_text('{"v": 2}', encoding="utf-8")
    with pytest.raises(HonelmError, match=r"teacher.model: .*config.json has sha256"):
        check_inputs(run, cfg, False, print)


def test_python_reward_code_is_pinned_and_a_changed_checker_refused(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "mychecks.py").write_text("def right(prompt, response, row):\n    return 1.0\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.jsonl").write_text('{"prompt": "q"}\n', encoding="utf-8")
    cfg = SimpleNamespace(data=SplitDataConfig(train="p.jsonl"),
                          reward=SimpleNamespace(function="python:mychecks:right", checks=["0.5*python:mychecks:right",
                                                                                           "max_length:4"]))
    run = tmp_path / "run"
    run.mkdir()
    record_inputs(run, cfg)
    pins = json.loads((run / PINS_FILE).read_text())["inputs"]
    assert pins["reward.function"]["files"][0]["path"] == str(tmp_path / "mychecks.py")
    assert pins["reward.function"]["code"] and "reward.checks[0]" in pins and "reward.checks[1]" not in pins
    check_inputs(run, cfg, allow_changed=False, say=print)  # the same code passes
    (tmp_path / "mychecks.py").write_text("def right(prompt, response, row):\n    return 0.0\n", encoding="utf-8")
    with pytest.raises(HonelmError, match=r"reward.checks\[0\]: .*mychecks.py has sha256 .* but the run was trained"):
        check_inputs(run, cfg, allow_changed=False, say=print)


def test_a_model_that_does_not_resolve_is_named_by_its_key(tmp_path: Path) -> None:
    from honelm.pins import check_models
    cfg = SimpleNamespace(model=ModelConfig(init_from=str(tmp_path / "runs" / "gone")),
                          teacher=SimpleNamespace(model="", tokenizer=""))
    with pytest.raises(HonelmError, match=r"^model.init_from: .*gone: no such directory$"):
        check_models(cfg)
    cfg.model.init_from = ""
    cfg.teacher.model = "./nowhere/teacher"
    with pytest.raises(HonelmError, match=r"^teacher.model: \./nowhere/teacher: no such directory$"):
        check_models(cfg)
    cfg.teacher.model = "bert-base-uncased"  # a hub id: not checked here (it needs the network)
    check_models(cfg)
