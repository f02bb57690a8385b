"""`honelm serve`'s engine without HTTP: batched greedy generation equals one request at a time (and plain
`honelm.generate`), stop strings and per-request limits, seeded sampling, batched classification."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from honelm.data.chat import prompt_ids
from honelm.generate import SamplingConfig, generate_ids
from honelm.cli import main
from honelm.serve.engine import ClassifyJob, Engine, GenerateJob, encode_inputs, length_buckets, load_served
from honelm.serve.main import parser
from tests.serve_models import CHATS, causal_lm, classifier


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return load_served(str(causal_lm(tmp_path_factory.mktemp("lm"))), say=lambda _: None)


@pytest.fixture(scope="module")
def clf(tmp_path_factory):
    return load_served(str(classifier(tmp_path_factory.mktemp("clf"))))


def job(prompt: list[int], max_tokens: int = 24, stop: tuple[str, ...] = (), n: int = 1, temperature: float = 0.0,
        seed: int | None = None) -> tuple[GenerateJob, list[tuple]]:
    events: list[tuple] = []
    return GenerateJob(prompt, n, max_tokens, temperature, 1.0, 0, seed, list(stop), events.append), events


def answers(events: list[tuple], n: int = 1) -> list[tuple[str, str]]:
    """(text, finish_reason) per choice, the text put together from the streamed deltas."""
    texts, reasons = [""] * n, [""] * n
    for event in events:
        if event[0] == "delta":
            texts[event[1]] += event[2]
        elif event[0] == "done":
            reasons[event[1]] = event[2]
    return list(zip(texts, reasons))


def test_load_served_reads_the_kind_labels_and_report(lm, clf):
    assert (lm.kind, lm.labels, lm.context, lm.report().name) == ("lm", None, 128, "report.md")
    assert lm.path.name == "best" and lm.name == lm.run_dir.name
    assert (clf.kind, clf.labels, clf.run_dir, clf.report()) == ("classifier", ["negative", "positive"], None, None)


def test_batched_greedy_equals_one_at_a_time_and_plain_generate(lm):
    engine = Engine(lm)
    prompts = [prompt_ids(lm.tokenizer, [{"role": "user", "content": q}]) for q, _ in CHATS]
    prompts.append(lm.tokenizer("the music")["input_ids"])  # a plain continuation, shorter: more left padding
    limits = [24, 24, 3, 10]
    together = [job(p, m) for p, m in zip(prompts, limits)]
    engine.generate([j for j, _ in together])
    batched = [answers(events)[0] for _, events in together]
    for (prompt, limit), got in zip(zip(prompts, limits), batched):
        alone, events = job(prompt, limit)
        engine.generate([alone])
        assert answers(events)[0] == got
        plain = generate_ids(lm.model, lm.tokenizer, [prompt], SamplingConfig(max_new_tokens=limit, temperature=0))[0]
        assert plain == got[0]
    assert batched[0] == (CHATS[0][1], "stop") and batched[1] == (CHATS[1][1], "stop")  # EOS ends the reply
    assert batched[2][1] == "length" and len(lm.tokenizer(batched[2][0], add_special_tokens=False)["input_ids"]) <= 3


def test_stop_strings_cut_the_text_and_are_never_streamed(lm):
    engine = Engine(lm)
    prompt = prompt_ids(lm.tokenizer, [{"role": "user", "content": CHATS[0][0]}])
    cut, events = job(prompt, stop=("the cast", "never said"))
    engine.generate([cut])
    assert answers(events) == [("the film was wonderful and ", "stop")]
    assert not any("the c" in e[2] for e in events if e[0] == "delta")  # a possible stop's start is held back
    held, events = job(prompt, stop=("superb!",))  # starts to match ("superb") but never does: released at the end
    engine.generate([held])
    assert answers(events) == [(CHATS[0][1], "stop")]


def test_sampled_choices_are_seeded(lm):
    engine = Engine(lm)
    prompt = lm.tokenizer("the")["input_ids"]
    first, events = job(prompt, max_tokens=8, n=3, temperature=1.5, seed=7)
    engine.generate([first])
    again, events2 = job(prompt, max_tokens=8, n=3, temperature=1.5, seed=7)
    engine.generate([again])
    assert answers(events, 3) == answers(events2, 3) and len(set(answers(events, 3))) > 1


def test_requests_arriving_together_are_classified_in_one_batch(clf):
    engine = Engine(clf, max_batch=32, window_s=5.0)
    texts = [["the music was beautiful"], ["dull and far too long", "honesty"], [("the film", "the story")]]
    results: list[list[tuple]] = [[] for _ in texts]
    jobs = []
    for inputs, out in zip(texts, results):
        ids, types = encode_inputs(clf, [x if isinstance(x, tuple) else (x, None) for x in inputs])
        jobs.append(ClassifyJob(ids, types, out.append))
    submitted: list[ClassifyJob] = []
    engine.batcher.arriving = lambda: len(jobs) - len(submitted)  # as the HTTP layer counts requests being read

    def submit(j: ClassifyJob) -> None:
        time.sleep(0.05)
        engine.batcher.submit(j)
        submitted.append(j)

    engine.batcher.start()
    threads = [threading.Thread(target=submit, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while sum(map(len, results)) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    engine.batcher.stop()
    assert engine.batcher.batches == [4]  # one forward for the three requests' four inputs
    for j, out in zip(jobs, results):
        for _, i, logits in sorted(out, key=lambda e: e[1]):
            one = {"input_ids": torch.tensor([j.ids[i]]), "token_type_ids": torch.tensor([j.type_ids[i]])}
            with torch.no_grad():
                alone = clf.model(**one).logits[0].tolist()
            assert logits == pytest.approx(alone, abs=1e-5)


def test_the_http_layer_in_process(lm, clf):
    """The FastAPI app on both engines (no process; the real server is tests/stages/test_serve.py): a streamed
    chat, a classification, and the OpenAI error shape for a few bad requests."""
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from honelm.serve.api import build_app

    app = build_app([Engine(lm, window_s=0), Engine(clf, window_s=0)], api_key="k")
    auth = {"Authorization": "Bearer k"}
    with TestClient(app) as client:
        body = {"model": lm.name, "messages": [{"role": "user", "content": CHATS[2][0]}], "temperature": 0,
                "stream": True}
        with client.stream("POST", "/v1/chat/completions", json=body, headers=auth) as response:
            lines = [x for x in response.iter_lines() if x]
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(x[6:]) for x in lines[:-1]]
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == CHATS[2][1]
        got = client.post("/v1/classify", json={"model": clf.name, "input": "honesty"}, headers=auth).json()
        assert got["data"][0]["label"] in ("negative", "positive")
        for body, status, param in (({"model": lm.name}, 400, "messages"), ({"model": "x", "input": "a"}, 404, "model"),
                                    ({"model": lm.name, "messages": [], "max_tokens": -1}, 400, "max_tokens")):
            response = client.post("/v1/chat/completions" if "input" not in body else "/v1/classify", json=body,
                                   headers=auth)
            assert response.status_code == status and response.json()["error"]["param"] == param
        assert client.get("/v1/models").status_code == 401


def test_serve_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as done:
        main(["serve", "--help"])
    assert done.value.code == 0
    shown = capsys.readouterr().out
    for action in parser()._actions:
        assert action.help and len(action.help) > 10, action.dest
        assert all(flag in shown for flag in action.option_strings), action.dest


def test_length_buckets_keep_padding_small():
    lengths = [3, 60, 4, 58, 5, 30, 31, 6, 7, 8, 9]
    parts = length_buckets(lengths, lambda n: n, max_batch=4)
    assert sorted(x for p in parts for x in p) == sorted(lengths)  # every row once
    for part in parts:
        assert len(part) <= 4 and (len(part) == 1 or max(part) * len(part) <= 1.25 * sum(part))
    assert parts[0] == [3, 4, 5]  # 6 would make 4 x 6 = 24 tokens for 18 real ones
