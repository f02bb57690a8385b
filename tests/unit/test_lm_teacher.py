"""The teacher's top-k for token-level KD: the cache against the teacher run on each example alone,
its alignment with packed rows (packed ≡ unpacked loss, and the rows the teacher gives on the packed
batch itself), save/load with the examples' fingerprint, the shared-vocabulary check, and on-policy
batches sampled from the student."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from honelm import runtime as rt
from honelm.data.sft import SFTExamples, pack_examples
from honelm.errors import ConfigError, HonelmError
from honelm.generate import SamplingConfig, generate_ids, sample_ids
from honelm.loop import accumulate
from honelm.objectives.lm_teacher import (WithTeacher, check_shared_vocab, compute_teacher_topk, load_teacher_topk,
                                          on_policy_batch)
from honelm.objectives.on_policy import OnPolicyKD, prompts_of
from honelm.objectives.token_kd import TokenKD
from tests.unit.test_sft import _examples as sft_rows

X = -100


def examples(n: int = 7, seed: int = 0) -> SFTExamples:
    """Variable-length rows over a 64-token vocabulary, a prompt (-100) then targets (test_sft's rows)."""
    return SFTExamples(*sft_rows(n, seed), pad_id=0)


def alone(teacher: torch.nn.Module, ids: list[int], labels: list[int], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher on one unpadded example: top-k of log_softmax(logits[t]) where labels[t+1] != -100."""
    with torch.no_grad():
        logits = teacher(input_ids=torch.tensor([ids])).logits[0]
    where = [t for t in range(len(ids) - 1) if labels[t + 1] != X]
    values, top = torch.log_softmax(logits[where].float(), -1).topk(k, -1)
    return top, values


def test_the_cache_is_the_teacher_on_each_example_alone(tiny_llama):
    teacher, ex = tiny_llama(seed=2).train(), examples()
    cache = compute_teacher_topk(teacher, ex, k=5, vocab_size=64, batch_size=3)  # padded batches of 3
    assert teacher.training  # its mode is put back
    assert cache.ids.dtype == torch.int32 and cache.logprobs.dtype == torch.float16 and cache.k == 5
    assert cache.counts == [sum(1 for y in lab if y != X) for lab in ex.labels]
    for i in range(len(ex)):
        ids, lps = cache.rows([i])
        top, values = alone(teacher, ex.ids[i], ex.labels[i], 5)
        assert torch.equal(ids.long(), top), i
        assert torch.allclose(lps.float(), values, atol=2e-2), i  # float16 storage


def test_packed_rows_line_up_with_their_teacher_rows(tiny_llama):
    teacher, student, ex = tiny_llama(seed=2), tiny_llama(seed=5), examples(9, seed=1)
    cache = compute_teacher_topk(teacher, ex, k=4, vocab_size=64)
    packed = pack_examples(ex, capacity=24)
    assert any(len(r) > 1 for r in packed.rows)
    unpacked_batch = WithTeacher(ex, cache).collate(list(range(len(ex))))
    packed_batch = WithTeacher(packed, cache).collate(list(range(len(packed))))
    # the teacher run on the packed batch itself gives, position by position, the rows collate put there
    target = F.pad(packed_batch["labels"][:, 1:], (0, 1), value=X) != X
    with torch.no_grad():
        logits = teacher(input_ids=packed_batch["input_ids"], position_ids=packed_batch["position_ids"],
                         use_cache=False).logits
    assert torch.equal(torch.log_softmax(logits[target], -1).topk(4, -1).indices, packed_batch["teacher_ids"].long())
    for kind in ("forward", "reverse", "jsd"):
        objective = TokenKD(kind, temperature=2.0, alpha=0.25)
        with torch.no_grad():
            a, b = objective(student, unpacked_batch), objective(student, packed_batch)
        assert int(a.units) == int(b.units) == sum(cache.counts)
        assert float(b.value) == pytest.approx(float(a.value), rel=1e-5), kind
    # a shuffled batch of rows takes its examples' rows in its own order
    some = WithTeacher(packed, cache).collate([2, 0])
    assert some["teacher_ids"].size(0) == int((F.pad(some["labels"][:, 1:], (0, 1), value=X) != X).sum())


def test_save_load_and_a_cache_of_other_examples_is_refused(tiny_llama, tmp_path):
    teacher, ex = tiny_llama(seed=2), examples()
    cache = compute_teacher_topk(teacher, ex, k=3, vocab_size=64, meta={"teacher": "runs/t"})
    path = tmp_path / "cache" / "teacher_topk.safetensors"
    cache.save(path)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # the temporary file was renamed away
    again = load_teacher_topk(path, ex)
    assert torch.equal(again.ids, cache.ids) and torch.equal(again.logprobs, cache.logprobs)
    assert again.counts == cache.counts and again.meta == {"k": "3", "vocab_size": "64", "teacher": "runs/t"}
    other = examples(seed=9)
    with pytest.raises(HonelmError, match="other examples"):
        load_teacher_topk(path, other)
    with pytest.raises(HonelmError, match="other examples"):
        WithTeacher(other, cache)
    (tmp_path / "junk.safetensors").write_bytes(b"not a cache")
    with pytest.raises(HonelmError, match="junk.safetensors"):
        load_teacher_topk(tmp_path / "junk.safetensors")
    with pytest.raises(ConfigError, match="top-k"):
        compute_teacher_topk(teacher, ex, k=65, vocab_size=64)


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


WORDS = ["<pad>", "</s>", "<unk>", "the", "film", "was", "good", "bad", "cast", "story", "very", "not"]


def tiny_lm(vocab: int, seed: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, pad_token_id=0,
                      eos_token_id=1, bos_token_id=None)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg)


def test_the_vocabulary_must_be_shared():
    tok = word_tokenizer(WORDS)
    assert check_shared_vocab(tok, word_tokenizer(WORDS), tiny_lm(12, 0), tiny_lm(16, 1)) == 12
    with pytest.raises(ConfigError, match="has 13 tokens, the student's 12"):
        check_shared_vocab(word_tokenizer(WORDS + ["extra"]), tok)
    swapped = WORDS[:3] + ["film", "the"] + WORDS[5:]
    with pytest.raises(ConfigError, match="2 tokens have other ids.*'film' \\(student 4, teacher 3\\)"):
        check_shared_vocab(word_tokenizer(swapped), tok)
    with pytest.raises(ConfigError, match="teacher model scores 10 tokens"):
        check_shared_vocab(tok, tok, teacher=tiny_lm(10, 0))


def test_an_on_policy_batch_trains_on_the_sampled_tokens_with_the_teacher_aligned():
    tok = word_tokenizer(WORDS)
    student, teacher = tiny_lm(12, 3), tiny_lm(12, 4)
    prompts = [tok("the film was")["input_ids"], tok("the cast")["input_ids"], tok("very")["input_ids"]]
    sampling = SamplingConfig(max_new_tokens=6, seed=11)
    rng = torch.get_rng_state()
    batch = on_policy_batch(student, teacher, tok, prompts, sampling, k=4, vocab_size=12, batch_size=2)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is untouched
    responses = sample_ids(student, tok, prompts, sampling, batch_size=2)
    assert tok.batch_decode(responses, skip_special_tokens=True) == generate_ids(student, tok, prompts, sampling, 2)
    for r, (p, resp) in enumerate(zip(prompts, responses)):
        n = len(p) + len(resp)
        assert 1 <= len(resp) <= 6 and (tok.eos_token_id not in resp[:-1])  # up to and including the first EOS
        assert batch["input_ids"][r, :n].tolist() == p + resp
        assert batch["labels"][r].tolist() == [X] * len(p) + resp + [X] * (batch["labels"].size(1) - n)
        assert batch["attention_mask"][r].tolist() == [1] * n + [0] * (batch["labels"].size(1) - n)
    # the teacher rows are the teacher's top-k at exactly the positions that predict a sampled token
    target = F.pad(batch["labels"][:, 1:], (0, 1), value=X) != X
    with torch.no_grad():
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(torch.log_softmax(logits[target], -1).topk(4, -1).indices, batch["teacher_ids"].long())
    assert batch["teacher_ids"].shape == (sum(len(r) for r in responses), 4)
    again = on_policy_batch(student, teacher, tok, prompts, sampling, k=4, vocab_size=12, batch_size=2)
    assert all(torch.equal(batch[key], again[key]) for key in batch)  # a seed gives the same batch
    loss = TokenKD("jsd", beta=0.5)(student, batch)
    loss.value.backward()
    assert int(loss.units) == batch["teacher_ids"].size(0)
    assert all(p.grad is None for p in teacher.parameters()) and student.lm_head.weight.grad.abs().sum() > 0


def test_gradient_accumulation_is_exact_with_teacher_rows(tiny_llama):
    """batch 8 ≡ 4 micro-batches of 2 on variable-length examples: each micro-batch carries its own
    teacher rows and the loss is a sum over target tokens."""
    teacher, student, ex = tiny_llama(seed=2), tiny_llama(seed=5), examples(8, seed=3)
    items = WithTeacher(ex, compute_teacher_topk(teacher, ex, k=6, vocab_size=64))
    objective = TokenKD("jsd", beta=0.3, temperature=2.0, alpha=0.5)

    def grads(micro: list[list[int]]) -> dict[str, torch.Tensor]:
        student.zero_grad(set_to_none=True)
        accumulate(student, objective, [items.collate(m) for m in micro], rt.Runtime(device=torch.device("cpu")))
        return {n: p.grad.clone() for n, p in student.named_parameters()}

    one, four = grads([list(range(8))]), grads([[0, 1], [2, 3], [4, 5], [6, 7]])
    for name in one:
        torch.testing.assert_close(four[name], one[name], rtol=1e-4, atol=1e-6)


def test_on_policy_mix_is_a_pure_function_of_the_batch_and_keeps_the_step_units():
    tok = word_tokenizer(WORDS)
    student, teacher = tiny_lm(12, 3), tiny_lm(12, 4)
    rows = [tok(t)["input_ids"] for t in ("the film was good </s>", "the cast was bad </s>", "very not good </s>")]
    data = SFTExamples(rows, [[X] * 2 + r[2:] for r in rows], pad_id=0)
    items = WithTeacher(data, compute_teacher_topk(teacher, data, 4, 12))
    batch = items.collate([0, 1, 2])
    inner = TokenKD("forward")
    sampling = SamplingConfig(max_new_tokens=4, seed=0)
    never = OnPolicyKD(inner, teacher, tok, sampling, 4, 12, fraction=0.0, seed=0)
    plain = inner(student, batch)
    mixed = never(student, batch)
    assert torch.equal(mixed.value, plain.value) and mixed.metrics["on_policy"].item() == 0.0
    always = OnPolicyKD(inner, teacher, tok, sampling, 4, 12, fraction=1.0, seed=0)
    assert prompts_of(batch) == [r[:2] for r in rows]
    first, second = always(student, batch), always(student, batch)
    assert torch.equal(first.value, second.value)  # same batch, same seed: same samples, same loss
    assert first.units == inner.units(batch) and first.metrics["on_policy"].item() == inner.units(batch)
    assert not torch.equal(first.value, plain.value)  # it trained on the student's answers, not the references
    assert always.frozen_models() == [teacher]
    draws = [OnPolicyKD(inner, teacher, tok, sampling, 4, 12, fraction=0.5, seed=s).draw(batch) for s in range(40)]
    assert 5 < sum(d is not None for d in draws) < 35  # about half of the seeds send this batch on-policy
