"""Tests for honelm.tokenizer: training (BPE / WordPiece), round trips, save/load, loading errors."""

from __future__ import annotations

import logging
import random
import re
from pathlib import Path

import huggingface_hub.constants
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from honelm.errors import ConfigError, HonelmError
from honelm.tokenizer import bytes_per_token_stats, load_tokenizer, pad_from_eos, train_tokenizer

# Vocabulary for a generated bilingual corpus (no dataset text is used).
_EN_SUBJECTS = ["The cat", "A small robot", "My teacher", "The old river", "Every student", "Her brother"]
_EN_VERBS = ["watches", "builds", "remembers", "crosses", "paints", "explains"]
_EN_OBJECTS = ["the bright moon", "a wooden bridge", "three green apples", "the quiet library", "an open window"]
_EN_ENDINGS = [".", "!", "?", " today.", " every morning."]
_KO_SUBJECTS = ["고양이가", "작은 로봇이", "선생님께서", "오래된 강이", "모든 학생이", "그녀의 동생이"]
_KO_OBJECTS = ["밝은 달을", "나무 다리를", "초록 사과 세 개를", "조용한 도서관을", "열린 창문을"]
_KO_VERBS = ["바라봅니다", "만듭니다", "기억합니다", "건넙니다", "그립니다", "설명합니다"]
_KO_ENDINGS = [".", "!", "?", " 오늘도.", " 매일 아침."]


def _corpus(n: int = 200, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if i % 2 == 0:
            s = f"{rng.choice(_EN_SUBJECTS)} {rng.choice(_EN_VERBS)} {rng.choice(_EN_OBJECTS)}{rng.choice(_EN_ENDINGS)}"
        else:
            s = f"{rng.choice(_KO_SUBJECTS)} {rng.choice(_KO_OBJECTS)} {rng.choice(_KO_VERBS)}{rng.choice(_KO_ENDINGS)}"
        if i % 7 == 0:
            s += " 🙂"
        out.append(s)
    return out


def _squash_punct_spaces(text: str) -> str:
    return re.sub(r"\s*([.,!?])\s*", r"\1", text)


CORPUS = _corpus()
KOREAN = [s for s in CORPUS if any("\uac00" <= ch <= "\ud7a3" for ch in s)]


@pytest.fixture(scope="module")
def bpe() -> PreTrainedTokenizerFast:
    return train_tokenizer(CORPUS, kind="bpe", vocab_size=500)


@pytest.fixture(scope="module")
def wordpiece() -> PreTrainedTokenizerFast:
    return train_tokenizer(CORPUS, kind="wordpiece", vocab_size=1000, min_frequency=1)


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world! It's 2024.",
        "한국어 문장입니다. 띄어쓰기 포함",
        "emoji 🎉👍🏽 and a family 👨‍👩‍👧",
        "mixed: 고양이가 watches 밝은 달을 🙂\n\ttabs  and   spaces ",
        "unseen script 日本語 and accents café",
        " leading space",
    ],
)
def test_bpe_round_trip_is_exact(bpe: PreTrainedTokenizerFast, text: str) -> None:
    ids = bpe(text)["input_ids"]
    assert bpe.unk_token_id is None or bpe.unk_token_id not in ids
    assert bpe.decode(ids) == text


def test_bpe_special_tokens_and_no_bos(bpe: PreTrainedTokenizerFast) -> None:
    assert bpe.eos_token == "<|endoftext|>"
    assert bpe.bos_token == "<|endoftext|>"
    assert bpe.pad_token == "<|pad|>"
    assert bpe.eos_token_id is not None and bpe.pad_token_id is not None
    assert bpe.bos_token_id == bpe.eos_token_id != bpe.pad_token_id
    assert bpe.padding_side == "right"
    assert bpe.model_max_length == 2048
    ids = bpe("The cat watches")["input_ids"]
    assert bpe.eos_token_id not in ids and bpe.pad_token_id not in ids
    batch = bpe(["The cat", "The cat watches the bright moon."], padding=True)
    assert batch["input_ids"][0][-1] == bpe.pad_token_id
    assert batch["attention_mask"][0][-1] == 0


def test_bpe_learns_merges(bpe: PreTrainedTokenizerFast) -> None:
    # A trained BPE must compress below one token per UTF-8 byte on its own corpus.
    stats = bytes_per_token_stats(bpe, CORPUS)
    assert stats["bytes_per_token"] > 2.0
    assert stats["unk_rate"] == 0.0
    assert stats["texts"] == len(CORPUS)


@pytest.mark.parametrize("kind,size", [("bpe", 500), ("bpe", 300), ("wordpiece", 1000), ("wordpiece", 400)])
def test_vocab_size_respected(kind: str, size: int) -> None:
    tok = train_tokenizer(CORPUS, kind=kind, vocab_size=size, min_frequency=1)
    assert len(tok) <= size
    assert len(tok.get_vocab()) == len(tok)


def test_bpe_vocab_too_small_is_config_error() -> None:
    with pytest.raises(ConfigError, match="at least"):
        train_tokenizer(CORPUS, kind="bpe", vocab_size=100)


