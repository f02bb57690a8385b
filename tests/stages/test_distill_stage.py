"""`honelm distill` through the real CLI: a decoder teacher teaches an encoder student with its own tokenizer, the
teacher's outputs cached and reused, kill-and-resume bit-identical, regression, LoRA on the student, clear refusals."""

from __future__ import annotations

import json
import random
import signal
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from honelm.cli import main
from honelm.predictions import read_records
from tests.stages.conftest import FAST, cli, cli_subprocess, events

SHORT = ["train.eval_every=10", "train.batch_size=16", "data.max_length=32", *FAST]


@pytest.fixture(scope="module")
def keywords(tmp_path_factory) -> Path:
    """400 texts whose label is decided by one sentiment word among fillers: a task a test-size model learns in
    a few dozen steps, so what the student takes from the teacher is visible."""
    rng = random.Random(0)
    filler = "the film plot cast was a scene music story actor and it with very this that its long short old new".split()
    words = {"positive": ["great", "superb", "lovely", "wonderful"], "negative": ["awful", "dull", "boring", "poor"]}
    path = tmp_path_factory.mktemp("kw") / "kw.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(400):
            label = "positive" if i % 2 else "negative"
            text = [rng.choice(filler) for _ in range(rng.randint(5, 9))]
            text.insert(rng.randrange(len(text) + 1), rng.choice(words[label]))
            handle.write(json.dumps({"text": " ".join(text), "label": label}) + "\n")
    return path


@pytest.fixture(scope="module")
def teacher(keywords, tmp_path_factory) -> Path:
    """An encoder classifier trained from scratch (its own WordPiece tokenizer) on the keyword task."""
    out = tmp_path_factory.mktemp("teacher")
    cli("classify", f"data.train={keywords}", "model.arch=encoder", "model.size=test", "model.vocab_size=200",
        "train.max_steps=60", "train.lr=3e-3", "train.warmup_ratio=0", f"run.out_dir={out}", "run.name=t", *SHORT)
    return out / "t"


def test_cross_tokenizer_distillation_then_test(teacher, keywords, tmp_path):
    # an encoder teacher (WordPiece) teaches a decoder student (byte-level BPE trained on the transfer text)
    cli("distill", f"data.train={keywords}", f"teacher.model={teacher}", "model.arch=decoder", "model.size=test",
        "model.vocab_size=300", "distill.alpha=0", "augment.copies=2", "train.max_steps=40", "train.lr=3e-3",
        "train.warmup_ratio=0", f"run.out_dir={tmp_path}", "run.name=s", *SHORT)
    run = tmp_path / "s"
    record = json.loads((run / "transfer_set.json").read_text())
    assert record["train"] == 320 and record["augmented"]["candidates"] == 640
    assert record["total"] == 320 + record["augmented"]["kept"]
    logits = load_file(run / "teacher" / "logits.safetensors")
    assert logits["transfer"].shape == (record["total"], 2) and logits["val"].shape == (40, 2)
    # teacher and student have different tokenizers: the teacher's WordPiece (whose mask token augmentation used)
    student_tok, teacher_tok = AutoTokenizer.from_pretrained(run / "best"), AutoTokenizer.from_pretrained(teacher / "best")
    assert len(student_tok) != len(teacher_tok) and student_tok.mask_token is None
    assert teacher_tok.mask_token == "[MASK]"
    train = events(run, "train")
    assert {"kd", "ce", "agreement"} <= set(train[-1]) and train[-1]["kd"] < train[0]["kd"]
    teacher_val = json.loads((run / "teacher_scores.json").read_text())
    teacher_best = json.loads((teacher / "best" / "best.json").read_text())
    assert teacher_val["teacher_val_accuracy"] == pytest.approx(teacher_best["val_accuracy"], abs=1e-6)
    # with alpha=0 the student learns only the teacher: its validation predictions follow the teacher's
    student_val = read_records(run / "best" / "val_predictions.jsonl")
    agree = sum(r["pred"] == int(t) for r, t in zip(student_val, logits["val"].argmax(-1))) / len(student_val)
    assert agree >= 0.75, agree
    model = AutoModelForSequenceClassification.from_pretrained(run / "best")
    assert model.config.id2label == {0: "negative", 1: "positive"}
    cli("test", str(run))
    metrics = json.loads((run / "test_metrics.json").read_text())
    test = read_records(run / "test_predictions.jsonl")
    assert len(test) == 40 and sum(r["gold"] == r["pred"] for r in test) / 40 == pytest.approx(metrics["test_accuracy"])
    # the split is classify's for the same data settings: the same sealed test split as the teacher's
    assert (json.loads((run / "split_manifest.json").read_text())["hashes"]
            == json.loads((teacher / "split_manifest.json").read_text())["hashes"])


