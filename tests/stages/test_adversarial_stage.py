"""Adversarial training through the real CLI: `classify` with every method, with and without LoRA, on
tiny presets (the log names the method, the training events carry adv_loss and delta_norm, the
best model loads); plae's teacher, stored embeddings and student; causal-LM `pretrain` and MLM
`adapt` with a method; `reward` and `dpo` (chosen and rejected perturbed alike, dpo's LoRA reference left clean);
and plae or neftune refused where they cannot apply."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from honelm.cli import main
from tests.stages.conftest import FAST, cli, events

SHORT = ["train.max_steps=8", "train.eval_every=4", "train.batch_size=16", "train.lr=2e-3", "data.max_length=32",
         "model.arch=encoder", "model.size=test", "model.vocab_size=400", *FAST]
METHODS = ["fgm", "pgd", "freelb", "smart", "r3f", "vat", "neftune", "plae"]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("method", METHODS)
def test_classify_with_each_method(method, lora, data_dir, tmp_path):
    extra = ["lora.enabled=true", "lora.r=4"] if lora else []
    cli("classify", f"data.train={data_dir / 'reviews.jsonl'}", f"adversarial.method={method}",
        f"run.out_dir={tmp_path}", "run.name=a", *extra, *SHORT)
    run = tmp_path / "a"
    log = (run / "log.txt").read_text()
    assert f"adversarial: {method} (" in log
    train = events(run, "train")
    assert train and all(r["adv_loss"] >= 0 and r["delta_norm"] > 0 for r in train)
    best = run / "best"
    assert (best / ("adapter_config.json" if lora else "model.safetensors")).is_file()
    assert f"method: {method}" in (run / "config.yaml").read_text()  # the effective config keeps the section
    if method == "plae":
        teacher = run / "plae_teacher"
        assert (teacher / "best").is_dir() and events(teacher, "train")
        stored = load_file(str(teacher / "adversarial_embeddings.safetensors"))
        n_train = json.loads((run / "split_manifest.json").read_text())["counts"]["train"]
        assert len(stored) == n_train  # one copy per training example
        assert "plae 3/3" in log


def test_adversarial_pretrain_and_mlm_adapt(data_dir, tmp_path):
    cli("pretrain", f"data.train={data_dir / 'corpus.txt'}", "model.size=test", "model.vocab_size=400",
        "data.block_size=32", "train.max_steps=6", "train.eval_every=3", "train.batch_size=8",
        "adversarial.method=r3f", "adversarial.epsilon=0.01", f"run.out_dir={tmp_path}", "run.name=p", *FAST)
    assert all(r["adv_loss"] >= 0 for r in events(tmp_path / "p", "train"))
    cli("adapt", f"data.train={data_dir / 'corpus.txt'}", "model.arch=encoder", "model.size=test",
        "model.vocab_size=400", "data.block_size=32", "train.max_steps=6", "train.eval_every=3", "train.batch_size=8",
        "adversarial.method=freelb", f"run.out_dir={tmp_path}", "run.name=m", *FAST)
    assert all(r["delta_norm"] > 0 for r in events(tmp_path / "m", "train"))


PAIRS = ["model.size=test", "model.vocab_size=600", "data.max_length=96", "train.batch_size=16",
         "train.max_steps=4", "train.eval_every=2", "train.log_every=1", "train.lr=3e-3", *FAST]


def test_reward_and_dpo_with_adversarial_training(data_dir, tmp_path, capsys):
    """A tiny reward run (fgm) and a tiny LoRA dpo run whose reference is the policy with its adapters off (pgd) train,
    validate, keep best/ and its per-pair records, and test; neftune is refused for a pairwise loss."""
    data = f"data.train={data_dir / 'preferences.jsonl'}"
    cli("reward", data, "adversarial.method=fgm", f"run.out_dir={tmp_path}", "run.name=r", *PAIRS)
    cli("dpo", data, "adversarial.method=pgd", "lora.enabled=true", "lora.r=4", f"run.out_dir={tmp_path}",
        "run.name=d", *PAIRS)
    for name, method in (("r", "fgm"), ("d", "pgd")):
        run = tmp_path / name
        assert f"adversarial: {method} (" in (run / "log.txt").read_text()
        train = events(run, "train")
        assert len(train) == 4 and all(r["adv_loss"] > 0 and r["delta_norm"] > 0 for r in train)
        assert (run / "best" / "val_predictions.jsonl").is_file()
        cli("test", str(run))
        assert (run / "test_predictions.jsonl").is_file()
    dpo_train = events(tmp_path / "d", "train")
    # step 1: the LoRA policy is its reference (B = 0), so the clean loss is log 2; the perturbed one is above it only
    # because the reference was not perturbed with the policy
    assert dpo_train[0]["loss"] == pytest.approx(0.693147, abs=1e-4) and dpo_train[0]["adv_loss"] > 0.6932
    code = main(["reward", data, "adversarial.method=neftune", f"run.out_dir={tmp_path}", *PAIRS])
    assert code != 0 and "adversarial.method=neftune does not apply to reward" in capsys.readouterr().err


def test_plae_outside_classify_and_unknown_fields_are_errors(data_dir, tmp_path, capsys):
    code = main(["pretrain", f"data.train={data_dir / 'corpus.txt'}", "model.size=test", "adversarial.method=plae",
                 f"run.out_dir={tmp_path}", *FAST])
    assert code != 0 and "works with classify only" in capsys.readouterr().err
    code = main(["classify", f"data.train={data_dir / 'reviews.jsonl'}", "adversarial.method=r3f",
                 "adversarial.steps=2", f"run.out_dir={tmp_path}", *SHORT])
    assert code != 0 and "adversarial.steps does not apply to method r3f" in capsys.readouterr().err


def test_plae_stop_while_the_teacher_saves_its_end_starts_no_student(data_dir, tmp_path, stop_during_checkpoint):
    """A Ctrl-C that lands while the finished teacher writes its final checkpoint cannot interrupt the
    teacher any more, but must still stop the command (exit 130) before the student starts;
    `--resume` then goes on with the stored embeddings and the student."""
    stop_during_checkpoint(8, under="plae_teacher")
    args = ["classify", f"data.train={data_dir / 'reviews.jsonl'}", "adversarial.method=plae",
            f"run.out_dir={tmp_path}", "run.name=a", *SHORT]
    assert main(args) == 130
    run = tmp_path / "a"
    assert [e["reason"] for e in events(run / "plae_teacher", "end")] == ["max_steps"]
    assert "stop requested while the final checkpoint was written" in (run / "plae_teacher" / "log.txt").read_text()
    log = (run / "log.txt").read_text()
    assert "plae 2/3" not in log and not events(run, "train")  # neither generation nor the student started
    stop_during_checkpoint.disarm()
    assert main(["classify", "--resume", str(run)]) == 0
    assert "plae 3/3" in (run / "log.txt").read_text()
    assert events(run, "end")[-1]["reason"] == "max_steps"
