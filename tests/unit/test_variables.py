"""Variables in preset, pipeline and ablation files: `vars:` declares them, ${vars.NAME} uses them, --var NAME=VALUE
gives them; a missing one is an error that says what to pass and where to get the data."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from honelm import config as C
from honelm import registry
from honelm.cli import main
from honelm.errors import ConfigError
from honelm.pipeline import plan
from honelm.protocol import ablate, boost
from honelm.stages.classify import ClassifyConfig

ROOT = Path(__file__).resolve().parents[2]
PRESET = """vars:
  data:
    description: a folder holding reviews.jsonl
    source: https://example.org/reviews.zip
  size: test
data:
  train: ${vars.data}/reviews.jsonl
  val: ${vars.data}/dev.jsonl
model:
  size: ${vars.size}
"""


def test_a_shipped_real_data_preset_without_its_variable_says_what_to_pass_and_where_to_get_it(capsys):
    assert main(["classify", "--config", "sst2-minilm"]) == 1
    err = capsys.readouterr().err
    assert "configs/classify/sst2-minilm.yaml needs --var data=VALUE" in err
    assert "train.tsv and dev.tsv" in err and "https://dl.fbaipublicfiles.com/glue/data/SST-2.zip" in err
    assert "used by data.train, data.test" in err and "Traceback" not in err
    cfg = registry.build_config("classify", "sst2-minilm", [], {"data": "/d/sst2"})
    assert (cfg.data.train, cfg.data.test) == ("/d/sst2/train.tsv", "/d/sst2/dev.tsv")


def test_every_shipped_preset_names_its_data_through_a_variable():
    for path in sorted((ROOT / "configs").glob("*/*.yaml")):
        text = path.read_text()
        body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith(("#", "source:")))
        assert "shared/data" not in body, f"{path}: name the data through vars (see docs/presets.md)"


def test_defaults_given_values_and_overridden_keys(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(PRESET)
    cfg = C.build(ClassifyConfig, path, variables={"data": "/d"})
    assert (cfg.data.train, cfg.data.val, cfg.model.size) == ("/d/reviews.jsonl", "/d/dev.jsonl", "test")
    # every key that uses the variable given on the command line: the variable is not needed
    cfg = C.build(ClassifyConfig, path, ["data.train=a.jsonl", "data.val=b.jsonl"])
    assert (cfg.data.train, cfg.data.val) == ("a.jsonl", "b.jsonl")
    with pytest.raises(ConfigError, match=r"needs --var data=VALUE\n  --var data=VALUE: a folder holding "
                                          r"reviews.jsonl; get it from https://example.org/reviews.zip; used by "
                                          r"data.val$"):
        C.build(ClassifyConfig, path, ["data.train=a.jsonl"])
    with pytest.raises(ConfigError, match=r"--var dta: not among the file's vars \(data, size\)"):
        C.build(ClassifyConfig, path, variables={"dta": "/d"})
    with pytest.raises(ConfigError, match="give --config"):
        C.build(ClassifyConfig, None, variables={"data": "/d"})
    path.write_text("data:\n  train: ${vars.data}/x.jsonl\n")
    with pytest.raises(ConfigError, match=r"data.train: \$\{vars.data\} is not declared under vars \(none\)"):
        C.build(ClassifyConfig, path)


def test_the_command_line_passes_var_and_refuses_it_on_resume(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text(PRESET)
    for name in ("reviews.jsonl", "dev.jsonl"):
        (tmp_path / name).write_text('{"text": "good", "label": "pos"}\n')
    assert main(["classify", "--config", str(path), f"--var=data={tmp_path}", "--dry-run",
                 f"run.out_dir={tmp_path / 'runs'}"]) == 0
    assert "every input exists" in capsys.readouterr().out
    assert main(["classify", "--config", str(path), "--var"]) == 1
    assert "--var needs NAME=VALUE" in capsys.readouterr().err
    assert main(["classify", "--resume", str(tmp_path), "--var", "data=/d"]) == 1
    assert "overrides are not allowed" in capsys.readouterr().err


def test_a_pipeline_without_its_variables_names_each_with_its_source(capsys):
    path = ROOT / "configs" / "pipeline" / "shakespeare-alpaca-dpo.yaml"
    assert main(["pipeline", str(path), "--dry-run", "--var", "alpaca=/d"]) == 1
    err = capsys.readouterr().err
    assert "needs --var shakespeare=VALUE --var dpo=VALUE" in err
    assert "karpathy/char-rnn" in err and "dpo_en_demo.json" in err and "alpaca=VALUE" not in err


def test_boost_gives_its_vars_to_the_task_preset_and_to_every_cell(tmp_path):
    path = tmp_path / "task.yaml"
    path.write_text(PRESET)
    cfg = boost.load_config(None, [("out_dir", str(tmp_path / "b")), ("config", str(path)), ("methods", "[fgm]")],
                            {"data": "/d"})
    mapping, not_tried = boost.ablation(cfg)
    assert mapping["stages"][0]["args"] == ["--var", "data=/d"] and not_tried == {}
    (tmp_path / "ablation.yaml").write_text(yaml.safe_dump(mapping))
    spec = ablate.load_spec(tmp_path / "ablation.yaml")  # every cell's config builds, the preset given its var
    built = plan(ablate.cell_pipeline(spec, spec.variants[-1], 0))[-1].config
    assert (built.data.train, built.adversarial.method) == ("/d/reviews.jsonl", "fgm")
    with pytest.raises(ConfigError, match="needs --var data=VALUE"):
        boost.ablation(boost.load_config(None, [("out_dir", str(tmp_path / "b")), ("config", str(path))]))