def _args(keywords, teacher, out, name):
    return ["distill", f"data.train={keywords}", f"teacher.model={teacher}", f"model.tokenizer={teacher}",
            "model.arch=encoder", "model.size=test", "model.dropout=0.1", "augment.copies=1",
            "train.max_steps=12", "train.save_every=4", "train.eval_every=4", "train.batch_size=8", "train.lr=1e-3",
            "train.threads=1", "data.max_length=48", f"run.out_dir={out}", f"run.name={name}", *FAST]


@pytest.mark.slow  # CI runs it in its own step (.ci/run); kept out of the 3-minute default suite
def test_kill_and_resume_is_bit_identical_and_the_teacher_runs_once(teacher, keywords, tmp_path):
    cli_subprocess(*_args(keywords, teacher, tmp_path, "full"))
    killed = cli_subprocess(*_args(keywords, teacher, tmp_path, "cut"), kill_at=7, check=False)
    assert killed.returncode == -signal.SIGKILL
    cli_subprocess("distill", "--resume", str(tmp_path / "cut"))
    a = load_file(tmp_path / "full" / "checkpoints" / "step-00000012" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "checkpoints" / "step-00000012" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    full_log, cut_log = (tmp_path / "full" / "log.txt").read_text(), (tmp_path / "cut" / "log.txt").read_text()
    assert full_log.count("soft-labelling") == 1
    # the sibling run reused the first run's cached outputs; its resume read its own copy: the teacher never ran again
    assert "soft-labelling" not in cut_log and "reusing the outputs cached" in cut_log
    assert cut_log.count(f"outputs read from {tmp_path / 'cut' / 'teacher'}") == 2  # at its start and at its resume
    assert torch.equal(load_file(tmp_path / "full" / "teacher" / "logits.safetensors")["transfer"],
                       load_file(tmp_path / "cut" / "teacher" / "logits.safetensors")["transfer"])


def test_regression_distillation(data_dir, tmp_path):
    cli("classify", f"data.train={data_dir / 'scores.jsonl'}", "data.label_field=score", "data.task=regression",
        "model.arch=encoder", "model.size=test", "model.vocab_size=400", "train.max_steps=30", "train.lr=2e-3",
        f"run.out_dir={tmp_path}", "run.name=rt", *SHORT)
    cli("distill", f"data.train={data_dir / 'scores.jsonl'}", "data.label_field=score", "data.task=regression",
        f"teacher.model={tmp_path / 'rt'}", "model.arch=encoder", "model.size=test", "model.vocab_size=300",
        "train.max_steps=20", "train.lr=2e-3", f"run.out_dir={tmp_path}", "run.name=rs", *SHORT)
    assert {"val_mse", "val_pearson"} <= set(events(tmp_path / "rs", "eval")[-1])
    assert "teacher_val_mse" in json.loads((tmp_path / "rs" / "teacher_scores.json").read_text())
    assert "gold_mse" in events(tmp_path / "rs", "train")[-1]


def test_lora_on_the_student(teacher, pretrained, keywords, tmp_path):
    cli("distill", f"data.train={keywords}", f"teacher.model={teacher}",
        f"model.init_from={pretrained}", "lora.enabled=true", "lora.r=4", "train.max_steps=10", "train.lr=3e-3",
        f"run.out_dir={tmp_path}", "run.name=l", *SHORT)
    assert (tmp_path / "l" / "best" / "adapter_config.json").is_file()
    cli("test", str(tmp_path / "l"))
    assert "test_accuracy" in json.loads((tmp_path / "l" / "test_metrics.json").read_text())


def test_refusals_name_the_problem(pretrained, teacher, data_dir, tmp_path, capsys):
    base = ["distill", f"data.train={data_dir / 'reviews.jsonl'}", "model.size=test", f"run.out_dir={tmp_path}", *FAST]
    assert main(base + ["run.name=a"]) != 0
    assert "teacher.model is empty" in capsys.readouterr().err
    assert main(base + [f"teacher.model={pretrained}", "run.name=b"]) != 0
    assert "is not a sequence classifier" in capsys.readouterr().err
    assert main(base + [f"teacher.model={pretrained}", "distill.alpha=2", "run.name=c"]) != 0
    assert "distill.alpha=2" in capsys.readouterr().err
    assert main(base + [f"teacher.model={teacher}", "data.task=generation", "run.name=d"]) != 0
    assert "is not a causal LM" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in "abd")  # refused before any run directory exists


