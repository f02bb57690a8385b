"""Answer checkers (`honelm.rl.checks`) on good and malformed responses, their weighted sum, and prompt rows
carrying reference answers (`honelm.rl.prompts`)."""

from __future__ import annotations

import json

import pytest
import torch

from honelm.errors import ConfigError, DataError, HonelmError
from honelm.rl.checks import marked_answer, normalise, parse_check, parse_weighted, response_number
from honelm.rl.prompts import read_prompt_documents
from honelm.rl.rewards import RewardConfig, Sample, check_rows, function_scorer, score_and_correct


def sample(text: str, reference: str | None = None, tokens: list[int] | None = None, ended: bool = True,
           row: dict | None = None, line: int = 3) -> Sample:
    ids = tokens if tokens is not None else [5] * (len(text.split()) + int(ended))
    return Sample("q", [1], ids, text, ended, reference, row or {"answer": reference}, "prompts.jsonl", line)


def score(spec: str, text: str, reference: str | None = None, **kw) -> float:
    return parse_check(spec).score(sample(text, reference, **kw).response())


def test_answer_extraction():
    assert marked_answer("so 3 + 4 = 7\n#### 7") == "7"
    assert marked_answer("we get \\boxed{12} and \\boxed{13}") == "13"  # the last marked answer
    assert marked_answer("The answer is 41.") == "41."
    assert marked_answer("I answer quickly") is None
    assert response_number("2 apples and 3 pears make 5") == 5.0
    assert response_number("#### 1,234.5 dollars") == 1234.5
    assert response_number("Answer: -3, not 4") == -3.0
    assert response_number("no digits here") is None
    assert normalise("  The  Cat. ") == "the cat"


@pytest.mark.parametrize("spec, text, reference, expected", [
    ("exact", "Paris.", "paris", 1.0), ("exact", "It is Paris", "paris", 0.0),
    ("exact", "thinking...\nAnswer: Paris", "Paris", 1.0), ("exact", "", "paris", 0.0),
    ("numeric", "3 + 4 = 7", "7", 1.0), ("numeric", "#### 7.0000001", "7", 1.0), ("numeric", "7 is not 8", "7", 0.0),
    ("numeric:0.5", "about 7.4", "7", 1.0), ("numeric", "seven", "7", 0.0), ("numeric", "\\boxed{12}", "12", 1.0),
    ("capture:name is (\\w+)", "my name is Bob", "bob", 1.0), ("capture:name is (\\w+)", "hello", "bob", 0.0),
    ("capture:\\d+", "code 42 ok", "42", 1.0),
    ("label:positive|negative", "I think negative, not positive", "negative", 1.0),
    ("label:positive|negative", "positive", "negative", 0.0), ("label:positive|negative", "unsure", "negative", 0.0),
    ("label", "Positive! great film", "positive", 1.0), ("label", "great film", "positive", 0.0),
])
def test_reference_checks(spec, text, reference, expected):
    check = parse_check(spec)
    assert check.needs_reference
    assert score(spec, text, reference) == expected


@pytest.mark.parametrize("spec, text, expected", [
    ("json", '{"a": 1}', 1.0), ("json", 'here: {"a": 1} done', 1.0), ("json", "{'a': 1}", 0.0), ("json", "", 0.0),
    ('json:{"name": "str", "age": "int"}', '{"name": "x", "age": 3}', 1.0),
    ('json:{"name": "str", "age": "int"}', '{"name": "x", "age": "3"}', 0.0),
    ('json:{"name": "str", "age": "int"}', '{"name": "x"}', 0.0), ('json:{"n": "number"}', '{"n": true}', 0.0),
    ('json:{"n": "number"}', "[1, 2]", 0.0), ("format:\\d+", " 42 ", 0.0), ("format:\\d+", "42 apples", -1.0),
    ("contains:was", "it was", 1.0), ("regex:^a+$", "aaa", 1.0), ("regex:^a+$", "ab", 0.0),
])
def test_fixed_checks(spec, text, expected):
    assert not parse_check(spec).needs_reference
    assert score(spec, text) == expected


def test_max_length_penalty_counts_tokens_without_eos():
    assert score("max_length:4", "x", tokens=[1, 2, 3, 9], ended=True) == 0.0  # 3 answer tokens + EOS
    assert score("max_length:4", "x", tokens=[1] * 6, ended=False) == pytest.approx(-0.5)
    assert score("token:1", "x", tokens=[1, 2, 1]) == 2.0


@pytest.mark.parametrize("spec", ["bogus", "contains", "regex:(", "token:x", "numeric:abc", "max_length:0",
                                  "json:[1]", 'json:{"a": "date"}', "python:nomodule_here:f", "python:json",
                                  "label:a||b"])
