"""`honelm export --format onnx|int8` through the real CLI: a tiny encoder on text pairs (token_type_ids) exported,
its ONNX logits equal to PyTorch's on validation, the int8 model measured, and the files a consumer needs beside it;
a decoder classifier too. The exports are slow tests (the exporter takes seconds); the refusals are not."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from honelm.data.splits import test_access_count
from honelm.cli import main
from tests.stages.conftest import FAST, cli

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

TINY = ["model.arch=encoder", "model.size=test", "model.vocab_size=300", "train.max_steps=3", "train.eval_every=3",
        "train.batch_size=16", "data.max_length=32", *FAST]


@pytest.fixture(scope="module")
def pairs_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    cli("classify", f"data.train={data_dir / 'pairs.jsonl'}", "data.text_field=a", "data.pair_field=b",
        "data.label_field=same", f"run.out_dir={out}", "run.name=pairs", *TINY)
    return out / "pairs"


@pytest.mark.slow  # ~11 s of CPU: the torch.export-based exporter alone takes ~8 s on a 2-core machine
def test_int8_export_is_checked_measured_and_usable_alone(pairs_run):
    looks = test_access_count()
    cli("export", str(pairs_run), "--format", "int8", "--rounds", "1", "--threads", "1")
    out = pairs_run / "onnx"
    assert {"model.onnx", "model.int8.onnx", "export.json", "export.md", "config.json", "tokenizer.json"} <= \
        {p.name for p in out.iterdir()}
    info = json.loads((out / "export.json").read_text())
    measured = info["measured"]
    assert info["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert measured["split"] == "validation" and measured["n_examples"] == 40
    assert measured["check"]["onnx_fp32"]["passed"] and measured["check"]["onnx_fp32"]["max_abs_diff"] < 1e-4
    engines = {"pytorch_fp32", "onnx_fp32", "onnx_int8"}
    assert set(measured["throughput"]["examples_per_s"]) == set(measured["throughput"]["examples_per_cpu_s"]) == engines
    assert measured["throughput"]["ratio_vs_pytorch_fp32"]["pytorch_fp32"] == 1.0
    assert set(measured["quality"]["onnx_int8"]) == {"accuracy"}
    assert "| onnx_int8 |" in (out / "export.md").read_text()
    assert test_access_count() == looks  # the sealed test split was never opened

    # a consumer with only the export directory: its tokenizer, a batch of another size and length than the
    # exporter's example, both models; fp32 equals the transformers model of best/
    tok = AutoTokenizer.from_pretrained(out)
    texts = ["the film was superb .", "a dull , long story", "music", "the actors were wonderful and the plot moved"]
    enc = tok(texts, texts[::-1], padding=True, return_tensors="np")
    feeds = {k: enc[k].astype(np.int64) for k in info["inputs"]}
    fp32 = ort.InferenceSession(str(out / "model.onnx")).run(["logits"], feeds)[0]
    int8 = ort.InferenceSession(str(out / "model.int8.onnx")).run(["logits"], feeds)[0]
    model = AutoModelForSequenceClassification.from_pretrained(pairs_run / "best").eval()
    with torch.no_grad():
        reference = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
    assert fp32.shape == (4, 2) and int8.shape == (4, 2)
    np.testing.assert_allclose(fp32, reference, atol=1e-4, rtol=1e-3)
    assert np.abs(int8 - reference).max() < 0.5  # quantised, so close but not equal


def test_export_refuses_what_it_cannot_check(tmp_path, capsys):
    """No training needed: every refusal comes before a model is loaded."""
    with pytest.raises(SystemExit):
        cli("export", str(tmp_path), "--format", "gguf")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for argv, message in [((str(model_dir), "--format", "onnx", "--out", str(tmp_path / "x")), "needs a run directory"),
                          ((str(tmp_path), "--quantize", "int8"), "add --format onnx"),
                          ((str(tmp_path), "--format", "onnx", "--rounds", "0"), "--rounds must be at least 1")]:
        assert main(["export", *argv]) == 1
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_a_decoder_classifier_exports_and_matches(pretrained, data_dir, tmp_path):
    """A decoder (Llama) classifier pools its last real token: the ONNX graph must do the same on padded batches."""
    cli("classify", f"data.train={data_dir / 'reviews.jsonl'}", f"model.init_from={pretrained}", "train.max_steps=3",
        "train.eval_every=3", "train.batch_size=16", "data.max_length=48", f"run.out_dir={tmp_path}", "run.name=dec",
        *FAST)
    cli("export", str(tmp_path / "dec"), "--format", "onnx", "--rounds", "1", "--threads", "1")
    info = json.loads((tmp_path / "dec" / "onnx" / "export.json").read_text())
    assert info["inputs"] == ["input_ids", "attention_mask"] and info["files"] == {"onnx_fp32": "model.onnx"}
    assert info["measured"]["check"]["onnx_fp32"]["passed"]
    assert info["measured"]["check"]["onnx_fp32"]["argmax_agreement"] == 1.0
