"""Prompted classification (honelm.prompting): verbalizer scores against a hand computation on a tiny Llama,
the chat template and the plain-text prompt as rendered, shots, and the errors that name their field."""

from __future__ import annotations

import json

import pytest
import torch

from honelm.data.chat import ensure_template
from honelm.data.readers import Example
from honelm.errors import ConfigError, HonelmError
from honelm.models import build_model
from honelm.prompting import (PromptOptions, Prompter, check_source, check_template, parse_verbalizers, pick_shots,
                              source_record, verbalizer_scores)
from honelm.tokenizer import train_tokenizer

TEXTS = ["the film was great", "the film was dreadful", "a great cast", "a dreadful ending", "the story was fine"]
LABELS = {"negative": 0, "positive": 1}
ID2LABEL = {0: "negative", 1: "positive"}


def ex(text: str, label: str, line: int = 1) -> Example:
    return Example(text, None, label, "reviews.jsonl", line)


@pytest.fixture(scope="module")
def tok():
    t = train_tokenizer(TEXTS * 20, kind="bpe", vocab_size=280)
    ensure_template(t)
    return t


@pytest.fixture(scope="module")
def model(tok):
    return build_model("decoder", "test", vocab_size=len(tok), task="lm", seed=0).eval()


def by_hand(model, prompt_ids: list[int], verbalizer_ids: list[int]) -> float:
    """log p(verbalizer | prompt) from one unpadded forward: token t is predicted at position t - 1."""
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([prompt_ids + verbalizer_ids])).logits[0].log_softmax(-1)
    return sum(float(logp[len(prompt_ids) - 1 + j, v]) for j, v in enumerate(verbalizer_ids))


def test_scores_are_verbalizer_log_likelihoods_through_the_chat_template(tok, model):
    shot = ex("a great cast", "positive")
    rows = [ex("the film was great", "positive"), ex("a dreadful ending , the story was fine too", "negative")]
    options = PromptOptions(instruction="Judge the review.", verbalizers="negative=dreadful film,positive=great")
    prompter = Prompter(tok, options, LABELS, ID2LABEL, [shot], max_length=64, pair=False)
    words = ["dreadful film", "great"]
    assert len(tok(words[0], add_special_tokens=False)["input_ids"]) >= 2  # a multi-token verbalizer
    data = prompter.encode(rows)
    eos = tok.eos_token
    expected = torch.zeros(2, 2)
    for n, row in enumerate(rows):
        # honelm's default template: the shot is an answered turn, the example the last user turn
        text = (f"<|user|>\nJudge the review.\n\nText: a great cast\nAnswer:{eos}<|assistant|>\ngreat{eos}"
                f"<|user|>\nText: {row.text}\nAnswer:{eos}<|assistant|>\n")
        prompt = tok(text, add_special_tokens=False)["input_ids"]
        for c, word in enumerate(words):
            verbalizer = tok(word, add_special_tokens=False)["input_ids"]
            assert data.sequences[2 * n + c] == prompt + verbalizer and data.starts[2 * n + c] == len(prompt)
            expected[n, c] = by_hand(model, prompt, verbalizer)
    assert data.labels.tolist() == [1, 0] and data.n_labels == 2
    # batches of 3 mix examples and lengths: right padding must not change a score
    for batch in (1, 3, 8):
        assert torch.allclose(verbalizer_scores(model, data, batch, torch.device("cpu")), expected, atol=1e-5)
    lengths = torch.tensor([len(tok(w, add_special_tokens=False)["input_ids"]) for w in words], dtype=torch.float32)
    mean = verbalizer_scores(model, data, 3, torch.device("cpu"), mean=True)
    assert torch.allclose(mean, expected / lengths, atol=1e-5)


