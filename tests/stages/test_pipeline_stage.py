"""`honelm pipeline`: tokenizer → pretrain → ppo (programmatic reward) → export chained by named outputs;
finished stages skipped, an interrupted stage resumed bit-identically, stale results and changed settings
refused, bad files named with their line; the shipped pipeline files plan (every config builds)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from honelm.cli import main
from honelm.errors import HonelmError
from honelm.pipeline import load, plan
from tests.stages.conftest import FAST, events

ROOT = Path(__file__).resolve().parents[2]


def pipeline_yaml(out: Path, data: Path, prompts: Path, lr: str = "1e-3") -> str:
    fast = "\n".join(f"      {k}: {v}" for k, v in (x.split("=") for x in FAST))
    return f"""# honelm pipeline test.yaml
out_dir: {out}
vars:
  corpus: {data / 'corpus.txt'}
stages:
  - name: tok
    verb: tokenizer
    set:
      data.train: "${{vars.corpus}}"
      tokenizer.vocab_size: 400
  - name: pre
    verb: pretrain
    set:
      data.train: "${{vars.corpus}}"
      model: {{tokenizer: "${{tok}}", size: test}}
      data.block_size: 32
      train: {{max_steps: 10, eval_every: 0, lr: 3e-3, batch_size: 8}}
{fast}
  - name: rl
    verb: ppo
    set:
      data.train: {prompts}
      model.init_from: "${{pre}}"
      reward.function: "contains:was"
      ppo: {{rollout_batch: 8, ppo_epochs: 2, response_length: 8}}
      train: {{batch_size: 4, max_steps: 8, save_every: 4, keep_checkpoints: 3, lr: {lr}}}
{fast}
  - name: copy
    verb: export
    args: ["${{rl}}", --out, "${{out_dir}}/exported", --overwrite]
    output: "${{out_dir}}/exported"
"""


def test_pipeline_runs_skips_resumes_and_refuses_changes(data_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the film was\nthe cast\nthis movie\nthe story was\nthe ending\nthe acting was\n")
    out = tmp_path / "runs"
    yaml_path = tmp_path / "p.yaml"
    yaml_path.write_text(pipeline_yaml(out, data_dir, prompts))

    assert main(["pipeline", str(yaml_path), "--dry-run"]) == 0
    assert "$ honelm tokenizer" in capsys.readouterr().out and not out.exists()

    assert main(["pipeline", str(yaml_path)]) == 0
    for name in ("tok/tokenizer/tokenizer.json", "pre/best/model.safetensors", "rl/best/model.safetensors",
                 "exported/model.safetensors", ".pipeline/copy.json"):
        assert (out / name).is_file(), name
    config = (out / "rl" / "config.yaml").read_text()
    assert f"init_from: {out / 'pre'}" in config  # ${pre} became the pretrain stage's run directory
    final = load_file(out / "rl" / "checkpoints" / "step-00000008" / "model.safetensors")
    capsys.readouterr()

    # a second run skips every finished stage
    assert main(["pipeline", str(yaml_path)]) == 0
    text = capsys.readouterr().out
    assert text.count("finished earlier, skipped") == 4 and "$ honelm" not in text

    # the ppo stage "killed" after its step-4 checkpoint: the pipeline resumes it and ends bit-identical
    shutil.rmtree(out / "rl" / "checkpoints" / "step-00000008")
    metrics = out / "rl" / "metrics.jsonl"
    metrics.write_text("".join(line + "\n" for line in metrics.read_text().splitlines()
                               if json.loads(line)["event"] not in ("end", "checkpoint")))
    (out / ".pipeline" / "copy.json").unlink()
    assert main(["pipeline", str(yaml_path)]) == 0
    text = capsys.readouterr().out
    assert "rl: resuming" in text and f"--resume {out / 'rl'}" in text and "copy: running" in text
    again = load_file(out / "rl" / "checkpoints" / "step-00000008" / "model.safetensors")
    assert all((again[k] == final[k]).all() for k in final)
    assert events(out / "rl", "end")[-1]["reason"] == "max_steps"

    # an input redone after a stage ran makes that stage stale: refused, not silently kept
    shutil.rmtree(out / "pre")
    assert main(["pipeline", str(yaml_path)]) == 1
    captured = capsys.readouterr()
    assert "pre: running" in captured.out and "stage 'rl' ran on an older result of 'pre'" in captured.err

    # asking for other settings than the finished run had is refused, naming the keys
    yaml_path.write_text(pipeline_yaml(out, data_dir, prompts, lr="5e-4"))
    assert main(["pipeline", str(yaml_path)]) == 1
    err = capsys.readouterr().err
    assert "stage 'rl'" in err and "train.lr" in err and f"delete {out / 'rl'}" in err


@pytest.mark.parametrize("body, message", [
    ("out_dir: x\nstages:\n  - verb: pretrian\n", r"p.yaml:3: stages\[0\].verb: 'pretrian' is not a honelm verb; did you mean 'pretrain'"),
    ("out_dir: x\nstages:\n  - verb: pretrain\n    set: {model.init_from: '${ppo}'}\n  - verb: ppo\n",
     r"p.yaml:3: stage 'pretrain' set.model.init_from: \$\{ppo\} names a stage that runs later"),
    ("out_dir: x\nstages:\n  - verb: pretrain\n    set: {train.lrr: 1}\n", r"p.yaml:3: stage 'pretrain' \(pretrain\): unknown config key 'train.lrr'"),
    ("out_dir: x\nstages:\n  - verb: pretrain\n  - verb: pretrain\n", r"p.yaml:4: stages\[1\].name: 'pretrain' is used"),
    ("out_dir: x\nstages:\n  - verb: chat\n", "cannot run inside a pipeline"),
    ("out_dir: x\nstages:\n  - verb: tokenizer\n    sett: {}\n", r"unknown field\(s\) sett"),
    ("stages: []\n", "out_dir"),
])
def test_bad_pipeline_files_name_file_line_and_field(tmp_path, body, message):
    path = tmp_path / "p.yaml"
    path.write_text(body)
    with pytest.raises(HonelmError, match=message):
        plan(load(path))


@pytest.mark.parametrize("name", ["demo.yaml", "shakespeare-alpaca-dpo.yaml"])
def test_shipped_pipelines_plan(name):
    data = {"shakespeare": "/data/tinyshakespeare", "alpaca": "/data/alpaca", "dpo": "/data/dpo"}  # its --var
    pipe = load(ROOT / "configs" / "pipeline" / name, data if name.startswith("shakespeare") else None)
    steps = plan(pipe)  # every stage's config builds and validates
    verbs = [s.stage.verb for s in steps]
    assert verbs[-1] in ("dpo", "ppo") and "sft" in verbs and "pretrain" in verbs
    sft = next(s for s in steps if s.stage.verb == "sft")
    assert sft.config.model.init_from == str(pipe.out_dir / "pretrain")


@pytest.mark.parametrize("code, raised", [(130, KeyboardInterrupt), (1, SystemExit)])
def test_the_demo_stops_as_interrupted_when_a_step_was(tmp_path, monkeypatch, code, raised):
    """A step that exits 130 (Ctrl-C, its checkpoint saved) ends `honelm demo` as interrupted (exit 130
    from the CLI), not as a failed step; any other non-zero exit is a failure."""
    import honelm.cli
    from honelm.demo import main as demo

    calls = []
    monkeypatch.setattr(honelm.cli, "main", lambda words: calls.append(words) or code)
    with pytest.raises(raised):
        demo(["--out", str(tmp_path)])
    assert [c[0] for c in calls] == ["tokenizer"]  # nothing ran after the stopped step