def test_unknown_kind_is_config_error() -> None:
    with pytest.raises(ConfigError, match="bpe, wordpiece"):
        train_tokenizer(CORPUS, kind="unigram")


def test_wordpiece_korean_has_no_unk_and_decodes(wordpiece: PreTrainedTokenizerFast) -> None:
    assert len(KOREAN) >= 50
    for sentence in KOREAN:
        ids = wordpiece(sentence, add_special_tokens=False)["input_ids"]
        assert wordpiece.unk_token_id not in ids, sentence
        decoded = wordpiece.decode(ids)
        # Decode is exact modulo whitespace around punctuation.
        assert _squash_punct_spaces(decoded) == _squash_punct_spaces(sentence)
    # Real subwords: Korean words are not all split into single syllables.
    tokens = wordpiece.tokenize("선생님께서 조용한 도서관을 설명합니다.")
    assert any(len(t.removeprefix("##")) >= 2 for t in tokens)


def test_wordpiece_keeps_hangul_composed_and_case(wordpiece: PreTrainedTokenizerFast) -> None:
    tokens = wordpiece.tokenize("고양이가 The")
    # NFD normalization would produce conjoining jamo (U+1100..U+11FF) here.
    assert not any("\u1100" <= ch <= "\u11ff" for t in tokens for ch in t)
    assert "The" in tokens  # cased by default


def test_wordpiece_lowercase_option() -> None:
    tok = train_tokenizer(CORPUS, kind="wordpiece", vocab_size=1000, min_frequency=1, lowercase=True)
    assert tok.tokenize("THE CAT") == tok.tokenize("the cat")


def test_wordpiece_special_tokens_and_pair(wordpiece: PreTrainedTokenizerFast) -> None:
    assert [wordpiece.pad_token_id, wordpiece.unk_token_id, wordpiece.cls_token_id, wordpiece.sep_token_id,
            wordpiece.mask_token_id] == [0, 1, 2, 3, 4]
    enc = wordpiece("The cat watches", "고양이가 바라봅니다")
    ids, types = enc["input_ids"], enc["token_type_ids"]
    assert ids[0] == wordpiece.cls_token_id and ids[-1] == wordpiece.sep_token_id
    first_sep = ids.index(wordpiece.sep_token_id)
    assert set(types[: first_sep + 1]) == {0}
    assert set(types[first_sep + 1:]) == {1}
    single = wordpiece("The cat")
    assert single["input_ids"][0] == wordpiece.cls_token_id and single["input_ids"][-1] == wordpiece.sep_token_id
    assert set(single["token_type_ids"]) == {0}


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_save_and_autotokenizer_reload_identical(tmp_path: Path, bpe: PreTrainedTokenizerFast,
                                                 wordpiece: PreTrainedTokenizerFast, kind: str) -> None:
    tok = bpe if kind == "bpe" else wordpiece
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    samples = CORPUS[:20] + ["unseen 日本語 🎉", "한국어 문장입니다. 띄어쓰기 포함"]
    for s in samples:
        assert loaded(s)["input_ids"] == tok(s)["input_ids"]
    assert loaded("a b", "c d") == tok("a b", "c d")
    for attr in ("pad_token_id", "eos_token_id", "bos_token_id", "unk_token_id", "cls_token_id", "sep_token_id",
                 "mask_token_id", "padding_side", "model_max_length"):
        assert getattr(loaded, attr) == getattr(tok, attr), attr
    assert len(loaded) == len(tok)
    # load_tokenizer goes through the same path and keeps the existing pad token.
    via_honelm = load_tokenizer(tmp_path)
    assert via_honelm.pad_token_id == tok.pad_token_id
    assert pad_from_eos(via_honelm) is False


def test_training_from_generator_matches_list() -> None:
    from_list = train_tokenizer(CORPUS, kind="bpe", vocab_size=400)
    from_gen = train_tokenizer((s for s in CORPUS), kind="bpe", vocab_size=400)
    assert from_list.get_vocab() == from_gen.get_vocab()


def test_non_string_text_is_config_error() -> None:
    with pytest.raises(ConfigError, match="item 1"):
        train_tokenizer(["ok text", 3], kind="bpe", vocab_size=300)  # type: ignore[list-item]


def test_load_tokenizer_missing_local_dir(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(HonelmError, match="does not exist"):
        load_tokenizer(missing)
    with pytest.raises(HonelmError, match="does not exist"):
        load_tokenizer(f"./{missing.name}/tok")


def test_load_tokenizer_hub_id_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HonelmError, match="offline"):
        load_tokenizer("honelm-nonexistent-org/definitely-not-a-tokenizer")


def test_load_tokenizer_sets_pad_from_eos(tmp_path: Path, bpe: PreTrainedTokenizerFast,
                                          caplog: pytest.LogCaptureFixture) -> None:
    no_pad = train_tokenizer(CORPUS, kind="bpe", vocab_size=400)
    no_pad.pad_token = None
    no_pad.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="honelm.tokenizer"):
        tok = load_tokenizer(str(tmp_path))
    assert isinstance(tok, PreTrainedTokenizerBase)
    assert tok.pad_token_id == tok.eos_token_id is not None
    assert pad_from_eos(tok) is True
    assert "no pad token" in caplog.text
