"""`honelm dpo` with KTO, ORPO and SimPO through the real CLI, each on preference data in another shipped format:
KTO on unpaired {prompt, completion, label} rows, ORPO on hh-rlhf dialogue text, SimPO on whole message lists. Each
trains (its validation accuracy and margin rise), ORPO and SimPO without any reference model, and `honelm test` scores
best/ (KTO with LoRA: its reference is the adapter-disabled policy). An ablation and kill-and-resume (KTO, reference
log-probs precomputed) in the slow tier."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from honelm.data.preferences import read_pairs
from tests.stages.conftest import FAST, cli, events

SCRATCH = ["model.size=test", "model.vocab_size=600", "data.max_length=96", "train.batch_size=16",
           "train.warmup_steps=0", "train.lr=3e-3", *FAST]


def shipped(data_dir: Path, out: Path, kind: str) -> Path:
    """The generated pairs rewritten as a shipped format: unpaired rows, hh-rlhf text or message lists."""
    lines = []
    pairs = read_pairs(str(data_dir / "preferences.jsonl"))[:300]  # {prompt, ...} and ShareGPT rows alike; half: faster
    for i, row in enumerate(pairs):
        p = row.pair
        replies = {"chosen": p.chosen, "rejected": p.rejected}
        if kind == "unpaired":  # truly unpaired: one reply of each pair, chosen and rejected in turn
            lines.append({"prompt": p.prompt, "completion": p.chosen if i % 2 else p.rejected, "label": bool(i % 2)})
        elif kind == "hh":
            lines.append({k: f"\n\nHuman: {p.prompt[0]['content']}\n\nAssistant: {v}" for k, v in replies.items()})
        else:
            lines.append({k: p.prompt + [{"role": "assistant", "content": v}] for k, v in replies.items()})
    path = out / f"{kind}.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return path


# simpo's run is in the slow tier (the default suite's time): its stage path is orpo's (ReferenceFree), its loss and
# the message-list format are unit-tested (tests/unit/test_preference_losses.py, test_preference_formats.py)
@pytest.mark.parametrize("loss, kind, extra", [("kto", "unpaired", ["lora.enabled=true", "train.lr=1e-2"]),
                                               ("orpo", "hh", []),
                                               pytest.param("simpo", "messages", [], marks=pytest.mark.slow)])
def test_new_losses_train_on_shipped_formats_then_test(data_dir, tmp_path, loss, kind, extra):
    data = shipped(data_dir, tmp_path, kind)
    cli("dpo", f"data.train={data}", *SCRATCH, "train.max_steps=4", "train.eval_every=2", f"dpo.loss={loss}", *extra,
        f"run.out_dir={tmp_path}", "run.name=r")
    run = tmp_path / "r"
    evals, log = events(run, "eval"), (run / "log.txt").read_text()
    assert f"objective: {loss} loss" in log
    assert evals[-1]["val_rewards_margin"] > evals[0]["val_rewards_margin"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    if loss == "kto":
        counts = re.search(r"data: (\d+) train examples \((\d+) desirable, (\d+) undesirable\)", log)
        assert counts and int(counts[1]) == int(counts[2]) + int(counts[3]) and min(int(counts[2]), int(counts[3])) > 100
        # LoRA: the reference is the adapter-disabled policy, recorded as the adapter's base for `honelm test`
        assert "reference: the policy with its LoRA adapters disabled" in log
        assert json.loads((run / "reference.json").read_text()) == {"kind": "adapter_base"}
        assert (run / "best" / "adapter_config.json").is_file()
    else:  # no reference model is made, copied, stored or recorded
        assert "no reference model" in log and "reference:" not in log and not (run / "reference.json").exists()
        assert "data: 240 train pairs" in log
    records = [json.loads(x) for x in (run / "best" / "val_predictions.jsonl").read_text().splitlines()]
    assert {"rewards_accuracy", "rewards_margin", "loss"} <= set(records[0]["sums"])
    cli("test", str(run))
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert 0 <= metrics["test_rewards_accuracy"] <= 1 and metrics["n_examples" if loss == "kto" else "n_pairs"] > 0


@pytest.mark.slow
def test_a_loss_ablation_compares_kto_on_implicit_reward_accuracy(data_dir, tmp_path):
    from honelm.protocol import ablate

    data = shipped(data_dir, tmp_path, "unpaired")
    settings = {"data.train": str(data), "dpo.loss": "kto", "model.size": "test", "model.vocab_size": 600,
                "data.max_length": 96, "train.batch_size": 16, "train.lr": 3e-3, "train.max_steps": 4,
                "train.eval_every": 2, **{k: v for k, v in (a.split("=") for a in FAST)}}
    spec = {"out_dir": str(tmp_path / "ablation"), "seeds": 1, "bootstrap": 200, "search": "none",
            "stages": [{"name": "dpo", "verb": "dpo", "set": settings}],
            "variants": {"heavy_down": {"set": {"dpo.kto_undesirable_weight": 1.33}}}}
    (tmp_path / "ablation.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    assert ablate.load_spec(tmp_path / "ablation.yaml").metric == "rewards_accuracy"
    cli("ablate", str(tmp_path / "ablation.yaml"))
    results = json.loads((tmp_path / "ablation" / "results.json").read_text())
    assert results["complete"] and {r["variant"] for r in results["rows"]} == {"baseline", "heavy_down"}
    cell = json.loads((tmp_path / "ablation" / "cells" / "heavy_down" / "seed-0" / "cell.json").read_text())
    assert set(cell["units"]) == {1} and {"rewards", "kl", "rewards_accuracy"} <= set(cell["sums"])  # per example


@pytest.mark.slow
def test_kto_sigkill_then_resume_is_bit_identical(data_dir, tmp_path):
    """KTO with precomputed reference log-probs (its KL rows' too): killed at step 3, resumed, ends as if never killed."""
    import signal

    import torch
    from safetensors.torch import load_file

    from tests.stages.conftest import cli_subprocess

    data = shipped(data_dir, tmp_path, "unpaired")
    args = ["dpo", f"data.train={data}", *SCRATCH, "train.batch_size=8", "train.max_steps=6", "train.save_every=2",
            "train.eval_every=3", "dpo.loss=kto", "dpo.precompute_ref=true", f"run.out_dir={tmp_path}"]
    cli(*args, "run.name=full")
    killed = cli_subprocess(*args, "run.name=cut", kill_at=3, check=False)
    assert killed.returncode == -signal.SIGKILL
    cli("dpo", "--resume", str(tmp_path / "cut"))
    a, b = (load_file(tmp_path / run / "checkpoints" / "step-00000006" / "model.safetensors") for run in ("full", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
