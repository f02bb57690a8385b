"""`honelm grpo` end to end on a tiny pre-trained run with answer-checking rewards: files, per-step metrics,
exact resume, `honelm test`; a LoRA run with Dr. GRPO's options; `honelm test` on a PPO run."""

from __future__ import annotations

import json
import shutil
import signal

import pytest
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.stages.conftest import FAST, cli, cli_subprocess, events

# prompts in the demo's review language, each with a reference answer: the word that should come next
PAIRS = [("the film was", "wonderful"), ("the cast was", "brilliant"), ("this movie was", "dull"),
         ("the story was", "moving"), ("the ending was", "clumsy"), ("the acting was", "superb"),
         ("the script was", "boring"), ("the sequel was", "awful"), ("the dialogue was", "clever"),
         ("the camera work was", "beautiful"), ("the soundtrack was", "charming"), ("the director's new work was", "fresh"),
         ("this documentary was", "touching"), ("the second half was", "tedious"), ("the film was not", "bland"),
         ("the cast was really", "funny"), ("the story was quite", "messy"), ("the ending was truly", "gripping"),
         ("the acting was rather", "shallow"), ("the script was genuinely", "delightful")]
REWARD = ["reward.function=label", "reward.checks=[0.5*contains:was, 0.1*max_length:6]"]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("grpo") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in PAIRS), encoding="utf-8")
    return path


def grpo_args(pretrained, prompts_file, out, name, *extra: str) -> list[str]:
    return ["grpo", f"model.init_from={pretrained}", f"data.train={prompts_file}", *REWARD, "grpo.group_size=4",
            "grpo.prompts_per_rollout=2", "grpo.response_length=6", "train.batch_size=4", "train.grad_accum=1",
            "train.max_steps=6", "train.lr=1e-3", "train.log_every=1", "train.eval_every=3", "train.eval_batch_size=8",
            f"run.out_dir={out}", f"run.name={name}", *FAST, *extra]


def test_grpo_run_resume_and_test(pretrained, prompts_file, tmp_path):
    cli(*grpo_args(pretrained, prompts_file, tmp_path, "a", "grpo.kl_coef=0.1", "train.save_every=3",
                   "train.keep_checkpoints=5", "train.max_steps=4"))
    run = tmp_path / "a"
    for name in ("best/config.json", "best/model.safetensors", "best/val_predictions.jsonl", "rollouts"):
        assert (run / name).exists(), name
    rollouts = events(run, "rollout")
    assert [r["rollout"] for r in rollouts] == [0, 1]  # 8 responses, minibatches of 4: 2 steps per rollout
    assert {"reward", "accuracy", "response_length", "zero_std_groups"} <= set(rollouts[0])
    train = events(run, "train")
    assert {"pg_loss", "kl", "clipfrac", "entropy"} <= set(train[-1]) and train[0]["kl"] == pytest.approx(0, abs=1e-5)
    evals = events(run, "eval")
    assert {"val_reward", "val_accuracy", "val_response_length"} <= set(evals[-1])
    assert json.loads((run / "best" / "best.json").read_text())["metric"] == "val_accuracy"
    assert AutoModelForCausalLM.from_pretrained(run / "best") is not None

    # resume from step 3 (mid-rollout: the second minibatch of rollout 1 comes from the saved rollout): bit-identical
    copy = tmp_path / "b"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints" / "step-00000004")
    cli("grpo", "--resume", str(copy))
    a = load_file(run / "checkpoints" / "step-00000004" / "model.safetensors")
    b = load_file(copy / "checkpoints" / "step-00000004" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)

    cli("test", str(run))
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert {"test_reward", "test_accuracy", "test_response_length"} <= set(metrics)
    cli("report", str(run))  # the reward curve and the update statistics
    assert "## GRPO rollouts" in (run / "report.md").read_text() and (run / "plots" / "grpo.png").is_file()
    predictions = [json.loads(x) for x in (run / "test_predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 2 and {"response", "reference", "sums"} <= set(predictions[0])
    assert predictions[0]["reference"] in {a for _, a in PAIRS}


@pytest.mark.slow
def test_grpo_sigkill_then_resume_is_bit_identical(pretrained, prompts_file, tmp_path):
    """A process SIGKILLed after step 3 (rollouts of 2 steps; its last checkpoint, step 2, is a rollout boundary,
    so rollout 1 is sampled again after the resume) ends bit-identical to an uninterrupted run."""
    args = ("train.save_every=2", "grpo.kl_coef=0.1", "train.threads=1")
    cli_subprocess(*grpo_args(pretrained, prompts_file, tmp_path, "full", *args))
    killed = cli_subprocess(*grpo_args(pretrained, prompts_file, tmp_path, "cut", *args), kill_at=3, check=False)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "cut" / "checkpoints" / "step-00000006").exists()
    cli_subprocess("grpo", "--resume", str(tmp_path / "cut"))
    a = load_file(tmp_path / "full" / "checkpoints" / "step-00000006" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "checkpoints" / "step-00000006" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    best = [(tmp_path / run / "best" / "best.json").read_text() for run in ("full", "cut")]
    assert best[0] == best[1]


def test_grpo_with_lora_dr_grpo_and_test(pretrained, prompts_file, tmp_path):
    cli(*grpo_args(pretrained, prompts_file, tmp_path, "lora", "lora.enabled=true", "lora.r=4", "train.max_steps=2",
                   "grpo.advantage_std=false", "grpo.length_norm=constant", "grpo.kl_coef=0.05", "train.eval_every=2"))
    run = tmp_path / "lora"
    assert (run / "best" / "adapter_config.json").is_file()
    assert "adapters disabled" in (run / "log.txt").read_text()
    cli("test", str(run))
    assert "test_accuracy" in json.loads((run / "test_metrics.json").read_text())


def test_honelm_test_on_a_ppo_run(pretrained, prompts_file, tmp_path):
    cli("ppo", f"model.init_from={pretrained}", f"data.train={prompts_file}", "data.split=8:1:1", *REWARD,
        "ppo.rollout_batch=4", "ppo.ppo_epochs=1", "ppo.response_length=6", "train.batch_size=4", "train.max_steps=2",
        "train.eval_every=2", f"run.out_dir={tmp_path}", "run.name=ppo", *FAST)
    cli("test", str(tmp_path / "ppo"))
    metrics = json.loads((tmp_path / "ppo" / "test_metrics.json").read_text())
    assert {"test_reward", "test_accuracy"} <= set(metrics) and 0 <= metrics["test_accuracy"] <= 1
    assert (tmp_path / "ppo" / "test_predictions.jsonl").is_file()


def test_grpo_config_and_data_errors(pretrained, prompts_file, tmp_path):
    from honelm.cli import main

    base = grpo_args(pretrained, prompts_file, tmp_path, "bad")
    assert main(base + ["grpo.group_size=1"]) == 1
    assert main(base + ["reward.function=numeric"]) != 0  # the answers are words: the prompt file's row is named
