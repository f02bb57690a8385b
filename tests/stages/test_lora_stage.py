"""LoRA through the real CLI: `classify lora.enabled=true` on a decoder from a pretrain run and on an encoder
from scratch, `pretrain` with LoRA from a checkpoint (then `generate`, then a stage chained on it),
`honelm test`, `honelm export` (merged: plain transformers, same test predictions), and `--resume`
of a LoRA run ≡ uninterrupted."""

from __future__ import annotations

import pytest

import json
import random
import shutil

import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from honelm.cli import main
from honelm.predictions import read_records
from tests.stages.conftest import FAST, cli, events

LORA = ["lora.enabled=true", "lora.dropout=0.0"]
SHORT = ["train.max_steps=30", "train.eval_every=10", "train.batch_size=16", "train.lr=1e-2", "data.max_length=48",
         *FAST]
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"}


def adapter_config(run) -> dict:
    return json.loads((run / "best" / "adapter_config.json").read_text())


def test_lora_classify_from_pretrain_run_then_test_and_merged_export(pretrained, data_dir, tmp_path):
    from honelm.data.batches import encode_examples
    from honelm.data.splits import unlock_test_split
    from honelm.data.sources import labelled_splits
    from honelm.rundir import load_run_config
    from honelm.stages.classify import ClassifyConfig, label_maps, predict

    cli("classify", f"data.train={data_dir / 'reviews.jsonl'}", f"model.init_from={pretrained}",
        f"run.out_dir={tmp_path}", "run.name=c", *LORA, *SHORT)
    run = tmp_path / "c"
    train = events(run, "train")
    assert train[-1]["loss"] < train[0]["loss"]
    files = {p.name for p in (run / "best").iterdir()}
    assert ADAPTER_FILES <= files and "model.safetensors" not in files
    # the classifier head is new, so no directory held these weights: the run keeps its base
    assert adapter_config(run)["base_model_name_or_path"] == str((run / "base").resolve())
    assert "score" in adapter_config(run)["modules_to_save"]
    assert "trainable of" in (run / "log.txt").read_text()

    # an adapter dir as best/ still carries the validation predictions of its evaluation
    assert len(read_records(run / "best" / "val_predictions.jsonl")) == 40
    cli("test", str(run))
    predictions = [r["pred"] for r in read_records(run / "test_predictions.jsonl")]
    cli("export", str(run), "--merge")
    model = AutoModelForSequenceClassification.from_pretrained(run / "export").eval()
    tokenizer = AutoTokenizer.from_pretrained(run / "export")
    assert model.config.id2label == {0: "negative", 1: "positive"}
    cfg = load_run_config(run, ClassifyConfig)
    splits = labelled_splits(cfg.data, lambda _: None)
    with unlock_test_split("stage test: the merged export must predict what `honelm test` recorded"):
        test = splits.test
    label2id, _ = label_maps(splits.train, "classification")
    data = encode_examples(tokenizer, test, label2id, cfg.data.max_length, is_decoder=True)
    with torch.no_grad():
        assert predict(model, data, 32, torch.device("cpu")).argmax(-1).tolist() == predictions


def test_lora_encoder_from_scratch_saves_its_base_and_loads_with_plain_peft(data_dir, tmp_path):
    from peft import AutoPeftModelForSequenceClassification

    cli("classify", f"data.train={data_dir / 'reviews.jsonl'}", "model.arch=encoder", "model.size=test",
        "model.vocab_size=500", "lora.r=4", "lora.dora=true", f"run.out_dir={tmp_path}", "run.name=e", *LORA, *SHORT)
    run = tmp_path / "e"
    train = events(run, "train")
    assert train[-1]["loss"] < train[0]["loss"]
    assert adapter_config(run)["base_model_name_or_path"] == str((run / "base").resolve())  # random init
    assert (run / "base" / "config.json").is_file() and (run / "base" / "model.safetensors").is_file()
    model = AutoPeftModelForSequenceClassification.from_pretrained(run / "best").eval()
    tokenizer = AutoTokenizer.from_pretrained(run / "best")
    with torch.no_grad():
        assert model(**tokenizer(["the film was superb ."], return_tensors="pt")).logits.shape == (1, 2)
    cli("test", str(run))
    assert "test_accuracy" in json.loads((run / "test_metrics.json").read_text())
    cli("export", str(run))  # no --merge: the adapter as it is
    assert ADAPTER_FILES <= {p.name for p in (run / "export").iterdir()}


