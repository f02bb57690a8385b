"""`honelm reward` and `honelm dpo` (+ `test`) through the real CLI on the generated, separable preference set:
the reward model ranks it (> 0.9), DPO raises the implicit-reward accuracy and margin; LoRA with precomputed
reference log-probs; the outputs load with plain transformers / peft."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from honelm.data import splits as splits_mod
from tests.stages.conftest import FAST, cli, events

SCRATCH = ["model.size=test", "model.vocab_size=600", "data.max_length=96", "train.batch_size=16", *FAST]


def test_reward_model_ranks_separable_pairs_then_test(data_dir, tmp_path):
    looks = splits_mod.test_access_count()
    cli("reward", f"data.train={data_dir / 'preferences.jsonl'}", *SCRATCH, "train.max_steps=30", "train.eval_every=15",
        "train.lr=3e-3", f"run.out_dir={tmp_path}", "run.name=r")
    run = tmp_path / "r"
    train, last = events(run, "train"), events(run, "eval")[-1]
    assert train[-1]["loss"] < train[0]["loss"]
    assert {"accuracy", "margin", "reward_mean", "reward_chosen", "reward_rejected"} <= set(train[-1])
    assert last["val_accuracy"] > 0.9 and last["val_margin"] > 0
    assert {"val_reward_std", "val_reward_min", "val_reward_max"} <= set(last)
    assert splits_mod.test_access_count() == looks  # training never read the test split
    cli("test", str(run))
    assert splits_mod.test_access_count() == looks + 1
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert metrics["test_accuracy"] > 0.9 and metrics["n_pairs"] == 60
    # best/ is a plain one-output classifier whose pad id is the tokenizer's; it prefers the positive reply
    model = AutoModelForSequenceClassification.from_pretrained(run / "best").eval()
    tok = AutoTokenizer.from_pretrained(run / "best")
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
    prompt = [{"role": "user", "content": "how was the film ?"}]
    texts = [tok.apply_chat_template(prompt + [{"role": "assistant", "content": reply}], tokenize=False)
             for reply in ("the film was superb .", "the film was tedious .")]
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        good, bad = model(**batch).logits.squeeze(-1).tolist()
    assert good > bad


def test_dpo_raises_reward_accuracy_and_margin_then_test(data_dir, tmp_path):
    cli("dpo", f"data.train={data_dir / 'preferences.jsonl'}", *SCRATCH, "train.max_steps=24", "train.eval_every=4",
        "train.lr=3e-3", "train.warmup_steps=0", f"run.out_dir={tmp_path}", "run.name=d")
    run = tmp_path / "d"
    evals, train = events(run, "eval"), events(run, "train")
    assert evals[-1]["val_rewards_accuracy"] > 0.9
    assert evals[-1]["val_rewards_margin"] > evals[0]["val_rewards_margin"] > 0
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] < 0.6932  # log 2 = the loss when policy = reference
    assert {"rewards_chosen", "rewards_rejected", "logps_chosen", "logps_rejected"} <= set(train[-1])
    log = (run / "log.txt").read_text()
    assert "reference: a frozen copy" in log
    # from random init the reference exists on no disk: the run keeps it, so `honelm test` scores against it
    assert json.loads((run / "reference.json").read_text())["path"] == str((run / "reference").resolve())
    cli("test", str(run))
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert metrics["test_rewards_accuracy"] > 0.9 and metrics["test_rewards_margin"] > 0


def test_dpo_lora_with_precomputed_reference_from_a_pretrain_run(pretrained, data_dir, tmp_path):
    cli("dpo", f"data.train={data_dir / 'preferences.jsonl'}", f"model.init_from={pretrained}", "data.max_length=96",
        "train.batch_size=16", "train.max_steps=12", "train.eval_every=6", "train.lr=1e-2", "lora.enabled=true",
        "dpo.precompute_ref=true", "dpo.loss=hinge", f"run.out_dir={tmp_path}", "run.name=l", *FAST)
    run = tmp_path / "l"
    log = (run / "log.txt").read_text()
    assert "precomputed for" in log and "no reference model is kept" in log and "objective: hinge" in log
    evals = events(run, "eval")
    assert evals[-1]["val_rewards_margin"] > 0 and evals[-1]["val_loss"] < 1.0  # hinge: 1 at the start
    adapter = json.loads((run / "best" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str((pretrained / "best").resolve())  # = the reference
    assert json.loads((run / "reference.json").read_text()) == {"kind": "adapter_base"}
    cli("test", str(run))
    assert "test_rewards_accuracy" in json.loads((run / "test_metrics.json").read_text())


@pytest.mark.parametrize("probe_says", [None, "bf16"])
def test_precomputed_reference_uses_the_training_precision(data_dir, tmp_path, monkeypatch, probe_says):
    """precision=auto: fit's probe chooses first (its probe step runs on placeholder log-probs), then the reference
    is computed in that precision, so policy and reference agree at step 0 (loss ln 2, margins ~0). With the
    probe's choice forced to bf16, an fp32 reference would leave a bf16-rounding margin at step 0."""
    if probe_says:
        from honelm import runtime as rt

        monkeypatch.setattr(rt, "choose_precision", lambda requested, device, probe: (
            probe("fp32"), probe("bf16"), ("bf16", "bf16 autocast (forced by the test)"))[-1])
    cli("dpo", f"data.train={data_dir / 'preferences.jsonl'}", "model.size=test", "model.vocab_size=600",
        "data.max_length=96", "train.batch_size=16", "train.max_steps=2", "train.log_every=1", "train.lr=1e-9",
        "train.precision=auto", "train.progress=false", "train.tensorboard=false", "dpo.precompute_ref=true",
        f"run.out_dir={tmp_path}", "run.name=p")
    run = tmp_path / "p"
    chosen = next(e["message"] for e in events(run, "info") if e["message"].startswith("precision:"))
    precision = "bf16" if chosen.startswith("precision: bf16") else "fp32"
    log = (run / "log.txt").read_text()
    assert "pairs in" in log and f"({precision}, the training precision)" in log
    assert log.index("precision:") < log.index("reference: log-probs")  # chosen first, then used
    first = events(run, "train")[0]
    assert abs(first["loss"] - 0.6931) < 1e-3 and abs(first["rewards_margin"]) < 1e-3, first
    assert abs(first["rewards_chosen"]) < 1e-3 and abs(first["rewards_rejected"]) < 1e-3, first


