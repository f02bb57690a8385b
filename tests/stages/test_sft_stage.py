"""`honelm sft` (+ `test`) through the real CLI on the demo's generated instructions: validation loss
falls from the pre-trained model's, best/ carries a chat template, samples and reference metrics are
written, dropped rows are counted, LoRA and adversarial training run with and without packing."""

from __future__ import annotations

import json
import re

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.stages.conftest import FAST, cli, events

SHORT = ["data.max_length=128", "train.batch_size=8", "train.lr=3e-3", "samples.max_new_tokens=6", *FAST]


def _val_loss_before(run, pretrained) -> float:
    """Validation loss of the starting model, on exactly the run's validation examples."""
    from honelm import config as C
    from honelm.data.sections import chat_splits, encode_chat_split
    from honelm.models import load_model
    from honelm.objectives.lm_scores import example_scores
    from honelm.stages import sft

    cfg = C.build(sft.SFTConfig, run / "config.yaml")
    tok = AutoTokenizer.from_pretrained(run / "best")  # the pretrain tokenizer + the template the run wrote
    splits = chat_splits(cfg.data, lambda _: None)
    val = encode_chat_split(tok, splits.val, cfg.data)
    model = load_model(pretrained / "best", "lm").eval()
    with torch.no_grad():
        return example_scores(model, val, 32, torch.device("cpu"), "val")["val_loss"]


def test_sft_from_pretrain_run_then_test(pretrained, data_dir, tmp_path):
    cli("sft", f"data.train={data_dir / 'instructions.jsonl'}", f"model.init_from={pretrained}", "train.max_steps=30",
        "train.eval_every=15", "samples.n=4", f"run.out_dir={tmp_path}", "run.name=s", *SHORT)
    run = tmp_path / "s"
    log = (run / "log.txt").read_text()
    assert "wrote honelm's default" in log  # the pretrain tokenizer had no chat template
    assert "packing:" in log
    evals = events(run, "eval")
    assert evals[-1]["val_loss"] < _val_loss_before(run, pretrained) - 0.5
    tok = AutoTokenizer.from_pretrained(run / "best")
    assert tok.chat_template
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|user|>\nhi<|endoftext|><|assistant|>\n"
    assert AutoModelForCausalLM.from_pretrained(run / "best").config.vocab_size == len(tok)
    samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and {"prompt", "output", "reference", "exact_match", "token_f1"} <= set(samples[0])
    done = events(run, "samples")[0]
    assert {"val_exact_match", "val_token_f1", "val_chrf", "val_bleu"} <= set(done)
    cli("test", str(run))
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert {"test_loss", "test_ppl", "test_exact_match", "test_token_f1", "test_chrf", "test_bleu"} <= set(metrics)
    assert metrics["n_examples"] == metrics["n_answered"] == 60
    assert abs(metrics["test_loss"] - evals[-1]["val_loss"]) < 0.5


def test_sft_unpacked_lora_r3f_counts_dropped_rows(data_dir, tmp_path):
    # from scratch, 24-token examples: the longer prompts leave no reply → dropped and counted
    cli("sft", f"data.train={data_dir / 'instructions.jsonl'}", "model.size=test", "model.vocab_size=500",
        "data.packing=false", "data.train_on=last", "lora.enabled=true", "adversarial.method=r3f", "train.max_steps=4",
        "train.eval_every=4", "samples.n=2", f"run.out_dir={tmp_path}", "run.name=u", *SHORT, "data.max_length=24")
    run = tmp_path / "u"
    log = (run / "log.txt").read_text()
    dropped = re.search(r"train: (\d+) conversations → (\d+) examples.*DROPPED (\d+) ", log)
    assert dropped and int(dropped[3]) > 0 and int(dropped[1]) == int(dropped[2]) + int(dropped[3])
    assert "packing:" not in log
    train = events(run, "train")
    assert all(e["loss"] == e["loss"] and "adv_loss" in e for e in train)  # finite (not NaN), r3f active
    assert (run / "best" / "adapter_config.json").is_file()
    assert AutoTokenizer.from_pretrained(run / "best").chat_template


def test_sft_neftune_packed(pretrained, data_dir, tmp_path):
    cli("sft", f"data.train={data_dir / 'instructions.jsonl'}", f"model.init_from={pretrained}",
        "adversarial.method=neftune", "train.max_steps=3", "train.eval_every=3", "samples.n=0",
        f"run.out_dir={tmp_path}", "run.name=n", *SHORT)
    run = tmp_path / "n"
    assert events(run, "eval") and not (run / "samples.jsonl").exists()
    assert "delta_norm" in events(run, "train")[-1]