def test_lora_pretrain_from_a_checkpoint_then_generate(pretrained, data_dir, tmp_path, capsys):
    cli("pretrain", f"data.train={data_dir / 'corpus.txt'}", f"model.init_from={pretrained}", "data.block_size=32",
        "train.max_steps=10", "train.eval_every=5", "train.lr=1e-2", "train.batch_size=8", "lora.r=4",
        "lora.target_modules=q_proj,v_proj", f"run.out_dir={tmp_path}", "run.name=p", *LORA, *FAST)
    run = tmp_path / "p"
    # the frozen base is the pretrain run's best/ itself: the adapter points there, nothing is copied
    assert adapter_config(run)["base_model_name_or_path"] == str((pretrained / "best").resolve())
    assert not (run / "base").exists()
    assert sorted(adapter_config(run)["target_modules"]) == [f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qv"]
    ev = events(run, "eval")
    assert ev[-1]["val_loss"] <= ev[0]["val_loss"]
    capsys.readouterr()
    cli("generate", str(run), "prompt=the film", "sampling.max_new_tokens=5")
    assert capsys.readouterr().out.startswith("the film")
    # the next stage starts from the merged model (here a full fine-tune, re-headed for classification)
    cli("classify", f"data.train={data_dir / 'reviews.jsonl'}", f"model.init_from={run}", f"run.out_dir={tmp_path}",
        "run.name=c", "train.max_steps=3", "data.max_length=48", *FAST)
    assert (tmp_path / "c" / "best" / "model.safetensors").is_file()


def test_lora_classify_resume_is_bit_identical(data_dir, tmp_path):
    """With LoRA+ (lora.lr_ratio): B matrices in their own optimizer group at 4x the rate, so the resume restores
    two learning rates and two schedules, not one."""
    # one tokenizer for all three runs: a tokenizer trained on the fly is not the same from run to run
    cli("tokenizer", f"data.train={data_dir / 'reviews.jsonl'}", "tokenizer.kind=wordpiece", "tokenizer.vocab_size=300",
        f"run.out_dir={tmp_path}", "run.name=tok")
    args = [f"data.train={data_dir / 'reviews.jsonl'}", "model.arch=encoder", "model.size=test",
            f"model.tokenizer={tmp_path / 'tok'}",
            "lora.dropout=0.1", "lora.enabled=true", "lora.lr_ratio=4", "train.max_steps=8", "train.eval_every=4", "train.save_every=4",
            "train.keep_checkpoints=5", "train.batch_size=8", "train.lr=1e-2", "data.max_length=32",
            f"run.out_dir={tmp_path}", *FAST]
    cli("classify", *args, "run.name=full")
    cli("classify", *args, "run.name=cut")
    cut = tmp_path / "cut"
    shutil.rmtree(cut / "checkpoints" / "step-00000008")  # as if killed after step 4's checkpoint
    cli("classify", "--resume", str(cut))
    full = load_file(tmp_path / "full" / "checkpoints" / "step-00000008" / "model.safetensors")
    resumed = load_file(cut / "checkpoints" / "step-00000008" / "model.safetensors")
    assert full.keys() == resumed.keys() and any("lora_A" in k for k in full)
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    assert (cut / "best" / "adapter_config.json").is_file()
    groups = torch.load(cut / "checkpoints" / "step-00000008" / "optimizer.pt", weights_only=True)["param_groups"]
    assert {g["lr_scale"] for g in groups} == {1.0, 4.0}  # LoRA+'s B group came back with its own rate


@pytest.mark.slow  # CI runs it in its own step (.ci/run); kept out of the 3-minute default suite
def test_lora_under_bf16_holds_the_base_in_bf16_and_changes_nothing(pretrained, data_dir, tmp_path):
    """`train.bf16_frozen` (default on) against off, through the CLI under bf16 autocast: the same
    adapter bit for bit, the same test predictions, an fp32 base written, no spill file left."""
    common = ["classify", f"data.train={data_dir / 'reviews.jsonl'}", f"model.init_from={pretrained}",
              f"run.out_dir={tmp_path}", *LORA, *SHORT, "train.precision=bf16"]  # after FAST's fp32
    cli(*common, "run.name=held")
    cli(*common, "run.name=plain", "train.bf16_frozen=false")
    held, plain = tmp_path / "held", tmp_path / "plain"
    assert "frozen weights:" in (held / "log.txt").read_text()
    assert "frozen weights:" not in (plain / "log.txt").read_text()
    assert not list(held.glob(".frozen-fp32*"))
    a, b = (load_file(r / "best" / "adapter_model.safetensors") for r in (held, plain))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    base = load_file(held / "base" / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in base.values())
    assert all(torch.equal(base[k], t) for k, t in load_file(plain / "base" / "model.safetensors").items())
    for run in (held, plain):
        cli("test", str(run))
    assert (read_records(held / "test_predictions.jsonl") == read_records(plain / "test_predictions.jsonl"))


def test_lora_with_embedding_adapters_learns_where_all_linear_stays_at_chance(pretrained, data_dir, tmp_path):
    """Issue 19's LoRA finding on a tiny decoder (docs/benchmarks.md, "Why LoRA lost"): at equal steps, LoRA on
    every linear layer stays near chance (the frozen token embeddings are a large share of what fine-tuning moves
    in a small model), while LoRA that also adapts the input embedding (`lora.target_modules=all-linear,embeddings`)
    learns the task and is not behind full fine-tuning. That is now what LoRA does by default for a classifier
    (`lora.target_modules=auto`)."""
    common = ["classify", f"data.train={data_dir / 'reviews.jsonl'}", f"model.init_from={pretrained}",
              f"run.out_dir={tmp_path}", "train.max_steps=120", "train.eval_every=20", "train.batch_size=16",
              "train.lr=3e-3", "train.patience=0", "data.max_length=48", *FAST]
    best = {}
    for name, extra in (("full", []), ("linear", [*LORA, "lora.target_modules=all-linear"]), ("embeddings", LORA)):
        cli(*common, f"run.name={name}", *extra)
        best[name] = events(tmp_path / name, "end")[-1]["best_value"]
    assert best["embeddings"] >= 0.7, best  # learns the task in this budget
    assert best["linear"] <= best["embeddings"] - 0.15, best  # what the ablations showed: all-linear LoRA far behind
    assert best["embeddings"] >= best["full"] - 0.05, best  # not behind full fine-tuning
    assert "embed_tokens" in (tmp_path / "embeddings" / "log.txt").read_text()


def test_lora_on_an_encoder_whose_pooler_outputs_are_tiny_keeps_up_with_full_fine_tuning(tmp_path):
    """Issue 19's ChemProt finding through the CLI (docs/lora.md, "The pooler is part of the head"): a bare BERT
    checkpoint, as sentence-transformers ship all-MiniLM-L6-v2, whose trunk already separates the task but whose
    pretrained pooler's outputs are tiny (it was never trained for the checkpoint's own task). `classify` gives it a
    fresh head. At equal steps and rate, LoRA with the pooler trained as part of the head (the default) ends within
    0.03 validation loss of full fine-tuning; with the pooler adapted like any Linear (`lora.train_pooler=false`,
    the old behaviour) it falls well behind, as MiniLM's ChemProt runs did (0.648 against 0.763 accuracy)."""
    rng = random.Random(0)
    words = [f"w{i}" for i in range(60)]
    with open(tmp_path / "cue.jsonl", "w", encoding="utf-8") as handle:  # the second word gives the label
        for _ in range(480):
            label = rng.choice(["yes", "no"])
            tokens = rng.choices(words, k=10)
            tokens.insert(1, "good" if label == "yes" else "bad")
            handle.write(json.dumps({"text": " ".join(tokens), "label": label}) + "\n")
    common = [f"data.train={tmp_path / 'cue.jsonl'}", f"run.out_dir={tmp_path}", "train.batch_size=16",
              "train.patience=0", "data.max_length=16", "model.dropout=0.0", *FAST]
    cli("classify", *common, "model.arch=encoder", "model.size=test", "model.vocab_size=500", "run.name=trunk",
        "train.max_steps=60", "train.eval_every=20", "train.lr=1e-2")
    assert events(tmp_path / "trunk", "eval")[-1]["val_accuracy"] == 1.0  # the trunk knows the task
    trunk = AutoModelForSequenceClassification.from_pretrained(tmp_path / "trunk" / "best").bert  # no head
    with torch.no_grad():  # a pooler with tiny outputs
        trunk.pooler.dense.weight.mul_(0.003)
        trunk.pooler.dense.bias.zero_()
    checkpoint = tmp_path / "checkpoint"
    trunk.save_pretrained(checkpoint)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tmp_path / "trunk" / "best" / name, checkpoint / name)
    loss = {}
    for name, extra in (("full", []), ("lora", LORA), ("adapted", [*LORA, "lora.train_pooler=false"])):
        cli("classify", *common, f"model.init_from={checkpoint}", f"run.name={name}", "train.max_steps=30",
            "train.eval_every=10", "train.lr=1e-3", *extra)
        loss[name] = events(tmp_path / name, "eval")[-1]["val_loss"]
    # measured: full 0.381, LoRA 0.387, pooler adapted 0.481 (ln 2 = 0.693: chance)
    assert loss["lora"] <= loss["full"] + 0.03, loss
    assert loss["adapted"] >= loss["full"] + 0.06, loss
    assert "trained fully: classifier, bert.pooler" in (tmp_path / "lora" / "log.txt").read_text()


