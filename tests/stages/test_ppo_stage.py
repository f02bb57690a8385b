"""`honelm ppo` end to end on a tiny pre-trained run (programmatic reward), its resume, and a LoRA run."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.stages.conftest import FAST, cli, events

PROMPTS = ["the film was", "the cast", "this movie", "the story was", "the ending", "the acting was", "the script",
           "the sequel", "the dialogue was", "the camera work", "i watched it", "the soundtrack was"]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return path


def ppo_args(pretrained, prompts_file, out, name, *extra: str) -> list[str]:
    return ["ppo", f"model.init_from={pretrained}", f"data.train={prompts_file}", "reward.function=contains:was",
            "ppo.rollout_batch=8", "ppo.ppo_epochs=2", "ppo.response_length=8", "train.batch_size=4",
            "train.max_steps=8", "train.lr=1e-3", "train.log_every=2", f"run.out_dir={out}", f"run.name={name}",
            *FAST, *extra]


def test_ppo_run_and_exact_resume(pretrained, prompts_file, tmp_path):
    cli(*ppo_args(pretrained, prompts_file, tmp_path, "a", "train.save_every=3", "train.keep_checkpoints=5"))
    run = tmp_path / "a"
    for name in ("config.yaml", "split_manifest.json", "best/config.json", "best/model.safetensors",
                 "best/tokenizer.json", "samples.jsonl", "rollouts/rollout-000000.pt"):
        assert (run / name).is_file(), name
    rollouts = events(run, "rollout")
    assert [r["rollout"] for r in rollouts] == [0, 1]  # 4 optimizer steps per rollout (2 epochs x 2 minibatches)
    assert {"score", "kl", "response_length", "non_score_reward", "ended"} <= set(rollouts[0])
    assert rollouts[0]["kl"] == pytest.approx(0.0, abs=1e-4)
    train = events(run, "train")
    assert {"pg_loss", "vf_loss", "clipfrac", "entropy", "approx_kl"} <= set(train[-1])
    assert {"val_score", "val_kl", "val_response_length"} <= set(events(run, "eval")[-1])
    sample = json.loads((run / "samples.jsonl").read_text().splitlines()[0])
    assert sample["prompt"] in PROMPTS and isinstance(sample["response"], str) and "score" in sample
    assert AutoModelForCausalLM.from_pretrained(run / "best") is not None  # the policy alone, plain transformers
    cli("report", str(run))  # the report plots the rollouts and the PPO update statistics
    report = (run / "report.md").read_text()
    assert "## PPO rollouts" in report and "plots/rollouts.png" in report and "plots/ppo.png" in report
    assert (run / "plots" / "rollouts.png").is_file() and (run / "plots" / "ppo.png").is_file()

    # resume from step 3 (mid-rollout: its minibatches come from the saved rollout) ends bit-identical
    copy = tmp_path / "b"
    shutil.copytree(run, copy)
    for later in ("step-00000006", "step-00000008"):
        shutil.rmtree(copy / "checkpoints" / later)
    cli("ppo", "--resume", str(copy))
    a = load_file(run / "checkpoints" / "step-00000008" / "model.safetensors")
    b = load_file(copy / "checkpoints" / "step-00000008" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_ppo_with_lora_and_k3(pretrained, prompts_file, tmp_path):
    cli(*ppo_args(pretrained, prompts_file, tmp_path, "lora", "lora.enabled=true", "lora.r=4", "ppo.kl_estimator=k3",
                  "train.lr=5e-3", "ppo.whiten_rewards=true", "reward.missing_eos_penalty=1.0"))
    run = tmp_path / "lora"
    assert (run / "best" / "adapter_config.json").is_file()
    rollouts = events(run, "rollout")
    assert rollouts[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # adapters start at B = 0: policy = reference
    assert rollouts[1]["kl"] >= 0.0  # k3 is never negative
    log = (run / "log.txt").read_text()
    assert "adapters disabled" in log


def test_ppo_config_errors(pretrained, prompts_file, tmp_path):
    from honelm.cli import main

    base = ppo_args(pretrained, prompts_file, tmp_path, "bad")
    assert main([a for a in base if not a.startswith("reward.function")]) == 1  # no reward at all
    assert main(base + ["ppo.rollout_batch=6"]) == 1  # not a multiple of the minibatch
    assert main(base + ["reward.function=length:3"]) == 1
