"""`honelm adapt` through the real CLI: DAPT (MLM) and TAPT (CLM) then classify, an MLM head created
for a bare encoder checkpoint, curated TAPT, LoRA, `honelm test` on the domain split, exact resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification

from honelm.cli import main
from tests.stages.conftest import FAST, cli, events

SHORT = ["train.eval_every=10", "train.batch_size=8", "train.lr=2e-3", "data.block_size=48", *FAST]
CLASSIFY = ["train.max_steps=10", "train.eval_every=10", "train.batch_size=16", "train.lr=2e-3", "data.max_length=48",
            *FAST]


def _falls(run: Path) -> None:
    train = events(run, "train")
    assert len(train) >= 2 and train[-1]["loss"] < train[0]["loss"], [t["loss"] for t in train]


@pytest.fixture(scope="module")
def bare_encoder(data_dir, tmp_path_factory) -> Path:
    """A tiny BertModel checkpoint without an MLM head (like the MiniLM package), with its tokenizer."""
    from honelm.models import build_model
    from honelm.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("bare")
    texts = (data_dir / "corpus.txt").read_text(encoding="utf-8").splitlines()
    tok = train_tokenizer(texts, kind="wordpiece", vocab_size=400)
    model = build_model("encoder", "test", vocab_size=len(tok), task="base", seed=0)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_dapt_mlm_then_classify_and_domain_test(data_dir, tmp_path):
    cli("adapt", f"data.train={data_dir / 'corpus.txt'}", "model.arch=encoder", "model.size=test",
        "model.vocab_size=500", "train.max_steps=30", f"run.out_dir={tmp_path}", "run.name=dapt", *SHORT)
    run = tmp_path / "dapt"
    _falls(run)
    assert {"val_loss", "val_ppl", "val_accuracy"} <= set(events(run, "eval")[-1])
    assert json.loads((run / "adapt_corpus.json").read_text())["mode"] == "dapt"
    assert AutoModelForMaskedLM.from_pretrained(run / "best").__class__.__name__ == "BertForMaskedLM"
    cli("classify", f"data.train={data_dir / 'reviews.jsonl'}", f"model.init_from={run}",
        f"run.out_dir={tmp_path}", "run.name=cls", *CLASSIFY)
    trunk = load_file(run / "best" / "model.safetensors")
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path / "cls" / "best")
    assert classifier.config.id2label == {0: "negative", 1: "positive"}
    embeddings = classifier.bert.embeddings.word_embeddings.weight
    assert trunk["bert.embeddings.word_embeddings.weight"].shape == embeddings.shape
    cli("test", str(run))  # held-out domain documents, fixed masks
    metrics = json.loads((run / "test_metrics.json").read_text())
    split = json.loads((run / "split_manifest.json").read_text())
    assert metrics["n_documents"] == split["counts"]["test"] > 0 and metrics["test_loss"] > 0


def test_mlm_head_is_created_for_a_bare_encoder_and_tapt_matches_classify_split(bare_encoder, data_dir, tmp_path):
    from honelm.models import load_checkpoint

    record = load_checkpoint(bare_encoder, "mlm")
    loaded = record.model
    assert "cls.predictions.transform.dense.weight" in record.new_weights
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    cli("adapt", f"task.train={data_dir / 'reviews.jsonl'}", f"model.init_from={bare_encoder}",
        "train.max_steps=30", f"run.out_dir={tmp_path}", "run.name=tapt", *SHORT)
    run = tmp_path / "tapt"
    log = (run / "log.txt").read_text()
    assert "the checkpoint has no LM head: created one" in log and "tied to the input embeddings" in log
    _falls(run)
    corpus = json.loads((run / "adapt_corpus.json").read_text())
    assert corpus["mode"] == "tapt" and corpus["leak_guard"]["covers"] == ["val", "test"]
    best = AutoModelForMaskedLM.from_pretrained(run / "best")
    assert best.cls.predictions.decoder.weight.data_ptr() == best.bert.embeddings.word_embeddings.weight.data_ptr()
    # classify with the same data settings: TAPT used exactly text of its train split
    cli("classify", f"data.train={data_dir / 'reviews.jsonl'}", f"model.init_from={run}",
        f"run.out_dir={tmp_path}", "run.name=cls", *CLASSIFY)
    classify_split = json.loads((tmp_path / "cls" / "split_manifest.json").read_text())
    used = set(corpus["sources"]["task_train"]["train_hashes"]) | set(corpus["sources"]["task_train"]["val_hashes"])
    assert used and used <= set(classify_split["example_hashes"]["train"])
    assert corpus["task_split"]["hashes"] == classify_split["hashes"]
    # no domain corpus, no test split of its own: honelm test says where to test instead
    assert main(["test", str(run)]) == 1
    assert not (run / "test_metrics.json").exists()


def test_clm_adapt_of_a_decoder_then_classify(pretrained, data_dir, tmp_path):
    cli("adapt", f"task.train={data_dir / 'reviews.jsonl'}", f"model.init_from={pretrained}", "train.max_steps=20",
        f"run.out_dir={tmp_path}", "run.name=clm", *SHORT)
    run = tmp_path / "clm"
    _falls(run)
    assert {"val_loss", "val_ppl", "val_bpb"} <= set(events(run, "eval")[-1])
    assert json.loads((run / "best" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    cli("classify", f"data.train={data_dir / 'reviews.jsonl'}", f"model.init_from={run}",
        f"run.out_dir={tmp_path}", "run.name=cls", *CLASSIFY)
    assert (tmp_path / "cls" / "best" / "model.safetensors").is_file()


def test_curated_tapt_records_its_picks(bare_encoder, data_dir, tmp_path):
    cli("adapt", f"task.train={data_dir / 'reviews.jsonl'}", f"data.train={data_dir / 'corpus.txt'}", "curate.k=2",
        f"model.init_from={bare_encoder}", "train.max_steps=4", f"run.out_dir={tmp_path}", "run.name=cur", *SHORT)
    run = tmp_path / "cur"
    corpus = json.loads((run / "adapt_corpus.json").read_text())
    assert corpus["mode"] == "curated_tapt"
    picks = [json.loads(x) for x in (run / "curated.jsonl").read_text().splitlines()]
    assert len(picks) == corpus["sources"]["task_train"]["train"]
    assert all(len(p["picks"]) == 2 for p in picks)
    first = picks[0]["picks"][0]
    assert first["source"].endswith("corpus.txt") and first["line"] >= 1 and -1 <= first["similarity"] <= 1
    assert first["similarity"] >= picks[0]["picks"][1]["similarity"]
    cur = corpus["sources"]["curated"]
    assert 0 < cur["added"] <= cur["picked"] and corpus["sources"]["domain"]["role"] == "pool for curated picks"
    assert "domain" not in corpus["val"]  # the rest of the domain corpus plays no part


def test_lora_adapt_then_classify(bare_encoder, data_dir, tmp_path, capsys):
    cli("adapt", f"task.train={data_dir / 'reviews.jsonl'}", f"model.init_from={bare_encoder}", "lora.enabled=true",
        "lora.r=4", "train.max_steps=20", f"run.out_dir={tmp_path}", "run.name=lora", *SHORT)
    run = tmp_path / "lora"
    _falls(run)
    assert (run / "best" / "adapter_config.json").is_file()
    cli("classify", f"data.train={data_dir / 'reviews.jsonl'}", f"model.init_from={run}",
        f"run.out_dir={tmp_path}", "run.name=cls", *CLASSIFY)
    assert (tmp_path / "cls" / "best" / "model.safetensors").is_file()
    # or carried on: the classifier keeps training the adapt run's adapter (same rank) instead of merging it
    cli("classify", f"data.train={data_dir / 'reviews.jsonl'}", f"model.init_from={run}", "lora.enabled=true",
        "lora.r=4", "lora.carry=true", f"run.out_dir={tmp_path}", "run.name=carried", *CLASSIFY)
    carried = tmp_path / "carried"
    log = (carried / "log.txt").read_text(encoding="utf-8")
    assert f"lora: carried on the adapter of {run / 'best'}" in log and "left behind" in log  # the MLM head's part
    assert json.loads((carried / "best" / "adapter_config.json").read_text())["r"] == 4
    capsys.readouterr()
    code = main(["classify", f"data.train={data_dir / 'reviews.jsonl'}", f"model.init_from={tmp_path / 'cls'}",
                 "lora.enabled=true", "lora.carry=true", f"run.out_dir={tmp_path}", "run.name=bad", *CLASSIFY])
    assert code != 0 and "holds no LoRA adapter" in capsys.readouterr().err


def test_resume_restores_the_dynamic_masks_exactly(data_dir, tmp_path):
    """The step-4 checkpoint of a finished run, resumed, must end bit-identical to that run's step 8."""
    args = ["adapt", f"data.train={data_dir / 'corpus.txt'}", "model.arch=encoder", "model.size=test",
            "model.vocab_size=400", "model.dropout=0.1", "train.max_steps=8", "train.save_every=4",
            "train.eval_every=4", "train.batch_size=4", "train.grad_accum=2", "train.threads=1", *FAST]
    cli(*args, f"run.out_dir={tmp_path}", "run.name=full")
    full = tmp_path / "full"
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step-00000008")  # as if killed between steps 4 and 8
    cli("adapt", "--resume", str(cut))
    a = load_file(full / "checkpoints" / "step-00000008" / "model.safetensors")
    b = load_file(cut / "checkpoints" / "step-00000008" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert events(cut, "eval")[-1]["val_loss"] == events(full, "eval")[-1]["val_loss"]
