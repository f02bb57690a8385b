"""Preference pairs: margins (every row or none, file:line:field errors), splits grouped by prompt with
full-content hashes, encoding through the chat template (drops counted, never silent), the batch layout."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from honelm.data.chat import ensure_template
from honelm.data.preferences import encode_pairs, read_pairs, split_pairs
from honelm.errors import DataError


def write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def tokenizer():
    from honelm.tokenizer import train_tokenizer

    texts = ["the film was wonderful .", "the film was dull .", "what did you think of the film ?"] * 20
    tok = train_tokenizer(texts, kind="bpe", vocab_size=300)
    ensure_template(tok)
    return tok


def test_margins_are_read_when_present_and_every_row_needs_one(tmp_path):
    rows = [{"prompt": "p1", "chosen": "a", "rejected": "b", "margin": 1.5},
            {"prompt": "p2", "chosen": "a", "rejected": "b", "margin": "2"}]
    pairs = read_pairs(write(tmp_path / "m.jsonl", rows), "margin")
    assert [p.margin for p in pairs] == [1.5, 2.0]
    assert [p.margin for p in read_pairs(str(tmp_path / "m.jsonl"), "")] == [None, None]  # ignored
    rows.append({"prompt": "p3", "chosen": "a", "rejected": "b"})
    with pytest.raises(DataError, match=r"m2.jsonl:3.*margin.*is missing, but other rows have it"):
        read_pairs(write(tmp_path / "m2.jsonl", rows), "margin")
    with pytest.raises(DataError, match=r"m3.jsonl:1.*margin.*finite number"):
        read_pairs(write(tmp_path / "m3.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b", "margin": True}]),
                   "margin")


def test_bad_rows_name_file_line_and_field(tmp_path):
    rows = [{"prompt": "p1", "chosen": "a", "rejected": "b"}, {"prompt": "p2", "chosen": "a"}]
    with pytest.raises(DataError, match=r"bad.jsonl:2.*rejected"):
        read_pairs(write(tmp_path / "bad.jsonl", rows))


@dataclass
class Data:
    train: str
    val: str = ""
    test: str = ""
    split: str = "6:2:2"
    seed: int = 0
    dedup: bool = False
    near_dup_threshold: float = 0.8
    margin_field: str = ""


def test_pairs_of_one_prompt_stay_in_one_split_and_hashes_cover_the_replies(tmp_path):
    rows = [{"prompt": f"question number {i % 20} about topic {i % 20}", "chosen": f"good {i}", "rejected": f"bad {i}"}
            for i in range(60)]  # 20 prompts, 3 pairs each
    data = Data(write(tmp_path / "p.jsonl", rows))
    splits = split_pairs(data, lambda _: None)
    train_prompts = {r.text for r in splits.train}
    assert not train_prompts & {r.text for r in splits.val}
    assert len(splits.train) % 3 == 0 and len(splits.val) % 3 == 0
    hashes = splits.manifest["hashes"]
    assert {"train", "val", "test", "train_pairs", "val_pairs", "test_pairs"} <= set(hashes)
    rows[0]["chosen"] = "an edited reply"  # same prompts, so the same split; the content hash notices
    again = split_pairs(Data(write(tmp_path / "p.jsonl", rows)), lambda _: None)
    changed = {k for k in hashes if hashes[k] != again.manifest["hashes"][k]}
    assert len(changed) == 1 and changed < {"train_pairs", "val_pairs", "test_pairs"}


def test_encoding_labels_the_reply_and_drops_pairs_cut_away_counting_them(tokenizer):
    from honelm.data.preferences import PairRow, describe_encoding, prompt_identity
    from honelm.data.chat import Preference

    def row(prompt: str, chosen: str, rejected: str, line: int) -> PairRow:
        msgs = [{"role": "user", "content": prompt}]
        return PairRow(prompt_identity(msgs), "f.jsonl", line, pair=Preference(msgs, chosen, rejected, "f.jsonl", line))

    rows = [row("what did you think of the film ?", "the film was wonderful .", "the film was dull .", 1),
            row("what did you think of the film ? " * 8, "wonderful", "dull", 2)]  # the prompt fills max_length
    enc = encode_pairs(tokenizer, rows, max_length=40)
    assert len(enc) == 1 and [r.line for r in enc.dropped] == [2]
    note = describe_encoding(enc, "train", 40, False)
    assert "1 train pairs dropped" in note and "f.jsonl:2" in note
    reply = tokenizer.decode([t for t in enc.chosen_labels[0] if t != -100])
    assert reply == "the film was wonderful ." + tokenizer.eos_token  # reply + end of turn, no prompt
    batch = enc.collate([0])
    assert batch["input_ids"].shape[0] == 2 and torch.equal(batch["index"], torch.tensor([0]))
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    short = encode_pairs(tokenizer, rows[:1], max_length=len(enc.chosen[0]) - 2)  # cuts the chosen reply
    assert short.truncated == 1 and len(short) == 1
    assert len(encode_pairs(tokenizer, rows[:1], max_length=len(enc.chosen[0]) - 2, drop_truncated=True)) == 0


def test_a_long_multi_turn_prompt_loses_its_oldest_exchanges_first(tokenizer):
    from honelm.data.chat import Preference
    from honelm.data.preferences import PairRow, describe_encoding, older_turns_dropped, prompt_identity

    long = "what did you think of the film ? " * 4
    msgs = [{"role": "system", "content": "be brief ."},
            {"role": "user", "content": long}, {"role": "assistant", "content": long},
            {"role": "user", "content": long}, {"role": "assistant", "content": long},
            {"role": "user", "content": "the film ?"}]
    assert [m["role"] for m in older_turns_dropped(msgs)] == ["system", "user", "assistant", "user"]
    assert older_turns_dropped(msgs[:1] + msgs[-1:]) is None  # only the last user turn is left
    row = PairRow(prompt_identity(msgs), "f.jsonl", 1, pair=Preference(msgs, "wonderful .", "dull .", "f.jsonl", 1))
    enc = encode_pairs(tokenizer, [row], max_length=60)
    assert len(enc) == 1 and enc.trimmed == 1 and enc.truncated == 0
    text = tokenizer.decode(enc.chosen[0])
    assert text.startswith("<|system|>\nbe brief .") and text.count("<|user|>") < 3  # oldest exchange(s) gone
    assert "trim_turns" in describe_encoding(enc, "train", 60, False)
    assert len(encode_pairs(tokenizer, [row], max_length=60, trim_turns=False)) == 0  # cut at the end: no reply left
