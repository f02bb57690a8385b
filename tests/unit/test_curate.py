"""Curated-TAPT neighbour search (tf-idf and model embeddings) and the TAPT leak guard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from honelm import config as C
from honelm.data.curate import embed_texts, nearest, tfidf_vectors
from honelm.data.splits import unlock_test_split
from honelm.data.adapt_corpus import build_corpus, mode_of, sha
from honelm.errors import ConfigError
from honelm.stages.adapt import AdaptConfig

POOL = [
    "stock markets fell sharply on friday",  # 0
    "the striker scored twice in the final",  # 1
    "the cat sat on the warm mat",  # 2 (nearest to the first query by construction)
    "central bank raises interest rates",  # 3
    "the cat sat on the warm mat",  # 4 (an exact tie with 2: the smaller index wins)
    "a recipe for apple pie with cinnamon",  # 5
]
QUERIES = ["the cat sat on the mat", "interest rates and the central bank"]


def test_nearest_breaks_ties_by_index_and_clips_k():
    pool = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]), dim=1)
    idx, sims = nearest(torch.tensor([[1.0, 0.0]]), pool, k=3)
    assert idx.tolist() == [[0, 2, 3]]
    assert sims[0, :2].tolist() == [1.0, 1.0] and sims[0, 2] == pytest.approx(2 ** -0.5)
    assert nearest(torch.tensor([[1.0, 0.0]]), pool, k=10)[0].shape == (1, 4)


def test_tfidf_picks_the_nearest_document_deterministically():
    q, p = tfidf_vectors(QUERIES, POOL)
    assert p.is_sparse_csr and q.shape[1] == p.shape[1]
    idx, sims = nearest(q, p, k=2)
    assert idx.tolist()[0] == [2, 4]  # the two copies, in index order
    assert idx.tolist()[1][0] == 3
    assert sims[0, 0] == pytest.approx(float(sims[0, 1])) and 0 < float(sims[0, 0]) < 1
    again = nearest(*tfidf_vectors(QUERIES, POOL), k=2)
    assert torch.equal(again[0], idx) and torch.equal(again[1], sims)
    # rows are unit vectors, so a document compared with itself scores 1
    q2, p2 = tfidf_vectors([POOL[5]], POOL)
    assert nearest(q2, p2, k=1)[1].item() == pytest.approx(1.0, abs=1e-6)


@pytest.fixture(scope="module")
def tiny_encoder():
    from honelm.models import build_model
    from honelm.tokenizer import train_tokenizer

    tok = train_tokenizer(POOL * 3 + QUERIES * 3, kind="wordpiece", vocab_size=120)
    model = build_model("encoder", "test", vocab_size=len(tok), task="mlm", seed=0)
    return model, tok


def test_embedding_picks_the_identical_document_first_and_is_deterministic(tiny_encoder):
    model, tok = tiny_encoder
    q = embed_texts(model, tok, [POOL[2], POOL[3]], batch_size=2)
    p = embed_texts(model, tok, POOL, batch_size=4)  # batches mix lengths differently from the queries
    assert q.shape == (2, 32) and torch.allclose(p.norm(dim=1), torch.ones(len(POOL)))
    idx, sims = nearest(q, p, k=2)
    assert idx.tolist()[0] == [2, 4]  # itself (cosine 1) and its exact copy, ties to the smaller index
    assert idx.tolist()[1][0] == 3
    assert sims[0, 0].item() == pytest.approx(1.0, abs=1e-5)
    idx2, sims2 = nearest(embed_texts(model, tok, [POOL[2], POOL[3]], batch_size=2),
                          embed_texts(model, tok, POOL, batch_size=4), k=2)
    assert torch.equal(idx, idx2) and torch.equal(sims, sims2)


# ----------------------------------------------------------------------------------------------
# the leak guard


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _task(tmp_path: Path, n: int = 60) -> list[dict]:
    rows = [{"text": f"review number {i} says the film was {'great' if i % 2 else 'dull'}",
             "label": "pos" if i % 2 else "neg"} for i in range(n)]
    _write_jsonl(tmp_path / "task.jsonl", rows)
    return rows


def _guarded_hashes(corpus) -> set[str]:
    return {sha(d.text) for d in corpus.train} | {sha(d.text) for docs in corpus.val.values() for d in docs}


def test_no_task_val_or_ratio_test_text_enters_the_tapt_corpus(tmp_path):
    rows = _task(tmp_path)
    cfg = C.build(AdaptConfig, overrides=[f"task.train={tmp_path / 'task.jsonl'}", "task.split=6:2:2"])
    plain = build_corpus(cfg, "tapt", lambda _: None)
    val = [e.text for e in plain.task_splits.val]
    with unlock_test_split("test of the leak guard"):
        test = [e.text for e in plain.task_splits.test]
    assert len(val) == 12 and len(test) == 12
    # plant every val and test text in the extra unlabelled file, among genuinely new texts
    extra = [{"text": t} for t in val + test] + [{"text": f"unlabelled note {i}"} for i in range(10)]
    _write_jsonl(tmp_path / "extra.jsonl", extra)
    domain = tmp_path / "domain.txt"  # and in a domain corpus trained alongside
    domain.write_text("\n".join([*val, *test, *(f"domain document {i}" for i in range(30))]) + "\n", encoding="utf-8")
    for mode, extra_args in (("tapt", []), ("dapt+tapt", [f"data.train={domain}"])):
        cfg = C.build(AdaptConfig, overrides=[f"task.train={tmp_path / 'task.jsonl'}", "task.split=6:2:2",
                                              f"adapt.task_extra={tmp_path / 'extra.jsonl'}", *extra_args])
        corpus = build_corpus(cfg, mode, lambda _: None)
        used = _guarded_hashes(corpus)
        assert not used & {sha(t) for t in val + test}
        assert {sha(f"unlabelled note {i}") for i in range(10)} <= used  # the guard is not a blanket ban
        assert {sha(e.text) for e in corpus.task_splits.train} <= used  # all task train text is used
        sources = corpus.record["sources"]
        assert sources["task_extra"]["excluded_as_task_val_test"] == 24
        assert set(sources["task_extra"]["train_hashes"]) | set(sources["task_extra"]["val_hashes"]) <= used
        assert corpus.record["leak_guard"]["covers"] == ["val", "test"]
        if mode == "dapt+tapt":
            assert sources["domain"]["excluded_as_task_val_test"] > 0
            domain_val = {sha(d.text) for d in corpus.val.get("domain", [])}
            assert not domain_val & {sha(t) for t in val + test}
    assert len(rows) == 60


def test_dapt_guarded_by_a_task_adds_no_task_text_and_excludes_its_val_test_text(tmp_path):
    """adapt.task_guard_only (boost's DAPT variant): the task only guards the domain corpus."""
    _task(tmp_path)
    task = [f"task.train={tmp_path / 'task.jsonl'}", "task.split=6:2:2"]
    splits = build_corpus(C.build(AdaptConfig, overrides=task), "tapt", lambda _: None).task_splits
    val = [e.text for e in splits.val]
    with unlock_test_split("test of the leak guard"):
        test = [e.text for e in splits.test]
    domain = tmp_path / "domain.txt"
    docs = [f"domain document {i}" for i in range(30)]
    domain.write_text("\n".join([*val[:3], *test[:2], *docs]) + "\n", encoding="utf-8")
    cfg = C.build(AdaptConfig, overrides=[*task, f"data.train={domain}", "adapt.task_guard_only=true"])
    assert mode_of(cfg) == "dapt"
    said: list[str] = []
    corpus = build_corpus(cfg, mode_of(cfg), said.append)
    used = _guarded_hashes(corpus)
    assert not used & {sha(t) for t in val + test}
    assert not used & {sha(e.text) for e in splits.train}  # no task text trains
    assert used <= {sha(d) for d in docs} and len(used) >= 20  # the domain's own test split is held out
    assert corpus.record["sources"]["domain"]["excluded_as_task_val_test"] == 5 and "task_train" not in corpus.record["sources"]
    assert any("leak guard: 5 domain document(s)" in s for s in said)
    with pytest.raises(ConfigError, match="needs both data.train"):
        mode_of(C.build(AdaptConfig, overrides=[f"data.train={domain}", "adapt.task_guard_only=true"]))


def test_pair_halves_and_a_user_val_file_are_guarded(tmp_path):
    train = [{"a": f"premise {i}", "b": f"hypothesis {i}", "y": "yes" if i % 2 else "no"} for i in range(20)]
    val = [{"a": f"held out premise {i}", "b": "hypothesis 3", "y": "yes" if i % 2 else "no"} for i in range(4)]
    _write_jsonl(tmp_path / "train.jsonl", train)
    _write_jsonl(tmp_path / "val.jsonl", val)
    _write_jsonl(tmp_path / "test.jsonl", [{"a": "test premise", "b": "test hypothesis", "y": "no"}])
    _write_jsonl(tmp_path / "extra.jsonl", [{"a": "held out premise 1"}, {"a": "fresh text"}])
    cfg = C.build(AdaptConfig, overrides=[
        f"task.train={tmp_path / 'train.jsonl'}", f"task.val={tmp_path / 'val.jsonl'}",
        f"task.test={tmp_path / 'test.jsonl'}", "task.text_field=a", "task.pair_field=b", "task.label_field=y",
        f"adapt.task_extra={tmp_path / 'extra.jsonl'}", "adapt.val_fraction=0"])
    corpus = build_corpus(cfg, "tapt", lambda _: None)
    used = _guarded_hashes(corpus)
    assert sha("held out premise 1") not in used and sha("fresh text") in used
    # "hypothesis 3" is a train pair half AND a val pair half: the guard wins
    assert sha("hypothesis 3") not in used and sha("hypothesis 4") in used and sha("premise 3") in used
    assert corpus.record["sources"]["task_train"]["excluded_as_task_val_test"] == 1
    # a user test file is never parsed outside `honelm test`: the record says it is not covered
    assert corpus.record["leak_guard"]["covers"] == ["val"] and "not_covered" in corpus.record["leak_guard"]
    assert sha("test premise") not in used  # (it is not task TRAIN text, so it never had a way in)


def test_tapt_validation_slice_is_task_train_text_chosen_by_content(tmp_path):
    _task(tmp_path, n=200)
    cfg = C.build(AdaptConfig, overrides=[f"task.train={tmp_path / 'task.jsonl'}", "adapt.val_fraction=0.2"])
    a = build_corpus(cfg, "tapt", lambda _: None)
    train_texts = {e.text for e in a.task_splits.train}
    held = [d.text for d in a.val["task"]]
    assert 10 < len(held) < 60 and set(held) <= train_texts
    assert not {d.text for d in a.train} & set(held)
    b = build_corpus(cfg, "tapt", lambda _: None)
    assert [d.text for d in b.val["task"]] == held
