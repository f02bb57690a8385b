"""Tests for honelm.data.splits: deterministic, stratified, leak-checked, test-locked splits."""

from __future__ import annotations

import json
import random
import threading
from collections import Counter
from pathlib import Path

import pytest

from honelm.data import splits as S
from honelm.data.readers import Document, Example, read_examples
from honelm.errors import DataError, HonelmError, TestSplitAccessError

WORDS = (
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
    "sigma tau upsilon phi chi psi omega river stone cloud lamp chair table window garden"
).split()


def sentence(rng: random.Random, n: int = 12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + f" {rng.random():.12f}"


def dataset(sizes: dict[str, int], seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    out: list[Example] = []
    for label, n in sizes.items():
        for _ in range(n):
            out.append(Example(sentence(rng), None, label, "data.jsonl", len(out) + 1))
    return out


def split_hashes(sp: S.Splits) -> dict[str, list[str]]:
    return sp.manifest["example_hashes"]


def read_test(sp: S.Splits) -> list:
    with S.unlock_test_split("unit test"):
        return sp.test


# --------------------------------------------------------------------------------- ratios


@pytest.mark.parametrize(
    "spec, expected",
    [("8:1:1", (0.8, 0.1, 0.1)), ("6:2:2", (0.6, 0.2, 0.2)), ("0.8,0.1,0.1", (0.8, 0.1, 0.1)),
     ([8, 1, 1], (0.8, 0.1, 0.1)), ("9:1:0", (0.9, 0.1, 0.0))],
)
def test_parse_ratios(spec: object, expected: tuple[float, float, float]) -> None:
    assert S.parse_ratios(spec) == pytest.approx(expected)  # type: ignore[arg-type]


@pytest.mark.parametrize("spec", ["8:1", "8:-1:1", "0:0:0", "0:1:1", "a:b:c", [1, 2, 3, 4]])
def test_parse_ratios_rejects(spec: object) -> None:
    with pytest.raises(ValueError):
        S.parse_ratios(spec)  # type: ignore[arg-type]


def test_zero_ratio_gives_an_empty_split() -> None:
    s = S.make_splits(dataset({"a": 18, "b": 2}), ratios="9:1:0")
    assert s.manifest["counts"]["test"] == 0 and len(s.train) + len(s.val) == 20
    with S.unlock_test_split("test"):
        assert s.test == []


def test_content_hash_ignores_label_but_not_pair() -> None:
    a = Example("t", None, 1, "x", 1)
    assert S.content_hash(a) == S.content_hash(Example("t", None, 2, "y", 9))
    assert S.content_hash(a) != S.content_hash(Example("t", "p", 1, "x", 1))
    assert S.content_hash(Document("t", "z", 3)) == S.content_hash(a)


# ---------------------------------------------------------------------------- determinism


def test_deterministic_by_content_and_seed() -> None:
    data = dataset({"a": 120, "b": 80})
    first = S.make_splits(data, seed=3)
    again = S.make_splits(list(data), seed=3)
    shuffled = list(data)
    random.Random(1).shuffle(shuffled)
    reordered = S.make_splits(shuffled, seed=3)
    other_seed = S.make_splits(data, seed=4)
    assert split_hashes(first) == split_hashes(again) == split_hashes(reordered)
    assert first.manifest["hashes"] == reordered.manifest["hashes"]
    assert first.train == reordered.train  # even the order of rows is content-determined
    assert split_hashes(first)["val"] != split_hashes(other_seed)["val"]


def test_splits_are_disjoint_and_complete() -> None:
    data = dataset({"a": 300, "b": 200, "c": 7})
    sp = S.make_splits(data, seed=0)
    parts = {name: set(h) for name, h in split_hashes(sp).items()}
    assert not parts["train"] & parts["val"]
    assert not parts["train"] & parts["test"]
    assert not parts["val"] & parts["test"]
    assert sum(sp.manifest["counts"].values()) == len(data)
    assert sorted(map(S.content_hash, sp.train + sp.val + read_test(sp))) == sorted(map(S.content_hash, data))


@pytest.mark.parametrize("ratios", ["8:1:1", "6:2:2"])
def test_stratified_within_one_example_per_label(ratios: str) -> None:
    sizes = {"pos": 517, "neg": 331, "neutral": 152}
    sp = S.make_splits(dataset(sizes), ratios=ratios)
    r = S.parse_ratios(ratios)
    hist = sp.manifest["label_histogram"]
    for label, n in sizes.items():
        for i, name in enumerate(S.SPLIT_NAMES):
            assert abs(hist[name].get(label, 0) - n * r[i]) <= 1, (label, name, hist)
    assert sp.manifest["stratified"] is True
    assert Counter(e.label for e in read_test(sp)) == Counter(hist["test"])


@pytest.mark.parametrize("ratios", ["8:1:1", "2:4:4"])
def test_every_label_keeps_a_train_example(ratios: str) -> None:
    sizes = {"common": 200, "one": 1, "two": 2, "three": 3, "five": 5}
    sp = S.make_splits(dataset(sizes), ratios=ratios)
    train_labels = {e.label for e in sp.train}
    assert train_labels == set(sizes)
    assert {e.label for e in sp.val + read_test(sp)} <= train_labels
    assert sp.manifest["label_histogram"]["train"]["one"] == 1


def test_exact_duplicates_never_straddle() -> None:
    base = dataset({"a": 60, "b": 40}, seed=5)
    data = base + base[:30] + base[:10]  # 10 rows thrice, 20 rows twice
    data += [Example(base[3].text, None, "b", "noisy.jsonl", 1)]  # same text, conflicting label
    sp = S.make_splits(data, seed=2)
    where: dict[str, set[str]] = {}
    for name, rows in (("train", sp.train), ("val", sp.val), ("test", read_test(sp))):
        for e in rows:
            where.setdefault(S.content_hash(e), set()).add(name)
    assert all(len(places) == 1 for places in where.values())
    assert sp.manifest["duplicates"]["exact"]["count"] == 0
    assert sum(sp.manifest["duplicates"]["exact"]["within_split"].values()) == 41


def test_documents_split_unstratified() -> None:
    docs = [Document(f"document number {i} about {WORDS[i % len(WORDS)]}", "d.txt", i + 1) for i in range(50)]
    sp = S.make_splits(docs)
    assert sp.manifest["stratified"] is False
    assert sp.manifest["counts"] == {"train": 40, "val": 5, "test": 5}


# ---------------------------------------------------------------------------- near duplicates


def planted_pair() -> tuple[str, str]:
    rng = random.Random(11)
    words = [rng.choice(WORDS) + str(i) for i in range(20)]
    changed = list(words)
    changed[10] = "replaced"
    return " ".join(words), " ".join(changed)


def test_near_duplicate_found_and_unrelated_not() -> None:
    original, edited = planted_pair()
    train = dataset({"a": 40, "b": 40}, seed=8) + [Example(original, None, "a", "train.jsonl", 99)]
    val = [Example(edited, None, "a", "val.jsonl", 4)] + dataset({"a": 5, "b": 5}, seed=9)
    # One changed word in 20 touches 3 of 18 word 3-grams: Jaccard 15/21 = 0.714.
    sp = S.make_splits(train, ratios="8:1:1", val=val, near_dup_threshold=0.7)
    near = sp.manifest["duplicates"]["near"]
    pairs = [(p["a_source"], p["a_line"], p["b_source"], p["b_line"]) for p in near["pairs"]]
    assert ("train.jsonl", 99, "val.jsonl", 4) in pairs
    assert near["count"] == 1, near  # random unrelated sentences are never reported
    assert near["pairs"][0]["jaccard"] == pytest.approx(15 / 21, abs=1e-3)
    assert near["complete"] is True


def test_near_duplicate_default_threshold_catches_case_and_punctuation() -> None:
    train = dataset({"a": 30}) + [Example("The Quick brown fox, jumps over the lazy dog!", None, "a", "t", 1)]
    val = [Example("the quick brown fox jumps over the lazy dog", None, "a", "v", 1)]
    sp = S.make_splits(train, val=val)
    assert sp.manifest["duplicates"]["near"]["count"] == 1
    assert sp.manifest["duplicates"]["exact"]["count"] == 0


def test_near_duplicates_in_cjk_use_characters() -> None:
    text = "自然言語処理は人工知能の一分野であり、人間の言語をコンピュータで扱う技術です"
    train = dataset({"a": 20}) + [Example(text, None, "a", "t", 1)]
    val = [Example(text.replace("技術", "方法"), None, "a", "v", 1)]
    # No spaces, so char 5-grams (a word 3-gram would be the whole text and share nothing):
    # the 2 changed characters near the end touch 4 of 33 grams, Jaccard 29/37.
    sp = S.make_splits(train, val=val, near_dup_threshold=0.75)
    assert sp.manifest["duplicates"]["near"]["count"] == 1
    assert sp.manifest["duplicates"]["near"]["pairs"][0]["jaccard"] == pytest.approx(29 / 37, abs=1e-3)


def test_dedup_removes_from_train_only() -> None:
    original, edited = planted_pair()
    train = dataset({"a": 40, "b": 40}, seed=8)
    exact = Example(train[0].text, None, "a", "copy.jsonl", 3)
    near = Example(original, None, "a", "train.jsonl", 99)
    val = [exact, Example(edited, None, "a", "val.jsonl", 4)] + dataset({"a": 3, "b": 3}, seed=9)
    kept = S.make_splits(train + [near], val=val, near_dup_threshold=0.7)
    assert kept.manifest["duplicates"]["exact"]["count"] == 1
    assert kept.manifest["dedup"]["removed_from_train"] == 0
    sp = S.make_splits(train + [near], val=val, near_dup_threshold=0.7, dedup=True)
    train_hashes = {S.content_hash(e) for e in sp.train}
    assert S.content_hash(near) not in train_hashes and S.content_hash(exact) not in train_hashes
    assert sp.val == val  # val untouched
    assert sp.manifest["dedup"]["removed_from_train"] == 2
    removed = {(r["source"], r["line"]) for r in sp.manifest["dedup"]["removed"]}
    assert removed == {("train.jsonl", 99), (train[0].source, train[0].line)}
    assert sp.manifest["counts"]["train"] == kept.manifest["counts"]["train"] - 2


# ----------------------------------------------------------------------------- supplied splits


def test_user_val_is_respected_and_ratios_apply_to_the_rest() -> None:
    data = dataset({"a": 90})
    val = dataset({"a": 7}, seed=42)
    sp = S.make_splits(data, ratios="8:1:1", val=val)
    assert sp.val == val
    assert sp.manifest["counts"] == {"train": 80, "val": 7, "test": 10}  # train:test = 8:1
    assert sp.manifest["ratio_splits"] == ["train", "test"]


def test_user_val_with_unseen_label_errors() -> None:
    val = [Example("brand new text here", None, "never", "val.jsonl", 5)]
    with pytest.raises(DataError) as info:
        S.make_splits(dataset({"a": 20}), val=val)
    assert (info.value.path, info.value.line, info.value.field) == ("val.jsonl", 5, "label")


def test_user_test_file_is_lazy_and_checked_on_access(tmp_path: Path) -> None:
    test_file = tmp_path / "test.jsonl"
    rows = [{"text": "held out one", "label": "a"}, {"text": "held out two", "label": "zzz"}]
    test_file.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    calls: list[int] = []

    def load_test() -> list[Example]:
        calls.append(1)
        return read_examples(test_file)

    texts = [S.content_text(e) for e in read_examples(test_file, label_field=None)]
    data = dataset({"a": 50})
    val = dataset({"a": 5}, seed=3)
    sp = S.make_splits(data, val=val, load_test=load_test, test_texts_for_leak_check=texts, test_path=test_file)
    assert not calls  # labels of the test file were never parsed
    assert sp.manifest["counts"] == {"train": 50, "val": 5, "test": 2}
    assert sp.manifest["test_source"] == str(test_file)
    assert "test" not in sp.manifest["example_hashes"]
    assert sp.manifest["hashes"]["test"] == sp.manifest["test_file_sha256"]
    with pytest.raises(TestSplitAccessError):
        sp.test
    assert not calls
    with pytest.raises(DataError, match="'zzz' in the test split never appears in train"):
        read_test(sp)
    assert calls == [1]


def test_user_test_leak_check_reports_duplicates() -> None:
    data = dataset({"a": 30})
    test = [Example(data[0].text, None, "a", "test.jsonl", 1)]
    sp = S.make_splits(
        data, val=dataset({"a": 3}, seed=1), load_test=lambda: test,
        test_texts_for_leak_check=[S.content_text(e) for e in test], test_path=None, dedup=True,
    )
    exact = sp.manifest["duplicates"]["exact"]
    assert exact["count"] == 1 and exact["pairs"][0]["b_split"] == "test"
    assert sp.manifest["dedup"]["removed_from_train"] == 1
    assert read_test(sp) == test


def test_user_test_that_changed_is_refused() -> None:
    data = dataset({"a": 30})
    sp = S.make_splits(
        data, val=dataset({"a": 3}, seed=1), load_test=lambda: dataset({"a": 2}, seed=2),
        test_texts_for_leak_check=["something else"],
    )
    with pytest.raises(HonelmError, match="does not match"):
        read_test(sp)


# ----------------------------------------------------------------------------------- test lock


def test_test_split_is_locked_and_access_is_counted() -> None:
    sp = S.make_splits(dataset({"a": 30, "b": 30}))
    before = S.test_access_count()
    with pytest.raises(TestSplitAccessError):
        sp.test
    assert S.test_access_count() == before
    with S.unlock_test_split("final evaluation"):
        rows = sp.test
        sp.test
    assert len(rows) == sp.manifest["counts"]["test"] > 0
    assert S.test_access_count() == before + 2
    with pytest.raises(TestSplitAccessError):
        sp.test  # locked again after the block


def test_unlock_does_not_leak_to_other_threads() -> None:
    sp = S.make_splits(dataset({"a": 30}))
    seen: list[BaseException] = []

    def other() -> None:
        try:
            sp.test
        except TestSplitAccessError as e:
            seen.append(e)

    with S.unlock_test_split("final evaluation"):
        worker = threading.Thread(target=other)
        worker.start()
        worker.join()
    assert len(seen) == 1


# ------------------------------------------------------------------------------------ manifest


def test_manifest_is_json_serialisable_with_the_keys() -> None:
    sp = S.make_splits(dataset({"a": 40, "b": 20}), ratios="6:2:2", seed=7)
    m = json.loads(json.dumps(sp.manifest))
    for key in ("seed", "ratios", "stratified", "counts", "label_histogram", "hashes",
                "example_hashes", "duplicates", "dedup", "test_source"):
        assert key in m
    assert m["seed"] == 7 and m["ratios"] == pytest.approx([0.6, 0.2, 0.2])
    assert set(m["hashes"]) == set(m["example_hashes"]) == {"train", "val", "test"}
    assert set(m["duplicates"]) >= {"exact", "near"}
    assert set(m["duplicates"]["near"]) >= {"count", "threshold", "pairs"}
    assert set(m["dedup"]) == {"enabled", "removed_from_train", "removed"}
    assert m["test_source"] == "ratio"


def test_verify_manifest() -> None:
    data = dataset({"a": 40, "b": 20})
    m = S.make_splits(data, seed=1).manifest
    S.verify_manifest(m, S.make_splits(list(reversed(data)), seed=1).manifest)
    with pytest.raises(HonelmError, match="differ"):
        S.verify_manifest(m, S.make_splits(data, seed=2).manifest)
    with pytest.raises(HonelmError):
        S.verify_manifest({}, m)


def test_user_test_path_list_is_hashed_together(tmp_path: Path) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("held out a\n", encoding="utf-8")
    b.write_text("held out b\n", encoding="utf-8")
    docs = [Document(f"training document {i}", "d.txt", i + 1) for i in range(20)]

    def make() -> S.Splits:
        return S.make_splits(docs, ratios="9:1:0", load_test=lambda: [], test_path=[a, b])

    first = make().manifest
    assert first["test_source"] == f"{a},{b}" and first["hashes"]["test"]
    b.write_text("held out b, edited\n", encoding="utf-8")
    with pytest.raises(HonelmError):
        S.verify_manifest(first, make().manifest)


def test_a_large_file_is_hashed_once_per_process_and_again_when_it_changes(tmp_path, monkeypatch):
    """The pins and the token-file cache both hash a corpus: the second pass reuses the first (large files only)."""
    import hashlib as _hashlib

    from honelm.data import splits as S
    monkeypatch.setattr(S, "REMEMBER_DIGEST_BYTES", 10)
    monkeypatch.setattr(S, "_DIGESTS", {})
    big, small = tmp_path / "big.txt", tmp_path / "small.txt"
    big.write_text("a long enough corpus\n")
    small.write_text("tiny\n")
    reads = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: (reads.append(str(f)), real_open(f, *a, **k))[1])
    first = S.file_digest(big)
    assert S.file_digest(big) == first == _hashlib.sha256(b"a long enough corpus\n").hexdigest()
    S.file_digest(small), S.file_digest(small)
    assert reads.count(str(big)) == 1 and reads.count(str(small)) == 2
    big.write_text("another long corpus!\n")  # the same size, a new modification time
    import os as _os
    _os.utime(big, ns=(1, 1))
    assert S.file_digest(big) == _hashlib.sha256(b"another long corpus!\n").hexdigest()


def test_validation_phrases_inside_longer_train_texts_are_counted_and_said(tmp_path):
    """Phrase-level data split by row (SST-2's train.tsv holds every sub-phrase of its sentences): a validation
    text that occurs word for word inside a longer train text is counted (case and punctuation aside), one equal
    to a train text is not (that is an exact duplicate, counted apart), and the split log says it; over the window
    limit nothing is checked and the log says that instead."""
    from honelm.data.sections import LabelledDataConfig
    from honelm.data.sources import labelled_splits, say_split

    train = ["A gorgeous, witty, seductive movie.", "the acting is wooden throughout", "a flat and lifeless plot"]
    val = ["gorgeous , witty", "the acting is wooden throughout", "an entirely new sentence", "Plot", ""]
    found = S.val_inside_train(train, val)
    assert found == {"checked": True, "count": 2, "of": 5, "median_words": 2}  # "gorgeous witty" and "plot"
    assert S.texts_inside(train, val) == ([True, False, False, True, False], 33)  # the flags val_overlap.py reads
    # 3 train texts of 5 words, windows of the validation lengths below 5 (1, 2 and 4 words): 3 x (5 + 4 + 2)
    assert S.val_inside_train(train, val, limit=3) == {"checked": False, "windows": 33, "limit": 3, "of": 5}
    said: list[str] = []
    say_split({"counts": {}, "val_inside_train": found}, said.append)
    assert "validation: 2 of 5 texts (40.0%, median 2 words) occur word for word inside a longer train text" in said[-1]
    said.clear()
    say_split({"counts": {}, "val_inside_train": {"checked": False, "windows": 33, "limit": 3, "of": 5}}, said.append)
    assert said[-1] == "validation: not checked for texts inside train texts (33 word windows, over the 3 limit)"
    # through the data path classify uses: rows that are sub-phrases of others, split off the same file
    rows = [{"text": " ".join(f"w{i}-{k}" for k in range(12)), "label": i % 2} for i in range(40)]
    rows += [{"text": " ".join(f"w{i}-{k}" for k in range(3)), "label": i % 2} for i in range(40)]  # their phrases
    path = tmp_path / "phrases.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    said.clear()
    splits = labelled_splits(LabelledDataConfig(train=str(path), split="8:2:0"), said.append)
    inside = splits.manifest["val_inside_train"]
    assert inside["checked"] and inside["of"] == len(splits.val) and 0 < inside["count"] < len(splits.val)
    assert any(line.startswith(f"validation: {inside['count']} of {len(splits.val)} texts") for line in said)
