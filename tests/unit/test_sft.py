"""SFT data by hand: completion-only labels (EOS trained, also when pad == eos), dropped rows counted,
best-fit packing, packed loss ≡ unpacked loss per example, and the reference metrics."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from honelm import metrics as M
from honelm.data.chat import ensure_template
from honelm.data.sft import best_fit_decreasing, encode_conversations, pack_examples
from honelm.objectives.lm import CausalLM

X = -100
WORDS = ["<pad>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "what", "is", "2+2", "4", "and", "3+3", "6", "<unk>"]


def word_tokenizer(pad_is_eos: bool = False) -> PreTrainedTokenizerFast:
    """One token per word; ids are the positions in WORDS (</s> = 1), honelm's default template."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>" if pad_is_eos else "<pad>")
    ensure_template(fast)
    return fast


QA = [{"role": "user", "content": "what is 2+2"}, {"role": "assistant", "content": "4"}]
TWO_TURNS = QA + [{"role": "user", "content": "and 3+3"}, {"role": "assistant", "content": "6"}]


def test_labels_mask_the_prompt_and_train_the_reply_with_its_eos():
    # "<|user|>\nwhat is 2+2</s><|assistant|>\n4</s>" → <|user|> what is 2+2 </s> <|assistant|> 4 </s>
    ex = encode_conversations(word_tokenizer(), [QA], max_length=64, train_on="assistant")
    assert ex.ids == [[2, 5, 6, 7, 1, 3, 8, 1]]
    assert ex.labels == [[X, X, X, X, X, X, 8, 1]]  # the reply "4" and its end-of-turn EOS


@pytest.mark.parametrize("train_on, expected", [
    ("assistant", [X, X, X, X, X, X, 8, 1, X, X, X, X, X, 11, 1]),
    ("last", [X] * 13 + [11, 1]),
    ("all", [X, 5, 6, 7, 1, 3, 8, 1, 2, 9, 10, 1, 3, 11, 1]),  # label 0 is never predicted: -100
])
def test_train_on_selects_the_target_tokens(train_on, expected):
    ex = encode_conversations(word_tokenizer(), [TWO_TURNS], max_length=64, train_on=train_on)
    assert ex.ids == [[2, 5, 6, 7, 1, 3, 8, 1, 2, 9, 10, 1, 3, 11, 1]]
    assert ex.labels == [expected]


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_padding_is_masked_by_position_so_eos_is_trained_when_pad_is_eos(pad_is_eos):
    tok = word_tokenizer(pad_is_eos)
    ex = encode_conversations(tok, [QA, TWO_TURNS], max_length=64, train_on="assistant")
    batch = ex.collate([0, 1])
    pad = 1 if pad_is_eos else 0
    assert batch["input_ids"][0].tolist() == [2, 5, 6, 7, 1, 3, 8, 1] + [pad] * 7
    assert batch["attention_mask"][0].tolist() == [1] * 8 + [0] * 7
    assert batch["labels"][0].tolist() == [X] * 6 + [8, 1] + [X] * 7  # EOS (id 1) trained, padding not
    assert CausalLM().units(batch) == 2 + 4


def test_a_row_truncated_to_no_target_is_dropped_and_counted():
    tok = word_tokenizer()
    where = [("data.jsonl", 3), ("data.jsonl", 7), ("data.jsonl", 9)]
    # max_length 6 keeps "<|user|> what is 2+2 </s> <|assistant|>" of QA: no target token left → dropped;
    # TWO_TURNS keeps the same 6 tokens: dropped too under "last", kept (truncated) at 7 under "assistant"
    ex = encode_conversations(tok, [QA, TWO_TURNS, QA], max_length=6, train_on="assistant", where=where)
    assert (len(ex), ex.rows, ex.truncated) == (0, 3, 0)
    assert ex.dropped == where
    assert "DROPPED 3" in ex.describe("train") and "data.jsonl:7" in ex.describe("train")
    ex = encode_conversations(tok, [QA, TWO_TURNS], max_length=7, train_on="assistant", where=where[:2])
    assert (len(ex), ex.truncated, ex.dropped) == (2, 2, [])
    assert ex.labels == [[X] * 6 + [8], [X] * 6 + [8]]  # the reply's first token survives, its EOS is cut
    ex = encode_conversations(tok, [TWO_TURNS], max_length=7, train_on="last", where=where[1:2])
    assert len(ex) == 0 and ex.dropped == [("data.jsonl", 7)]


def test_best_fit_decreasing_by_hand():
    # capacity 8, lengths 5 4 3 3 2 1: 5→A(3 left) 4→B(4) 3→A(0) 3→B(1) 2→C(6) 1→B(0)
    assert best_fit_decreasing([5, 4, 3, 3, 2, 1], 8) == [[0, 2], [1, 3, 5], [4]]
    with pytest.raises(ValueError):
        best_fit_decreasing([9], 8)


def test_packed_rows_restart_positions_and_mask_each_first_token():
    ex = encode_conversations(word_tokenizer(), [QA, TWO_TURNS, QA], max_length=64, train_on="assistant")
    packed = pack_examples(ex, capacity=16)
    assert packed.rows == [[1], [0, 2]]  # 15 tokens alone; 8 + 8 together
    batch = packed.collate([0, 1])
    assert "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [list(range(15)) + [0], list(range(8)) * 2]
    assert batch["labels"][1].tolist() == [X] * 6 + [8, 1] + [X] * 6 + [8, 1]
    assert batch["labels"][0, 15].item() == X  # the padding tail


