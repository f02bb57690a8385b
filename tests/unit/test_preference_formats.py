"""Preference data as shipped: hh-rlhf dialogue text and whole message lists split into prompt + two replies (bad rows
named by file and line), KTO's unpaired {prompt, completion, label} rows and pairs unpaired, the both-kinds check,
mismatched KL partners, and the [examples; KL rows] batch."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from honelm.data.chat import ensure_template
from honelm.data.preferences import read_pairs
from honelm.data.unpaired import encode_examples, kl_partners, read_examples, split_examples
from honelm.errors import DataError

HH_CHOSEN = ("\n\nHuman: hi there\n\nAssistant: hello!\n\nHuman: tell me about the film\n\n"
             "Assistant: the film was wonderful .")
HH_REJECTED = ("\n\nHuman: hi there\n\nAssistant: hello!\n\nHuman: tell me about the film\n\n"
               "Assistant: the film was dull .")


def write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_hh_rlhf_text_is_split_at_the_last_assistant_turn(tmp_path):
    [row] = read_pairs(write(tmp_path / "hh.jsonl", [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}]))
    pair = row.pair
    assert pair.prompt == [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello!"},
                           {"role": "user", "content": "tell me about the film"}]
    assert (pair.chosen, pair.rejected) == ("the film was wonderful .", "the film was dull .")
    # replies that share their first words are still whole replies: the split is at the turn, not the characters
    [same_start] = read_pairs(write(tmp_path / "s.jsonl", [{"chosen": "\n\nHuman: q\n\nAssistant: yes, it is",
                                                            "rejected": "\n\nHuman: q\n\nAssistant: yes, no"}]))
    assert same_start.pair.chosen == "yes, it is" and same_start.pair.prompt == [{"role": "user", "content": "q"}]


def test_message_lists_are_split_the_same_way(tmp_path):
    prompt = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "the film?"}]
    row = {"chosen": prompt + [{"role": "assistant", "content": "wonderful"}],
           "rejected": prompt + [{"role": "assistant", "content": "dull"}]}
    [pair] = read_pairs(write(tmp_path / "m.jsonl", [row]))
    assert pair.pair.prompt == prompt and (pair.pair.chosen, pair.pair.rejected) == ("wonderful", "dull")


@pytest.mark.parametrize("chosen, rejected, field, match", [
    (HH_CHOSEN, HH_CHOSEN, "rejected", "final assistant turn is identical"),
    ("\n\nHuman: a\n\nAssistant: x", "\n\nHuman: b\n\nAssistant: y", "rejected", "shares no prefix"),
    ("\n\nHuman: a\n\nAssistant: x\n\nHuman: c\n\nAssistant: z", "\n\nHuman: a\n\nAssistant: y\n\nHuman: c\n\n"
     "Assistant: w", "chosen", "before the final assistant turn"),
    ("\n\nHuman: a\n\nAssistant: x\n\nHuman: more", "\n\nHuman: a\n\nAssistant: y", "chosen", "must end with an "
     "assistant turn"),
    ("just a reply", "\n\nHuman: a\n\nAssistant: y", "chosen", "string without a prompt"),
])
def test_bad_dialogue_rows_name_file_line_and_field(tmp_path, chosen, rejected, field, match):
    rows = [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}, {"chosen": chosen, "rejected": rejected}]
    with pytest.raises(DataError, match=match) as e:
        read_pairs(write(tmp_path / "bad.jsonl", rows))
    assert e.value.path.endswith("bad.jsonl") and e.value.line == 2 and e.value.field == field


def test_unpaired_rows_are_read_directly_and_pairs_unpaired(tmp_path):
    rows = [{"prompt": "the film?", "completion": "wonderful", "label": True},
            {"prompt": [{"role": "user", "content": "the cast?"}], "completion": [{"role": "assistant",
                                                                                  "content": "dull"}], "label": "false"},
            {"prompt": "the music?", "chosen": "lovely", "rejected": "bad"}]
    examples = [r.example for r in read_examples(write(tmp_path / "k.jsonl", rows))]
    assert [(e.completion, e.desirable, e.line) for e in examples] == [("wonderful", True, 1), ("dull", False, 2),
                                                                       ("lovely", True, 3), ("bad", False, 3)]
    assert examples[1].prompt == [{"role": "user", "content": "the cast?"}]
    for bad, field in [({"prompt": "p", "completion": "c", "label": "maybe"}, "label"),
                       ({"prompt": "p", "label": True}, "completion")]:
        with pytest.raises(DataError, match=rf"k2.jsonl:1.*'{field}'"):
            read_examples(write(tmp_path / "k2.jsonl", [bad]))


@dataclass
class Data:
    train: str
    val: str = ""
    test: str = ""
    split: str = "8:2:0"
    seed: int = 0
    dedup: bool = False
    near_dup_threshold: float = 0.9


def test_kto_needs_desirable_and_undesirable_training_examples(tmp_path):
    rows = [{"prompt": f"question {i}", "completion": "yes", "label": True} for i in range(10)]
    with pytest.raises(DataError, match=r"only.jsonl.*all 10 examples are desirable.*needs both"):
        split_examples(Data(write(tmp_path / "only.jsonl", rows)), lambda _: None)
    rows[3]["label"] = False
    splits = split_examples(Data(write(tmp_path / "both.jsonl", rows)), lambda _: None)
    assert len(splits.train) + len(splits.val) == 10 and "train_pairs" in splits.manifest["hashes"]


def test_kl_partners_take_another_prompt_and_wrap():
    assert kl_partners(["a", "a", "b", "c", "c"]) == [2, 2, 3, 0, 0]
    assert kl_partners(["a", "b", "a"]) == [1, 2, 1]  # the last run wraps onto its own prompt: the next run instead
    assert kl_partners(["a", "a", "a"]) == [1, 2, 0]  # one prompt only: the next example
    assert kl_partners(["a"]) == [0]


def test_encoded_examples_batch_as_examples_then_their_kl_rows(tmp_path):
    from honelm.tokenizer import train_tokenizer

    tok = train_tokenizer(["the film was wonderful .", "the film was dull .", "what about the film ?"] * 20,
                          kind="bpe", vocab_size=300)
    ensure_template(tok)
    rows = read_examples(write(tmp_path / "e.jsonl", [
        {"prompt": "what about the film ?", "chosen": "the film was wonderful .", "rejected": "the film was dull ."},
        {"prompt": "the film ?", "completion": "dull", "label": False}]))
    enc = encode_examples(tok, rows, max_length=64)
    assert len(enc) == 3 and enc.counts == (1, 2)
    reply = lambda labels: tok.decode([t for t in labels if t != -100])  # noqa: E731
    # example 0's KL row: its prompt with the completion of the next example of another prompt (example 2)
    assert reply(enc.kl_labels[0]) == "dull" + tok.eos_token
    assert tok.decode(enc.kl_ids[0]).startswith(tok.decode(enc.ids[0])[:20])
    batch = enc.collate([2, 0])
    assert batch["input_ids"].shape[0] == 4 and batch["desirable"].tolist() == [False, True]
    assert batch["index"].tolist() == [2, 0]
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    enc.ref_logps = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]])
    assert enc.collate([2, 0])["ref_logps"].tolist() == [3.0, 1.0, 30.0, 10.0]