@pytest.mark.slow  # CI runs it in its own step (.ci/run); kept out of the 3-minute default suite
def test_distill_under_search_and_ablate_runs_the_teacher_once(teacher, keywords, tmp_path):
    fixed = {"data.train": str(keywords), "teacher.model": str(teacher), "model.arch": "encoder", "model.size": "test",
             "model.tokenizer": str(teacher), "data.max_length": 32, "train.max_steps": 4, "train.eval_every": 2,
             "train.batch_size": 8, **{k: v for k, v in (a.split("=") for a in FAST)}}
    search = {"verb": "distill", "set": fixed, "out_dir": str(tmp_path / "search"), "metric": "val_accuracy",
              "n_trials": 2, "pruner": "none", "space": {"distill.temperature": [1.0, 4.0]}}
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(search))
    cli("search", str(tmp_path / "search.yaml"))
    logs = [p.read_text() for p in sorted((tmp_path / "search").rglob("log.txt")) if (p.parent / "teacher").is_dir()]
    assert len(logs) == 2 and sum(log.count("soft-labelling") for log in logs) == 1  # the second trial reused it
    # one trial of each variant's own (default) search: the teacher's cache serves those runs too
    ablation = {"out_dir": str(tmp_path / "ablation"), "seeds": 1, "metric": "accuracy", "bootstrap": 100,
                "search": {"n_trials": 1, "pruner": "none"}, "stages": [{"name": "student", "verb": "distill", "set": fixed}],
                "variants": {"mse": {"set": {"distill.loss": "mse"}}}}
    (tmp_path / "ablation.yaml").write_text(yaml.safe_dump(ablation, sort_keys=False))
    cli("ablate", str(tmp_path / "ablation.yaml"))
    rows = {r["variant"]: r for r in json.loads((tmp_path / "ablation" / "results.json").read_text())["rows"]}
    assert set(rows) == {"baseline", "mse"} and rows["mse"]["verdict"] in ("helps", "hurts", "no evidence")


@pytest.fixture(scope="module")
def chat_teacher(pretrained, data_dir, tmp_path_factory) -> Path:
    """The pre-trained tiny decoder instruction-tuned on the generated instructions."""
    out = tmp_path_factory.mktemp("chat")
    cli("sft", f"data.train={data_dir / 'instructions.jsonl'}", f"model.init_from={pretrained}", "data.max_length=96",
        "train.max_steps=10", "train.eval_every=5", "train.batch_size=8", "train.lr=3e-3", "samples.n=0",
        f"run.out_dir={out}", "run.name=t", *FAST)
    return out / "t"


LM = ["data.task=generation", "data.max_length=96", "train.max_steps=6", "train.eval_every=3", "train.batch_size=8",
      "train.lr=3e-3", "samples.n=2", "samples.max_new_tokens=8", *FAST]


def test_sequence_level_kd_across_tokenizers_then_sft_reads_the_answers(chat_teacher, data_dir, tmp_path):
    cli("distill", f"data.train={data_dir / 'instructions.jsonl'}", f"teacher.model={chat_teacher}",
        "model.size=test", "model.vocab_size=300", "sampling.max_new_tokens=12", "sampling.temperature=0.8",
        f"run.out_dir={tmp_path}", "run.name=seq", *LM)
    run = tmp_path / "seq"
    log = (run / "log.txt").read_text()
    assert "sequence-level KD" in log and "answers" in log
    answers = [json.loads(x) for x in (run / "teacher" / "answers.jsonl").read_text().splitlines()]
    split = json.loads((run / "split_manifest.json").read_text())["counts"]
    assert 0 < len(answers) <= split["train"] and all(a["completion"].strip() for a in answers)
    assert {"val_loss", "val_ppl"} <= set(events(run, "eval")[-1])
    assert len(AutoTokenizer.from_pretrained(run / "best")) != len(AutoTokenizer.from_pretrained(chat_teacher / "best"))
    cli("test", str(run))
    assert "test_loss" in json.loads((run / "test_metrics.json").read_text())
    # the teacher's answers are an sft file as they are
    cli("sft", f"data.train={run / 'teacher' / 'answers.jsonl'}", "model.size=test", "model.vocab_size=300",
        "data.max_length=96", "train.max_steps=2", "samples.n=0", f"run.out_dir={tmp_path}", "run.name=plain", *FAST)


def test_token_level_kd_with_a_shared_vocabulary(chat_teacher, data_dir, tmp_path, capsys):
    cli("distill", f"data.train={data_dir / 'instructions.jsonl'}", f"teacher.model={chat_teacher}",
        f"model.tokenizer={chat_teacher}", "model.size=test", "distill.divergence=jsd", "distill.top_k=8",
        "distill.alpha=0", f"run.out_dir={tmp_path}", "run.name=tok", *LM)
    run = tmp_path / "tok"
    assert "token-level KD" in (run / "log.txt").read_text() and (run / "teacher" / "topk.safetensors").is_file()
    train = events(run, "train")
    assert "kd" in train[-1] and train[-1]["kd"] > 0
    # a student with another vocabulary cannot take token-level KD: the refusal says what works instead
    assert main(["distill", f"data.train={data_dir / 'instructions.jsonl'}", f"teacher.model={chat_teacher}",
                 "distill.mode=token", "model.size=test", "model.vocab_size=300", f"run.out_dir={tmp_path}",
                 "run.name=bad", *LM]) != 0
    assert "sequence-level KD" in capsys.readouterr().err


