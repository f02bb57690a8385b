"""Tests for honelm.generate: seeding, greedy determinism, left padding, RNG isolation, prompt files.

The model is a tiny random LlamaForCausalLM over a byte-level BPE tokenizer trained in-process,
so the tests run offline in a couple of seconds.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from honelm.errors import DataError
from honelm.generate import SamplingConfig, generate, read_prompts, write_generations

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a stitch in time saves nine",
    "all that glitters is not gold",
    "to be or not to be that is the question",
    "honesty is the best policy when training models",
] * 20

PROMPTS = ["the quick", "a stitch in time saves nine and", "to be"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # A 32-wide model is far too small to gain from intra-op threads; on a busy machine the
    # thread pool's contention is what makes these tests slow. Restore for other test modules.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


@pytest.fixture(scope="module")
def model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    torch.manual_seed(1234)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    m = LlamaForCausalLM(cfg)
    # Random init at std 0.02 gives near-uniform logits; sharpen them so greedy argmax is never
    # decided by float noise (keeps the padding-equivalence test meaningful, not lucky).
    with torch.no_grad():
        m.lm_head.weight.mul_(50)
    m.eval()
    return m


def test_same_seed_same_output(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    cfg = SamplingConfig(max_new_tokens=20, temperature=1.0, top_k=0, seed=7)
    assert generate(model, tokenizer, PROMPTS, cfg) == generate(model, tokenizer, PROMPTS, cfg)


def test_different_seed_different_output(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    a = generate(model, tokenizer, PROMPTS, SamplingConfig(max_new_tokens=20, temperature=1.0, top_k=0, seed=1))
    b = generate(model, tokenizer, PROMPTS, SamplingConfig(max_new_tokens=20, temperature=1.0, top_k=0, seed=2))
    assert a != b


def test_greedy_is_deterministic_and_seed_independent(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast
) -> None:
    a = generate(model, tokenizer, PROMPTS, SamplingConfig(max_new_tokens=15, do_sample=False, seed=1))
    b = generate(model, tokenizer, PROMPTS, SamplingConfig(max_new_tokens=15, do_sample=False, seed=99))
    assert a == b
    assert any(out for out in a), "greedy produced only empty strings; the test would prove nothing"


def test_a_saved_generation_config_cannot_reshape_the_distribution(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast
) -> None:
    """A checkpoint's repetition_penalty / no_repeat_ngram_size would change every token picked; the
    caller's settings are the whole story, and the saved config is restored afterwards."""
    cfg = SamplingConfig(max_new_tokens=12, temperature=0.0)
    plain = generate(model, tokenizer, PROMPTS, cfg)
    saved = model.generation_config
    model.generation_config = copy.deepcopy(saved)
    model.generation_config.repetition_penalty = 50.0
    model.generation_config.no_repeat_ngram_size = 1
    try:
        assert generate(model, tokenizer, PROMPTS, cfg) == plain
        assert model.generation_config.repetition_penalty == 50.0  # put back as it was
        with torch.no_grad():  # the knobs do bite when transformers is left to apply them
            ids = tokenizer(PROMPTS[0], return_tensors="pt").input_ids
            raw = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert tokenizer.decode(raw[0, ids.shape[1]:], skip_special_tokens=True) != generate(
            model, tokenizer, PROMPTS[:1], cfg)[0]
    finally:
        model.generation_config = saved


