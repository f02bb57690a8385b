"""`honelm tokenizer`, `pretrain`, `test`, `report`, `generate` through the real CLI on tiny presets."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.stages.conftest import FAST, cli, events


def test_tokenizer_stage_handles_korean(data_dir, tmp_path):
    for kind in ("bpe", "wordpiece"):
        cli("tokenizer", f"data.train={data_dir / 'corpus.txt'}", f"tokenizer.kind={kind}", "tokenizer.vocab_size=700",
            f"run.out_dir={tmp_path}", f"run.name={kind}")
        tok = AutoTokenizer.from_pretrained(tmp_path / kind / "tokenizer")
        sentence = "주말에 연극은 정말 재미있었다"
        ids = tok(sentence, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id is None or tok.unk_token_id not in ids
        assert len(ids) < len(sentence)  # real subwords, not one token per character
        if kind == "bpe":
            assert tok.decode(ids) == sentence
        assert (tmp_path / kind / "tokenizer_stats.json").is_file()


def test_pretrain_run_directory_and_falling_loss(pretrained):
    for name in ("config.yaml", "metrics.jsonl", "log.txt", "run.json", "split_manifest.json", "best/config.json",
                 "best/model.safetensors", "best/tokenizer.json", "best/best.json", "tokenizer/tokenizer.json"):
        assert (pretrained / name).is_file(), name
    assert list((pretrained / "checkpoints").iterdir())
    train = events(pretrained, "train")
    assert train[-1]["loss"] < train[0]["loss"] - 0.5
    evals = events(pretrained, "eval")
    assert {"val_loss", "val_ppl", "val_bpb"} <= set(evals[-1])
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    # the best checkpoint loads with plain transformers and predicts
    model = AutoModelForCausalLM.from_pretrained(pretrained / "best")
    tok = AutoTokenizer.from_pretrained(pretrained / "best")
    out = model(**tok("the film was", return_tensors="pt"))
    assert torch.isfinite(out.logits).all()
    manifest = json.loads((pretrained / "split_manifest.json").read_text())
    assert set(manifest["counts"]) == {"train", "val", "test"} and manifest["hashes"]["train"]


def test_saved_config_reruns(pretrained, tmp_path):
    cli("pretrain", "--config", str(pretrained / "config.yaml"), f"run.out_dir={tmp_path}", "run.name=again",
        "train.max_steps=2", "train.eval_every=0", "model.tokenizer=" + str(pretrained / "tokenizer"))
    assert (tmp_path / "again" / "best" / "config.json").is_file()


def test_test_once_then_refused_then_forced(pretrained, capsys):
    cli("test", str(pretrained))
    metrics = json.loads((pretrained / "test_metrics.json").read_text())
    assert {"test_loss", "test_ppl", "test_bpb"} <= set(metrics)
    from honelm.cli import main

    assert main(["test", str(pretrained)]) == 1
    assert "already evaluated" in capsys.readouterr().err
    cli("test", str(pretrained), "--force")
    looks = [json.loads(x) for x in (pretrained / "test_looks.jsonl").read_text().splitlines()]
    assert [lk["forced"] for lk in looks] == [False, True]


def test_report_and_generate(pretrained, capsys, tmp_path):
    cli("report", str(pretrained))
    capsys.readouterr()
    report = (pretrained / "report.md").read_text()
    assert "plots/loss.png" in report and (pretrained / "plots" / "loss.png").stat().st_size > 1000
    cli("generate", str(pretrained), "prompt=the film", "sampling.max_new_tokens=5", "sampling.seed=3")
    first = capsys.readouterr().out
    cli("generate", str(pretrained), "prompt=the film", "sampling.max_new_tokens=5", "sampling.seed=3")
    assert capsys.readouterr().out == first and first.startswith("the film")
    prompts = tmp_path / "p.txt"
    prompts.write_text("the film\nthe cast\n")
    cli("generate", str(pretrained), f"prompts_file={prompts}", f"out={tmp_path / 'g.jsonl'}", "sampling.max_new_tokens=4")
    assert len((tmp_path / "g.jsonl").read_text().splitlines()) == 2


def test_existing_run_is_not_overwritten(pretrained, capsys):
    from honelm.cli import main

    assert main(["pretrain", "data.train=x.txt", f"run.out_dir={pretrained.parent}", "run.name=pre", *FAST]) == 1
    assert "--resume" in capsys.readouterr().err


@pytest.mark.parametrize("bad, message", [("train.lr=fast", "expected a number"), ("data.train=/nope/*.txt", "no such file")])
def test_bad_input_is_a_clear_error(bad, message, capsys, tmp_path):
    from honelm.cli import main

    code = main(["pretrain", "data.train=/nope/x.txt", bad, f"run.out_dir={tmp_path}", *FAST])
    assert code == 1 and message in capsys.readouterr().err