def test_bad_specs_are_config_errors(spec):
    with pytest.raises(ConfigError):
        parse_check(spec)


def _weird(prompt, response, row):  # a checker for the python: kind
    if response == "boom":
        raise ValueError("cannot read it")
    if response == "text":
        return "1"
    return float(len(response)) + (1.0 if row.get("answer") == response else 0.0)


def test_python_checker_scores_and_its_failures_name_the_row():
    spec = f"python:{__name__}:_weird"
    assert score(spec, "ab", "ab") == 3.0
    with pytest.raises(HonelmError, match=r"raised ValueError: cannot read it on the prompt at prompts.jsonl:3"):
        score(spec, "boom", "x")
    with pytest.raises(HonelmError, match=r"returned '1' \(not a finite number\).*prompts.jsonl:7"):
        score(spec, "text", "x", line=7)


def test_weighted_checks_sum_and_accuracy():
    scorer = function_scorer("numeric", 64, ["0.5*max_length:2", "0.25 * contains:="])
    samples = [sample("3 + 4 = 7", "7", tokens=[1, 2, 3, 4, 5, 9]), sample("8", "7", tokens=[1, 9]),
               sample("7", "7", tokens=[1], ended=False)]
    scores, correct = score_and_correct(scorer, samples)
    # 1 - 0.5 * (5 - 2) / 2 + 0.25;  0;  1
    assert scores.tolist() == pytest.approx([0.5, 0.0, 1.0])
    assert correct.tolist() == [True, False, True]
    assert score_and_correct(function_scorer("contains:7"), samples)[1] is None  # no reference check: no accuracy
    assert parse_weighted("2e-1*contains:a").weight == pytest.approx(0.2)
    assert parse_weighted("regex:a*b").spec == "regex:a*b"  # a '*' in a pattern is not a weight


def test_reward_config_accepts_checks_alone_or_with_a_model():
    RewardConfig(checks=["numeric"]).validate()
    RewardConfig(model="some/dir", checks=["numeric"]).validate()
    with pytest.raises(ConfigError):
        RewardConfig().validate()
    with pytest.raises(ConfigError):
        RewardConfig(checks=["2*nope"]).validate()


def test_prompt_rows_carry_answers_and_bad_rows_are_named(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "2+2=", "answer": 4, "level": "easy"}, {"instruction": "capital of France?", "output": "Paris"},
            {"prompt": "no answer here"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    docs = read_prompt_documents(str(path))
    assert [d.reference for d in docs] == ["4", "Paris", None]
    assert docs[0].fields == {"prompt": "2+2=", "answer": "4", "level": "easy"}
    scorer = function_scorer("exact")
    with pytest.raises(DataError, match=r"p.jsonl:3: field .answer. is missing"):
        check_rows(scorer, docs)
    with pytest.raises(DataError, match=r"p.jsonl:2: .*.Paris. is not a number"):
        check_rows(function_scorer("numeric"), docs[:2])
    with pytest.raises(DataError, match=r"not one of the labels"):
        check_rows(function_scorer("label:yes|no"), docs[:1])
    check_rows(function_scorer("contains:x"), docs)  # no reference needed
    path.write_text(json.dumps({"prompt": "x", "answer": [1]}) + "\n")
    with pytest.raises(DataError, match="must be a string or a number"):
        read_prompt_documents(str(path))


def test_scores_are_float_tensors():
    out = function_scorer("token:5", 64)([sample("a b")])
    assert out.dtype == torch.float32 and out.tolist() == [3.0]


class FakeRewardModel:
    """Stands in for a reward model: a fixed score per response, and no frozen weights."""

    def __call__(self, samples):
        return torch.tensor([2.0, -1.0])[:len(samples)]

    def frozen_models(self):
        return []


def test_a_reward_model_mixes_with_the_checks():
    scorer = function_scorer("exact", 64)
    scorer.model, scorer.model_weight = FakeRewardModel(), 0.5
    scores, correct = score_and_correct(scorer, [sample("Paris", "paris"), sample("Rome", "paris")])
    assert scores.tolist() == pytest.approx([1.0 + 1.0, 0.0 - 0.5]) and correct.tolist() == [True, False]
    cfg = RewardConfig(model="rm", model_weight=0.5, function="exact", checks=["0.1*max_length:4"])
    assert cfg.describe() == "0.5 x model rm + function exact + 0.1*max_length:4" and cfg.checks_answers()
    assert not RewardConfig(model="rm").checks_answers()
