"""Config machinery: docs, overrides with type checks, did-you-mean, YAML round trip, shipped presets."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from honelm import config as C
from honelm import registry
from honelm.cli import main
from honelm.registry import VERBS, find_config
from honelm.errors import ConfigError
from honelm.pipeline import PipelineConfig
from honelm.protocol.ablate import AblateConfig
from honelm.protocol.search import SearchConfig
from honelm.stages.classify import ClassifyConfig
from honelm.stages.pretrain import PretrainConfig

ROOT = Path(__file__).resolve().parents[2]
FILE_VERBS = {"pipeline": PipelineConfig, "search": SearchConfig, "ablate": AblateConfig}  # verbs that read a spec file


def test_every_field_has_a_doc():
    classes = [registry.config_class(v.name) for v in VERBS.values() if v.module]
    assert PretrainConfig in classes and ClassifyConfig in classes
    classes += FILE_VERBS.values()  # with their sections: stages[].verb, space.<key>.low, variants.<key>.before[].name
    for cls in classes:
        for key, _tp, _default, doc in C.describe(cls):
            assert doc, f"{cls.__name__}.{key} has no docstring"


def test_overrides_are_typed():
    cfg = C.build(PretrainConfig, overrides=["train.lr=3e-4", "train.batch_size=8", "train.progress=false",
                                             "model.arch=encoder", "data.block_size=128"])
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.batch_size == 8 and cfg.train.progress is False
    assert cfg.model.arch == "encoder" and cfg.data.block_size == 128


@pytest.mark.parametrize("override, message", [
    ("train.batch_size=eight", "expected an integer"),
    ("train.lr=fast", "expected a number"),
    ("train.progress=maybe", "expected true or false"),
    ("model.arch=decodr", "did you mean 'decoder'"),
    ("train.learning_rate=1e-3", "unknown config key .train.learning_rate.; did you mean .train.lr."),
    ("trian.lr=1e-3", "did you mean"),
    ("train.lr", "expected key=value"),
])
def test_bad_overrides_fail_clearly(override, message):
    with pytest.raises(ConfigError, match=message):
        C.build(PretrainConfig, overrides=[override])


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'train.batch_size'"):
        C.build(PretrainConfig, overrides=["train.batchsize=3"])


def test_yaml_round_trip(tmp_path):
    cfg = C.build(ClassifyConfig, overrides=["train.lr=0.01", "data.pair_field=hypothesis", "run.seed=7"])
    C.dump(cfg, tmp_path / "c.yaml", header="# honelm classify --config c.yaml")
    again = C.build(ClassifyConfig, tmp_path / "c.yaml")
    assert again == cfg


def test_yaml_unknown_key_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*did you mean 'train.lr'"):
        C.build(PretrainConfig, path)


def example_vars(path: Path) -> dict[str, str]:
    """A value for every variable the file declares without a default (what --var would give)."""
    declared = C.declared_vars((yaml.safe_load(path.read_text()) or {}).get("vars"), path)
    return {name: f"/data/{name}" for name, var in declared.items() if var.default is None}


def test_shipped_presets_validate_and_start_with_their_command():
    presets = sorted((ROOT / "configs").glob("*/*.yaml"))
    assert presets
    for path in presets:
        stage = path.parent.name
        verb = VERBS[stage]
        if stage in ("pipeline", "search", "ablate", "boost"):  # files of their own verbs, not config presets
            assert path.read_text().startswith(f"# honelm {stage} configs/{stage}/{path.name}\n"), path
            if stage == "search":
                from honelm.protocol.search import load_spec

                base = yaml.safe_load(path.read_text())
                preset = find_config(base["verb"], base["config"]) if base.get("config") else None
                # checks every key of the space and builds the config at its corners
                load_spec(path, variables=example_vars(preset) if preset else None)
            elif stage == "ablate":
                from honelm.protocol.ablate import load_spec as load_ablation

                load_ablation(path, example_vars(path))  # builds every cell's configs
            elif stage == "boost":
                from honelm.protocol.boost import load_config as load_boost

                load_boost(str(path), [])  # every field checked (the task's settings are checked when it runs)
                assert find_config("boost", path.stem).resolve() == path.resolve()  # `honelm boost NAME` finds it
            continue
        cls = registry.config_class(verb.name)
        C.build(cls, path, variables=example_vars(path))
        assert path.read_text().startswith(f"# honelm {stage} "), path
        assert find_config(stage, path.stem) is not None


def test_help_lists_every_field(capsys):
    for verb in VERBS.values():
        if verb.module:
            assert main([verb.name, "--help"]) == 0
            out = capsys.readouterr().out
            cls = registry.config_class(verb.name)
            for key, tp, default, _doc in C.describe(cls):
                assert f"{key}: {tp} = {default}" in out


def test_help_of_the_file_verbs_lists_the_fields_of_their_file(capsys):
    for verb, cls in FILE_VERBS.items():
        with pytest.raises(SystemExit) as stop:  # argparse's --help, after its own options
            main([verb, "--help"])
        assert stop.value.code == 0
        out = capsys.readouterr().out
        assert "--out-dir" in out or "--dry-run" in out
        for key, tp, default, _doc in C.describe(cls):
            assert f"{key}: {tp} = {default}" in out


def test_top_level_help_and_ls_list_verbs(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert main(["ls"]) == 0
    out_ls = capsys.readouterr().out
    for name in ("tokenizer", "pretrain", "classify", "test", "generate", "report", "ls"):
        assert name in out and name in out_ls


def test_unknown_verb_suggests(capsys):
    assert main(["pretrian"]) == 2
    assert "did you mean 'pretrain'" in capsys.readouterr().err


def test_a_closed_pipe_ends_quietly():
    """`honelm classify --help | head`, when the reader has gone before the help is written: no BrokenPipeError
    traceback, exit 1 (the output was cut). `true` exits at once, long before the interpreter has imported
    honelm, so the write always meets a closed pipe (with `head` it may fit in the pipe's buffer first)."""
    import subprocess
    import sys
    proc = subprocess.run(f"'{sys.executable}' -m honelm classify --help | true; "
                          "echo rc=${PIPESTATUS[0]}", shell=True, executable="/bin/bash", capture_output=True, text=True)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr
    assert proc.stdout.strip() == "rc=1"
