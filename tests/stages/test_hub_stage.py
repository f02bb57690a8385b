"""`data.train=hf:DIR@train data.test=hf:DIR@test` through the real CLI: a dataset saved with `datasets` trains a
classifier (label names from its ClassLabel), and `honelm test` rebuilds the split and opens the test split by name."""

from __future__ import annotations

import json

import pytest

from tests.stages.conftest import FAST, cli

datasets = pytest.importorskip("datasets")


@pytest.mark.slow
def test_classify_and_test_on_a_saved_hub_dataset(data_dir, tmp_path):
    rows = [json.loads(line) for line in (data_dir / "reviews.jsonl").read_text().splitlines()]
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    def split(part: list[dict]) -> datasets.Dataset:
        return datasets.Dataset.from_dict({"text": [r["text"] for r in part], "label": [r["label"] for r in part]},
                                          features=features)
    saved = tmp_path / "reviews"
    datasets.DatasetDict(train=split(rows[:300]), test=split(rows[300:360])).save_to_disk(str(saved))
    cli("classify", f"data.train=hf:{saved}@train", f"data.test=hf:{saved}@test", "data.split=9:1:0",
        "model.arch=encoder", "model.size=test", "model.vocab_size=300", "train.max_steps=3", "train.eval_every=3",
        "train.batch_size=16", "data.max_length=32", f"run.out_dir={tmp_path}", "run.name=h", *FAST)
    run = tmp_path / "h"
    manifest = json.loads((run / "split_manifest.json").read_text())
    assert manifest["test_source"] == f"hf:{saved}@test" and manifest["counts"]["train"] == 270
    assert json.loads((run / "labels.json").read_text())["id2label"] == {"0": "negative", "1": "positive"}
    cli("test", str(run))
    assert json.loads((run / "test_metrics.json").read_text())["n_examples"] == 60
