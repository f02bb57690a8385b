"""`encode_examples`: rows cut to max_length and counted, without transformers' "indexing errors" warning (honelm
cuts every row itself, so that warning would be wrong)."""

from __future__ import annotations

import pytest

from honelm.data.batches import encode_examples
from honelm.data.readers import Example
from honelm.tokenizer import train_tokenizer

WORDS = "the film was long and the music was loud but the story was good".split()


@pytest.mark.parametrize("kind, is_decoder", [("wordpiece", False), ("bpe", True)])
def test_a_text_longer_than_the_tokenizers_limit_is_cut_counted_and_not_warned_about(kind, is_decoder, capfd, caplog):
    tok = train_tokenizer([" ".join(WORDS)] * 50, kind=kind, vocab_size=300, model_max_length=16)
    rows = [Example(" ".join(WORDS * 4), None, "a", "f.jsonl", 1), Example("the film", None, "b", "f.jsonl", 2)]
    capfd.readouterr()
    enc = encode_examples(tok, rows, {"a": 0, "b": 1}, max_length=12, is_decoder=is_decoder)
    assert enc.truncated == 1 and max(len(r) for r in enc.ids) == 12
    assert "indexing errors" not in capfd.readouterr().err + caplog.text  # transformers' logger: either