def test_on_policy_token_kd_samples_from_the_student(chat_teacher, data_dir, tmp_path, capsys):
    args = ["distill", f"data.train={data_dir / 'instructions.jsonl'}", f"teacher.model={chat_teacher}",
            f"model.tokenizer={chat_teacher}", "model.size=test", "distill.top_k=8", "distill.alpha=0",
            "sampling.max_new_tokens=6", f"run.out_dir={tmp_path}", *LM]
    assert main(args + ["distill.on_policy=0.5", "run.name=packed"]) != 0
    assert "data.packing=false" in capsys.readouterr().err
    cli(*args, "distill.on_policy=1.0", "data.packing=false", "train.max_steps=3", "run.name=onp")
    train = events(tmp_path / "onp", "train")
    assert train[-1]["on_policy"] == 1.0 and train[-1]["kd"] > 0  # every batch went on-policy


def test_adversarial_training_on_the_student_and_plae_refused(teacher, keywords, tmp_path, capsys):
    args = ["distill", f"data.train={keywords}", f"teacher.model={teacher}", f"model.tokenizer={teacher}",
            "model.arch=encoder", "model.size=test", "train.max_steps=4", "train.eval_every=2", "train.batch_size=8",
            "data.max_length=32", f"run.out_dir={tmp_path}", *FAST]
    cli(*args, "adversarial.method=fgm", "adversarial.epsilon=0.05", "run.name=fgm")
    log = (tmp_path / "fgm" / "log.txt").read_text()
    assert "fgm" in log.lower() and "kd=" in log  # the KD loss is what the perturbation attacks
    assert main([*args, "adversarial.method=plae", "run.name=plae"]) != 0
    assert "plae" in capsys.readouterr().err


def test_unlabelled_text_mask_and_teacher_length_reach_the_run(teacher, keywords, tmp_path, monkeypatch):
    import honelm.stages.distill as stage

    split = stage.Distillation().splits(stage.DistillConfig(data=stage.DistillDataConfig(train=str(keywords))),
                                        lambda _: None)
    extra = tmp_path / "extra.txt"
    extra.write_text(f"a brand new superb text\n{split.val[0].text}\nanother dull one here\n", encoding="utf-8")
    seen = {}
    build = stage.build_transfer_set

    def spy(splits, unlabelled, augment, seed, mask, say):
        seen["mask"] = mask
        seen["result"] = build(splits, unlabelled, augment, seed, mask, say)
        return seen["result"]

    monkeypatch.setattr(stage, "build_transfer_set", spy)
    cli("distill", f"data.train={keywords}", f"teacher.model={teacher}", f"model.tokenizer={teacher}",
        "model.arch=encoder", "model.size=test", f"data.unlabelled={extra}", "augment.copies=1", "augment.p_mask=0.5",
        "augment.mask=@@", "teacher.max_length=6", "train.max_steps=2", "train.eval_every=2", "train.batch_size=8",
        f"run.out_dir={tmp_path}", "run.name=u", *FAST)
    record = json.loads((tmp_path / "u" / "transfer_set.json").read_text())
    assert record["unlabelled"] == {"candidates": 3, "kept": 2, "excluded_as_task_val_test": 1, "repeats_dropped": 0}
    assert seen["mask"] == "@@" and any("@@" in r.text for r in seen["result"].rows)
    assert json.loads((tmp_path / "u" / "teacher" / "teacher.json").read_text())["max_length"] == 6
    assert "longer than 6 tokens and were truncated" in (tmp_path / "u" / "log.txt").read_text()


def test_sequence_level_kd_with_several_answers_per_prompt(chat_teacher, data_dir, tmp_path):
    cli("distill", f"data.train={data_dir / 'instructions.jsonl'}", f"teacher.model={chat_teacher}",
        "distill.mode=sequence", "distill.num_samples=2", "model.size=test", "model.vocab_size=300",
        "sampling.max_new_tokens=6", "train.max_steps=1", "samples.n=0", f"run.out_dir={tmp_path}", "run.name=two",
        *[a for a in LM if not a.startswith(("train.max_steps", "samples.n"))])
    answers = [json.loads(x) for x in (tmp_path / "two" / "teacher" / "answers.jsonl").read_text().splitlines()]
    train = json.loads((tmp_path / "two" / "split_manifest.json").read_text())["counts"]["train"]
    assert {a["seed"] for a in answers} == {0, 1} and train < len(answers) <= 2 * train