def test_temperature_zero_means_greedy(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    greedy = generate(model, tokenizer, PROMPTS, SamplingConfig(max_new_tokens=15, do_sample=False))
    t0 = generate(model, tokenizer, PROMPTS, SamplingConfig(max_new_tokens=15, do_sample=True, temperature=0.0, seed=5))
    assert t0 == greedy


def test_output_excludes_prompt(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    prompt = "all that glitters is not gold"
    [out] = generate(model, tokenizer, [prompt], SamplingConfig(max_new_tokens=12, do_sample=False))
    # Reference: raw HF greedy on the unpadded prompt, keeping only the tokens after the prompt.
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        seq = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=12,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    expected = tokenizer.decode(seq[0, ids.shape[1] :].tolist(), skip_special_tokens=True)
    assert out == expected
    assert not out.startswith(prompt)


def test_batched_equals_one_by_one(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    cfg = SamplingConfig(max_new_tokens=12, do_sample=False)
    lengths = {len(tokenizer(p)["input_ids"]) for p in PROMPTS}
    assert len(lengths) > 1, "prompts must differ in token length to exercise padding"
    batched = generate(model, tokenizer, PROMPTS, cfg, batch_size=8)
    single = [generate(model, tokenizer, [p], cfg, batch_size=1)[0] for p in PROMPTS]
    assert batched == single


def test_tokenizer_padding_side_untouched(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    tokenizer.padding_side = "right"
    generate(model, tokenizer, PROMPTS, SamplingConfig(max_new_tokens=3, do_sample=False))
    assert tokenizer.padding_side == "right"


def test_caller_rng_untouched(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    torch.manual_seed(42)
    before = torch.get_rng_state().clone()
    generate(model, tokenizer, PROMPTS, SamplingConfig(max_new_tokens=8, seed=3))
    assert torch.equal(torch.get_rng_state(), before)


def test_training_mode_restored(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    model.train()
    try:
        generate(model, tokenizer, PROMPTS[:1], SamplingConfig(max_new_tokens=3, do_sample=False))
        assert model.training
    finally:
        model.eval()
    generate(model, tokenizer, PROMPTS[:1], SamplingConfig(max_new_tokens=3, do_sample=False))
    assert not model.training


@pytest.mark.parametrize(
    "kwargs",
    [{"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1}, {"temperature": -0.5}, {"max_new_tokens": 0}],
)
def test_invalid_config_raises(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        SamplingConfig(**kwargs)


def test_invalid_top_p_after_construction_raises(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    cfg = SamplingConfig()
    cfg.top_p = 0.0  # mutated after __post_init__; generate must re-validate
    with pytest.raises(ValueError, match="top_p"):
        generate(model, tokenizer, PROMPTS, cfg)


def test_read_prompts_txt_skips_blank_lines(tmp_path: Path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("first prompt\n\n   \nsecond prompt\r\n", encoding="utf-8")
    assert read_prompts(f) == ["first prompt", "second prompt"]


def test_read_prompts_jsonl(tmp_path: Path) -> None:
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a", "id": 1}\n\n{"prompt": "b"}\n', encoding="utf-8")
    assert read_prompts(f) == ["a", "b"]


@pytest.mark.parametrize(
    "content, line, field",
    [
        ('{"prompt": "ok"}\n{not json}\n', 2, None),
        ('{"prompt": "ok"}\n\n{"text": "x"}\n', 3, "prompt"),
        ('{"prompt": 5}\n', 1, "prompt"),
        ('["a list"]\n', 1, None),
    ],
)
def test_read_prompts_errors_name_file_and_line(tmp_path: Path, content: str, line: int, field: str | None) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_prompts(f)
    err = info.value
    assert err.path == str(f) and err.line == line and err.field == field
    assert f"{f}:{line}" in str(err)


def test_read_prompts_rejects_unknown_suffix_and_empty(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unsupported"):
        read_prompts(tmp_path / "p.csv")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="no prompts"):
        read_prompts(empty)


def test_write_generations_roundtrip(tmp_path: Path) -> None:
    cfg = SamplingConfig(max_new_tokens=5, top_k=3, seed=11)
    out = tmp_path / "sub" / "gen.jsonl"
    write_generations(out, ["p1", "p2 ü"], ["o1", "o2"], cfg)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in rows] == ["p1", "p2 ü"]
    assert [r["output"] for r in rows] == ["o1", "o2"]
    assert rows[0]["sampling"] == {
        "max_new_tokens": 5,
        "temperature": 1.0,
        "top_k": 3,
        "top_p": 1.0,
        "seed": 11,
        "do_sample": True,
    }
    with pytest.raises(ValueError):
        write_generations(out, ["p1"], [], cfg)


def test_generations_are_sft_rows_with_their_settings_and_reference(tmp_path: Path) -> None:
    """A generations file is `honelm sft` input as it is: prompt_completion rows; the extra fields
    (sampling, reference, chat, output) are carried, not trained; a blank output is left out and named."""
    from honelm.data.chat import conversation_of, detect_format
    from honelm.data.readers import read_rows

    out = tmp_path / "gen.jsonl"
    system = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "p3"}]
    blank = write_generations(out, ["p1", "p2", system], ["o1", "  ", "o3"], SamplingConfig(seed=4),
                              references=["r1", None, "r3"], chat=True)
    assert blank == [1]
    rows = read_rows(out)
    assert [r.data["completion"] for r in rows] == ["o1", "o3"]
    assert rows[0].data["reference"] == "r1" and rows[0].data["chat"] is True and rows[0].data["sampling"]["seed"] == 4
    assert all(detect_format(r.data) == "prompt_completion" for r in rows)
    assert [conversation_of(r).messages for r in rows] == [
        [{"role": "user", "content": "p1"}, {"role": "assistant", "content": "o1"}],
        system + [{"role": "assistant", "content": "o3"}]]  # the reference is never what is trained


def test_read_prompt_rows_answers_sft_rows_up_to_their_last_reply(tmp_path: Path) -> None:
    from honelm.generate import read_prompt_rows

    conversation = [{"role": "system", "content": "s"}, {"role": "user", "content": "u1"},
                    {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
                    {"role": "assistant", "content": "a2"}]
    rows = [{"instruction": "sum", "input": "2 2", "output": "4"},
            {"prompt": "p", "completion": "c"},
            {"messages": conversation},
            {"conversations": [{"from": "human", "value": "h"}, {"from": "gpt", "value": "g"}]},
            {"messages": conversation[:4]},  # ends with a user turn: a prompt without a reference
            {"prompt": "bare"}]
    f = tmp_path / "task.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    got = read_prompt_rows(f)
    assert [(g.messages, g.reference, g.line) for g in got] == [
        ([{"role": "user", "content": "sum\n\n2 2"}], "4", 1),
        ([{"role": "user", "content": "p"}], "c", 2),
        (conversation[:4], "a2", 3),
        ([{"role": "user", "content": "h"}], "g", 4),
        (conversation[:4], None, 5),
        ([{"role": "user", "content": "bare"}], None, 6)]
    assert got[0].text() == "sum\n\n2 2" and got[0].field() == "sum\n\n2 2"
    assert got[2].field() == conversation[:4]
    with pytest.raises(DataError, match="set chat=true") as info:
        got[2].text()  # a plain continuation has no place for a system message or earlier turns
    assert (info.value.line, info.value.field) == (3, "prompt")
    txt = tmp_path / "p.txt"
    txt.write_text("first\n\n second \n", encoding="utf-8")
    assert [(g.text(), g.line, g.reference) for g in read_prompt_rows(txt)] == [("first", 1, None), (" second ", 3, None)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"instruction": 3, "output": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_prompt_rows(bad)
    assert (info.value.line, info.value.field) == (2, "instruction")