# both DPO kill-and-resume tests are in the slow tier (12 s each); CI runs them in their own step (.ci/run)
@pytest.mark.parametrize("reference", [pytest.param([], marks=pytest.mark.slow),
                                       pytest.param(["dpo.precompute_ref=true"], marks=pytest.mark.slow)],
                         ids=["frozen-copy", "precomputed"])
def test_dpo_sigkill_then_resume_is_bit_identical(data_dir, tmp_path, reference):
    """The reference is rebuilt on resume (a frozen copy of the same start, or its log-probs precomputed again in the
    checkpoint's precision): the run ends as if never killed."""
    import signal

    from safetensors.torch import load_file

    from tests.stages.conftest import cli_subprocess

    args = ["dpo", f"data.train={data_dir / 'preferences.jsonl'}", *SCRATCH, "train.batch_size=8", "train.max_steps=6",
            "train.save_every=2", "train.eval_every=3", "train.lr=3e-3", f"run.out_dir={tmp_path}", *reference]
    cli(*args, "run.name=full")
    killed = cli_subprocess(*args, "run.name=cut", kill_at=3, check=False)
    assert killed.returncode == -signal.SIGKILL
    cli("dpo", "--resume", str(tmp_path / "cut"))
    a, b = (load_file(tmp_path / run / "checkpoints" / "step-00000006" / "model.safetensors")
            for run in ("full", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