def test_plain_text_prompt_puts_the_verbalizer_after_a_space(tok, model):
    options = PromptOptions(verbalizers="negative=dreadful,positive=great", chat=False, template="Review: {text} ->")
    prompter = Prompter(tok, options, LABELS, ID2LABEL, [ex("a great cast", "positive")], max_length=64, pair=False)
    data = prompter.encode([ex("the film was great", "positive")])
    text = ("Classify the input. Answer with one of: dreadful, great.\n\nReview: a great cast -> great\n\n"
            "Review: the film was great ->")
    prompt = tok(text)["input_ids"]
    assert data.sequences[1] == prompt + tok(" great", add_special_tokens=False)["input_ids"]
    assert float(verbalizer_scores(model, data, 4, torch.device("cpu"))[0, 1]) == pytest.approx(
        by_hand(model, prompt, tok(" great", add_special_tokens=False)["input_ids"]), abs=1e-5)


def test_long_texts_are_cut_and_counted_and_pairs_shown(tok):
    prompter = Prompter(tok, PromptOptions(), LABELS, ID2LABEL, [], max_length=3, pair=False)
    data = prompter.encode([ex("the film was great and the story was fine", "positive"), ex("great", "positive")])
    assert data.truncated == 1
    pairs = Prompter(tok, PromptOptions(), LABELS, ID2LABEL, [], max_length=64, pair=True)
    assert pairs.show(Example("a great cast", "the film was fine", "positive", "pairs.jsonl", 1)) == (
        "Text: a great cast\nSecond text: the film was fine\nAnswer:")


def test_verbalizers_default_to_label_names_and_errors_name_the_field():
    assert parse_verbalizers("", ID2LABEL) == ["negative", "positive"]
    assert parse_verbalizers(" positive = great , negative=bad", ID2LABEL) == ["bad", "great"]
    for spec, message in [("negative=bad,neutral=meh,positive=good", "prompt.verbalizers: unknown label 'neutral'"),
                          ("negative=bad", "prompt.verbalizers: no verbalizer for label.s. positive"),
                          ("negative=bad,positive", "prompt.verbalizers: 'positive' is not LABEL=WORD"),
                          ("negative=bad,negative=awful,positive=good", "label 'negative' is given twice"),
                          ("negative=fine,positive=fine", "two labels share a verbalizer")]:
        with pytest.raises(ConfigError, match=message):
            parse_verbalizers(spec, ID2LABEL)


def test_templates_show_exactly_their_fields():
    check_template("Text: {text}", pair=False)
    check_template("{text} / {text_pair}", pair=True)
    for template, pair in [("no field", False), ("{text} {label}", False), ("{text}", True),
                           ("{text} {text_pair}", False), ("{text", False)]:
        with pytest.raises(ConfigError, match="prompt.template"):
            check_template(template, pair)


def test_shots_are_k_per_label_from_train_chosen_by_seed():
    train = [ex(f"review {i}", "positive" if i % 3 else "negative", i) for i in range(30)]
    shots = pick_shots(train, 2, seed=0, label2id=LABELS)
    assert sorted(e.label for e in shots) == ["negative", "negative", "positive", "positive"]
    assert pick_shots(train, 2, seed=0, label2id=LABELS) == shots
    assert any(pick_shots(train, 2, seed=s, label2id=LABELS) != shots for s in range(1, 4))
    assert pick_shots(train, 0, seed=0, label2id=LABELS) == []
    with pytest.raises(ConfigError, match="prompt.shots=11: the train split has 10 example.s. of label 'negative'"):
        pick_shots(train, 11, seed=0, label2id=LABELS)


def test_the_recorded_model_is_refused_when_changed_or_gone(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (model_dir / "model.safetensors").write_bytes(b"0" * 100)
    record = source_record("my-model", str(model_dir))
    assert record["path"] == str(model_dir.resolve()) and record["weights"] == {"model.safetensors": 100}
    assert check_source(record, tmp_path) == model_dir.resolve()
    (model_dir / "model.safetensors").write_bytes(b"0" * 101)
    with pytest.raises(HonelmError, match="changed since the run"):
        check_source(record, tmp_path)
    (model_dir / "model.safetensors").write_bytes(b"0" * 100)
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 9}))
    with pytest.raises(HonelmError, match="changed since the run"):
        check_source(record, tmp_path)
    (model_dir / "config.json").unlink()
    (model_dir / "model.safetensors").unlink()
    model_dir.rmdir()
    with pytest.raises(HonelmError, match="is gone"):
        check_source(record, tmp_path)