def _examples(n: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    ids, labels = [], []
    for _ in range(n):
        length = int(torch.randint(4, 13, (1,), generator=g))
        row = torch.randint(2, 64, (length,), generator=g).tolist()
        prompt = int(torch.randint(1, length - 1, (1,), generator=g))
        ids.append(row)
        labels.append([X] * prompt + row[prompt:])
    return ids, labels


def test_packed_loss_equals_unpacked_loss_per_example(tiny_llama):
    """Same model, same examples: each example's summed NLL in a packed row equals its NLL alone.

    Any attention across examples (or a prediction across a boundary) would change it.
    """
    from honelm.data.sft import SFTExamples

    model = tiny_llama(seed=3).eval()
    ids, labels = _examples(7, seed=0)
    ex = SFTExamples(ids, [[X] + lab[1:] for lab in labels], pad_id=0)
    packed = pack_examples(ex, capacity=24)
    assert any(len(r) > 1 for r in packed.rows)
    lm = CausalLM()
    with torch.no_grad():
        alone = [float(lm(model, ex.collate([i])).value) for i in range(len(ex))]
        padded = lm(model, ex.collate(list(range(len(ex)))))
        batch = packed.collate(list(range(len(packed))))
        assert float(lm(model, batch).value) == pytest.approx(sum(alone), rel=1e-5)
        assert float(padded.value) == pytest.approx(sum(alone), rel=1e-5)
        starts = {}
        for r, row in enumerate(packed.rows):
            at = 0
            for i in row:
                starts[i] = (r, at, len(ex.ids[i]))
                at += len(ex.ids[i])
        for i, (r, at, n) in starts.items():  # one example's targets at a time
            only = dict(batch)
            only["labels"] = torch.full_like(batch["labels"], X)
            only["labels"][r, at:at + n] = batch["labels"][r, at:at + n]
            assert float(lm(model, only).value) == pytest.approx(alone[i], rel=1e-5, abs=1e-5), i
        # the check has teeth: positions that do not restart let examples attend to each other
        naive = {**batch, "position_ids": torch.arange(batch["input_ids"].size(1)).expand_as(batch["input_ids"])}
        assert float(lm(model, naive).value) != pytest.approx(sum(alone), rel=1e-3)


def test_exact_match_and_token_f1_by_hand():
    assert M.normalize_answer("The  Cat, sat!") == "cat sat"
    assert M.exact_match("The cat!", "cat") == 1.0 and M.exact_match("a dog", "cat") == 0.0
    # "the cat sat on the mat" → cat sat on mat (4); "a cat sat" → cat sat (2); overlap 2:
    # P = 2/4, R = 2/2, F1 = 2·0.5·1/1.5 = 2/3
    assert M.token_f1("the cat sat on the mat", "a cat sat") == pytest.approx(2 / 3)
    assert M.token_f1("cat cat", "cat") == pytest.approx(2 * 0.5 * 1 / 1.5)  # overlap counts multiplicity once
    assert M.token_f1("", "") == 1.0 and M.token_f1("", "cat") == 0.0


def test_bleu_and_chrf_by_hand():
    # BLEU "a b c d" vs "a b c e": n-gram precisions 3/4, 2/3, 1/2 and 0/1 (exp smoothing → 1/2),
    # no brevity penalty: (3/4 · 2/3 · 1/2 · 1/2)^(1/4) = 0.125^(1/4) = 0.5946
    assert M.bleu(["a b c d"], ["a b c e"]) == pytest.approx(100 * 0.125 ** 0.25, abs=1e-3)
    # chrF "abc" vs "abd": character 1-, 2-, 3-gram precision = recall = 2/3, 1/2, 0 (longer orders
    # have no n-grams); mean 7/18, so F(beta=2) = 7/18 = 38.89
    assert M.chrf(["abc"], ["abd"]) == pytest.approx(100 * 7 / 18, abs=1e-3)
    assert M.chrf(["same words"], ["same words"]) == pytest.approx(100.0)
    scores = M.reference_scores(["4", "five"], ["4", "6"], "val")
    assert scores["val_exact_match"] == 0.5 and scores["val_token_f1"] == 0.5
    assert set(scores) == {"val_exact_match", "val_token_f1", "val_chrf", "val_bleu"}


def test_packing_is_refused_for_a_model_that_attends_across_examples(tiny_llama):
    from honelm.data.sft import SFTExamples, check_packing
    from honelm.errors import ConfigError

    class KeepsCache(torch.nn.Module):
        """transformers' default use_cache=True: the mask builder then ignores position_ids."""

        def __init__(self, inner: torch.nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, **kwargs):
            return self.inner(**{**kwargs, "use_cache": True})

    ids, labels = _examples(2, seed=1)
    ex = SFTExamples(ids, labels, pad_id=0)
    check_packing(tiny_llama(seed=0), ex)  # a plain Llama keeps packed examples apart
    with pytest.raises(ConfigError, match="attends across packed examples"):
        check_packing(KeepsCache(tiny_llama(seed=0)), ex)