def test_head_first_holds_the_adapters_then_lets_them_learn_and_resumes_exactly(data_dir, tmp_path, capsys):
    """`lora.head_first=0.5` over 8 steps: in steps 1-4 only the classifier learns (every B stays exactly 0, as
    initialised, and its optimizer group's lr is 0); from step 5 the adapters move. A run resumed from inside the
    hold (step 2) ends bit-identical to the uninterrupted one."""
    cli("tokenizer", f"data.train={data_dir / 'reviews.jsonl'}", "tokenizer.kind=wordpiece", "tokenizer.vocab_size=300",
        f"run.out_dir={tmp_path}", "run.name=tok")
    args = [f"data.train={data_dir / 'reviews.jsonl'}", "model.arch=encoder", "model.size=test",
            f"model.tokenizer={tmp_path / 'tok'}", "lora.head_first=0.5", "train.max_steps=8", "train.eval_every=4",
            "train.save_every=2", "train.keep_checkpoints=5", "train.batch_size=8", "train.lr=1e-2",
            "data.max_length=32", f"run.out_dir={tmp_path}", *LORA, *FAST]
    cli("classify", *args, "run.name=full")
    log = (tmp_path / "full" / "log.txt").read_text()
    assert "the heads first: adapters held for the first 50% of the steps" in log
    full = tmp_path / "full" / "checkpoints"
    at = {s: load_file(full / f"step-{s:08d}" / "model.safetensors") for s in (2, 4, 6)}
    b_keys = [k for k in at[2] if "lora_B" in k]
    head = [k for k in at[2] if "classifier" in k and "modules_to_save" in k]
    assert b_keys and head
    for s in (2, 4):
        assert all(not at[s][k].any() for k in b_keys), f"an adapter moved during the hold (step {s})"
    assert any(not torch.equal(at[2][k], at[4][k]) for k in head)  # the head learned meanwhile
    assert any(at[6][k].any() for k in b_keys)  # after the hold, the adapters learn
    groups = torch.load(full / "step-00000002" / "optimizer.pt", weights_only=True)["param_groups"]
    assert {(g["held"], g["lr"] == 0.0) for g in groups} == {(True, True), (False, False)}
    cli("classify", *args, "run.name=cut")
    for s in (4, 6, 8):
        shutil.rmtree(tmp_path / "cut" / "checkpoints" / f"step-{s:08d}")  # as if killed in the hold
    cli("classify", "--resume", str(tmp_path / "cut"))
    a = load_file(full / "step-00000008" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "checkpoints" / "step-00000008" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a model with no head that trains fully: nothing would learn during the hold, so it is refused
    capsys.readouterr()
    code = main(["pretrain", f"data.train={data_dir / 'corpus.txt'}", "model.size=test", "model.vocab_size=600",
                 "data.block_size=32", "train.max_steps=2", "lora.head_first=0.2", f"run.out_dir={tmp_path}",
                 "run.name=p", *LORA, *FAST])
    assert code != 0 and "lora.head_first=0.2" in capsys.readouterr().err
