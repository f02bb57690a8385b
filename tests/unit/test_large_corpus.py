"""The memory-mapped corpus path (data.memmap) equals the in-memory one: split, manifest, blocks, batches."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from honelm.config import cache_root
from honelm.data.large_corpus import CorpusPart, corpus_splits, wants_memmap
from honelm.data.packing import pack
from honelm.data.readers import read_documents
from honelm.data.sections import TextDataConfig
from honelm.data.sources import text_splits
from honelm.data.token_file import MemmapBlocks, token_dtype
from honelm.errors import ConfigError
from honelm.loop import BatchStream
from honelm.tokenizer import train_tokenizer

WORDS = "the a film cast plot was very good bad slow long music story ending actor scene dull great".split()


def _corpus(path, n: int = 240) -> list[str]:
    rng = random.Random(3)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30))) for _ in range(n)]
    lines += lines[:12]  # exact duplicates
    lines += [line + " indeed" for line in lines[20:40] if len(line.split()) > 20]  # near duplicates
    lines += ["영화는 정말 재미있었다 " * 3, ""]  # non-ASCII; a blank line is not a document
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return lines


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("memmap")
    path = folder / "corpus.txt"
    lines = _corpus(path)
    tok = train_tokenizer([x for x in lines if x], vocab_size=300)
    return path, tok, folder


def _data(path, folder, **over) -> TextDataConfig:
    fields = dict(train=str(path), memmap="on", cache_dir=str(folder / "cache"), tokenize_workers=1)
    return TextDataConfig(**{**fields, **over})


def _texts(part: CorpusPart, path) -> list[str]:
    docs = read_documents(str(path))
    return [docs[i].text for i in part.order.tolist()]


@pytest.mark.parametrize("over", [{}, {"seed": 7, "split": "6:2:2", "dedup": True, "near_dup_threshold": 0.7}])
def test_split_and_manifest_equal_the_in_memory_path(corpus, over):
    path, _, folder = corpus
    said: list[str] = []
    ram = text_splits(_data(path, folder, memmap="off", **over), said.append)
    big = corpus_splits(_data(path, folder, **over), said.append)
    assert isinstance(big.train, CorpusPart)
    assert _texts(big.train, path) == [d.text for d in ram.train]
    assert _texts(big.val, path) == [d.text for d in ram.val]
    from honelm.data.splits import unlock_test_split
    with unlock_test_split("test"):
        assert _texts(big.test, path) == [d.text for d in ram.test]
    a, b = ram.manifest, big.manifest
    assert a["hashes"] == b["hashes"] and a["counts"] == b["counts"] and a["dedup"] == b["dedup"]
    near = dict(b["duplicates"]["near"])
    assert near.pop("sample")["whole_corpus"]
    assert a["duplicates"]["exact"] == b["duplicates"]["exact"] and a["duplicates"]["near"] == near
    assert a["duplicates"]["near"]["count"] > 0  # the comparison covers listed pairs


def test_blocks_and_batches_equal_packed_blocks(corpus):
    path, tok, folder = corpus
    said: list[str] = []
    ram = text_splits(_data(path, folder, memmap="off"), said.append)
    big = corpus_splits(_data(path, folder), said.append)
    for name in ("train", "val"):
        packed = pack(tok, [d.text for d in getattr(ram, name)], 16)
        served = getattr(big, name).blocks(tok, 16)
        assert isinstance(served, MemmapBlocks) and served.dtype == np.dtype(np.uint16).str
        assert len(served) == len(packed) and served.n_bytes == packed.n_bytes
        every = list(range(len(packed)))
        for key, value in packed.collate(every).items():
            assert torch.equal(served.collate(every)[key], value), key
    streams = [BatchStream(len(b), b.collate, 4, 2, seed=5) for b in (packed, served)]
    for _ in range(2 * len(packed) // 8 + 1):  # past an epoch's end
        for x, y in zip(*(s.next_step() for s in streams)):
            assert all(torch.equal(x[k], y[k]) for k in x)


def test_cache_is_reused_and_workers_give_the_same_file(corpus, tmp_path):
    path, tok, _ = corpus
    said: list[str] = []
    one = corpus_splits(_data(path, tmp_path, tokenize_workers=1), said.append).train.blocks(tok, 16)
    assert not any("reused from" in line for line in said), said
    said.clear()
    two = corpus_splits(_data(path, tmp_path), said.append).train.blocks(tok, 16)
    assert sum("reused from" in line for line in said) == 3, said  # scan, token file, split streams
    parallel = corpus_splits(_data(path, tmp_path / "p", tokenize_workers=2), said.append).train.blocks(tok, 16)
    assert one.path == two.path and one.path.read_bytes() == parallel.path.read_bytes()
    assert (tmp_path / "cache" / "corpus").is_dir()


def test_selection_and_cache_location(corpus, monkeypatch, tmp_path):
    path, _, folder = corpus
    assert not wants_memmap(_data(path, folder, memmap="auto"), print)  # a few kB: today's in-memory path
    assert wants_memmap(_data(path, folder, memmap="auto", memmap_threshold_mb=0.001), print)
    assert not wants_memmap(_data(path, folder, memmap="off", memmap_threshold_mb=0), print)
    monkeypatch.setenv("HONELM_CACHE_DIR", str(tmp_path / "h"))
    assert cache_root() == tmp_path / "h" and cache_root("/x/y") == cache_root("/x/y")
    monkeypatch.delenv("HONELM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "honelm"
    assert token_dtype(65535) == np.uint16 and token_dtype(65536) == np.uint32


def test_near_duplicates_in_a_sample_say_so(corpus, tmp_path):
    path, _, _ = corpus
    said: list[str] = []
    big = corpus_splits(_data(path, tmp_path, near_dup_sample=50), said.append)
    sample = big.manifest["duplicates"]["near"]["sample"]
    assert sample["documents"] == 50 and not sample["whole_corpus"]
    assert any("a sample of 50 of" in line for line in said)


def test_a_user_test_file_is_hashed_and_read_only_by_honelm_test(corpus, tmp_path):
    path, _, folder = corpus
    test_file = tmp_path / "test.txt"
    test_file.write_text("the film was good\nthe cast was bad\n", encoding="utf-8")
    said: list[str] = []
    ram = text_splits(_data(path, folder, memmap="off", test=str(test_file)), said.append)
    big = corpus_splits(_data(path, folder, test=str(test_file)), said.append)
    assert ram.manifest["hashes"] == big.manifest["hashes"] and ram.manifest["counts"] == big.manifest["counts"]
    assert big.manifest["test_source"] == ram.manifest["test_source"]
    from honelm.data.splits import unlock_test_split
    with unlock_test_split("test"):
        assert [d.text for d in big.test] == ["the film was good", "the cast was bad"]


def test_what_cannot_stream_is_refused_under_on_and_said_under_auto(corpus):
    """A large corpus the streamed path cannot take (here a validation file) is read into memory under auto, with
    a note saying so (it would otherwise fill the memory without a word); under on it is an error."""
    path, _, folder = corpus
    said: list[str] = []
    large = _data(path, folder, memmap="auto", memmap_threshold_mb=0.001, val=str(path))
    assert not wants_memmap(large, said.append)
    assert len(said) == 1 and "is read into memory: the streamed path cannot take a validation file" in said[0]
    with pytest.raises(ConfigError, match="data.memmap=on .* cannot do with a validation file"):
        wants_memmap(_data(path, folder, memmap="on", val=str(path)), said.append)
    said.clear()
    assert not wants_memmap(_data(path, folder, memmap="auto", val=str(path)), said.append) and said == []
