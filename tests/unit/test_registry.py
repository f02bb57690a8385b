"""The registry is the one list of verbs: in sync with configs/ and the README, and open to a plug-in stage.

The plug-in test defines a stage here, in the test file alone, registers it, and runs it end to end
through the real CLI: train, `honelm test` once (a second look refused), `honelm report`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from honelm import registry
from honelm.cli import main
from honelm.config import ModelConfig, RunConfig, TrainConfig, section
from honelm.data.packing import PackedBlocks, pack
from honelm.data.sections import TextDataConfig
from honelm.data.sources import text_splits
from honelm.loop import BatchStream, Callback
from honelm.objectives.lm import CausalLM
from honelm.stages.contract import Plan, RunContext, Stage

ROOT = Path(__file__).resolve().parents[2]
FILE_VERBS = ("pipeline", "search", "ablate", "boost")  # configs/<verb>/ holds files of their own, not presets


def test_every_configs_folder_is_a_verb_with_a_config():
    for folder in sorted(p for p in (ROOT / "configs").iterdir() if p.is_dir()):
        assert folder.name in registry.VERBS, f"configs/{folder.name} names no verb"
        if folder.name not in FILE_VERBS:
            assert registry.has_config(folder.name), f"configs/{folder.name}: {folder.name} takes no config"


def test_every_training_stage_has_presets():
    for name in registry.training_verbs():
        assert registry.presets(name), f"{name} has no preset in configs/{name}/"


def test_readme_verb_table_lists_exactly_the_registry():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("| verb | what it does |")
    rows = []
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("| `"):
            break
        rows.append(re.match(r"\| `([a-z]+)` \|", line).group(1))  # type: ignore[union-attr]
    assert sorted(rows) == sorted(registry.VERBS), "README verb table and honelm.registry.VERBS differ"
    assert len(rows) == len(set(rows)), "a verb is listed twice in the README table"


def test_every_target_resolves():
    for v in registry.VERBS.values():
        if v.kind == "command":
            assert callable(registry.command(v.name)), v.name
        else:
            assert isinstance(registry.config_class(v.name), type), v.name
        if v.kind == "stage":
            assert issubclass(type(registry.stage(v.name)), Stage)
            assert registry.stage(v.name).name == v.name
            assert registry.config_class(v.name).verb == v.name  # the name the booster checks' messages use
            for part in registry.stage(v.name).report_sections:  # resolved only when a report is written
                assert callable(registry.resolve(part.build)), part.build


def test_callbacks_are_refused_where_nothing_trains():
    """A verb that trains no model cannot take callbacks: refused, never silently dropped."""
    cfg = registry.config_class("generate")()
    with pytest.raises(TypeError, match="trains nothing"):
        registry.run_verb("generate", cfg, callbacks=[Callback()])
    with pytest.raises(TypeError, match="runs no training"):
        main(["ls"], callbacks=[Callback()])


# ----------------------------------------------------------------------------------------------
# a plug-in stage, defined here and nowhere else


@dataclass
class ToyConfig:
    """A toy causal-LM stage that lives in a test file."""

    run: RunConfig = section(RunConfig)
    data: TextDataConfig = section(TextDataConfig)
    model: ModelConfig = section(ModelConfig)
    train: TrainConfig = section(TrainConfig)


class ToyStage(Stage):
    name = "toy"
    config = ToyConfig

    def splits(self, cfg: ToyConfig, say: Callable[[str], None], leak_texts: list[str] | None = None) -> Any:
        return text_splits(cfg.data, say, leak_texts)

    def plan(self, ctx: RunContext, loaded: Any) -> Plan:
        blocks = self.encode(ctx, ctx.splits.train, "train")
        val = self.encode(ctx, ctx.splits.val, "val")
        stream = BatchStream(len(blocks), blocks.collate, ctx.cfg.train.batch_size, 1, ctx.cfg.run.seed)
        return Plan(CausalLM(), stream, lambda m: self.score(ctx, m, val, "val"), metric="val_loss")

    def encode(self, ctx: RunContext, rows: list[Any], split: str) -> PackedBlocks:
        return pack(ctx.tokenizer, [d.text for d in rows], ctx.cfg.data.block_size)

    def score(self, ctx: RunContext, model: torch.nn.Module, data: PackedBlocks, split: str) -> dict[str, float]:
        batch = {k: v.to(ctx.device) for k, v in data.collate(list(range(len(data)))).items()}
        loss = CausalLM()(model, batch)
        return {f"{split}_loss": float(loss.value) / max(int(loss.units), 1)}


@pytest.fixture
def toy_registered():
    registry.register(registry.Verb("toy", "a plug-in stage from a test file", "stage", ToyStage))
    yield
    registry.unregister("toy")


def test_a_registered_stage_trains_tests_once_and_reports(toy_registered, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    corpus.write_text("\n".join(" ".join(words[(i + j) % 8] for j in range(6)) + f" {i}" for i in range(200)) + "\n")
    out = tmp_path / "runs"
    assert main(["toy", f"data.train={corpus}", "model.size=test", "model.vocab_size=300", "data.block_size=32",
                 "train.max_steps=6", "train.eval_every=3", "train.batch_size=4", "train.precision=fp32",
                 "train.progress=false", "train.tensorboard=false", f"run.out_dir={out}", "run.name=r"]) == 0
    run = out / "r"
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [e["val_loss"] for e in events if e["event"] == "eval"]
    assert len(evals) == 2 and all(math.isfinite(v) for v in evals)
    assert (run / "best" / "config.json").is_file() and (run / "split_manifest.json").is_file()
    assert json.loads((run / "run.json").read_text())["stage"] == "toy"

    assert main(["test", str(run)]) == 0
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert math.isfinite(metrics["test_loss"]) and metrics["look"] == 1
    assert main(["test", str(run)]) == 1  # the seal: a second look is refused
    assert "already evaluated" in capsys.readouterr().err

    assert main(["report", str(run)]) == 0
    report = (run / "report.md").read_text()
    assert "test_loss" in report and (run / "report.html").is_file()
