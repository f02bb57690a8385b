"""`honelm serve` as a real process on a free local port: the official `openai` client (chat, streaming,
completions), httpx for /v1/classify, every kind of bad request, the API key, and SIGTERM finishing the
request in flight before the process exits 0.

One process serves both tiny models (a chat LM run and a classifier), so the test pays one start-up.
Marked slow (run with -m slow; `.ci/run` runs it after the default suite); the default suite checks
the same app in-process (tests/unit/test_serve_engine.py).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.serve_models import CHATS, causal_lm, classifier

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

KEY = "sk-honelm-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(models: list[Path], *extra: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """`honelm serve MODELS --port N` in a fresh process; returns once /health answers."""
    port = free_port()
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "honelm", "serve", *map(str, models), "--port", str(port), *extra],
                            env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}: {proc.stderr.read()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("the server did not answer /health within 120 s")


def error(response: Any, status: int, code: str | None, param: str | None = None) -> str:
    """Check an OpenAI-shaped error response; returns its message."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == code and body["error"]["param"] == param, body
    assert body["error"]["type"] == ("invalid_request_error" if status < 500 else "server_error")
    return body["error"]["message"]


def check_openai_client(url: str, lm: str) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    assert sorted(m.id for m in client.models.list()) == sorted([lm, "clf"])
    question, answer = CHATS[0]
    chat = client.chat.completions.create(model=lm, messages=[{"role": "user", "content": question}], temperature=0)
    assert chat.choices[0].message.content == answer and chat.choices[0].finish_reason == "stop"
    assert chat.usage.completion_tokens > 0 and chat.usage.prompt_tokens > 0
    chunks = list(client.chat.completions.create(model=lm, messages=[{"role": "user", "content": question}],
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3  # streamed in pieces
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    done = client.completions.create(model=lm, prompt=["the music", "honesty is"], max_tokens=4, temperature=0)
    assert [c.index for c in done.choices] == [0, 1] and all(c.finish_reason == "length" for c in done.choices)
    stopped = client.chat.completions.create(model=lm, messages=[{"role": "user", "content": question}],
                                             temperature=0, stop=["the cast"], n=2)
    assert [c.message.content for c in stopped.choices] == ["the film was wonderful and "] * 2
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=lm, messages=[{"role": "user", "content": "the film " * 200}])
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": question}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()


def check_raw_stream(url: str, lm: str) -> None:
    body = {"model": lm, "messages": [{"role": "user", "content": CHATS[1][0]}], "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    chunk = json.loads(events[1][6:])
    assert chunk["object"] == "chat.completion.chunk" and chunk["choices"][0]["index"] == 0


def check_classify(url: str) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    texts = ["the music was beautiful", "the story was dull", ["the film", "the cast"]]
    response = httpx.post(url + "/v1/classify", json={"model": "clf", "input": texts}, headers=auth, timeout=60)
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert [d["index"] for d in data] == [0, 1, 2]
    for d in data:
        assert set(d["probabilities"]) == {"negative", "positive"}
        assert sum(d["probabilities"].values()) == pytest.approx(1.0)
        assert d["label"] == max(d["probabilities"], key=d["probabilities"].get)
    # requests arriving together: all answered, each the same as alone
    alone = httpx.post(url + "/v1/classify", json={"model": "clf", "input": texts[0]}, headers=auth).json()["data"][0]
    results: list[Any] = [None] * 8

    def one(i: int) -> None:
        results[i] = httpx.post(url + "/v1/classify", json={"model": "clf", "input": texts[0]}, headers=auth, timeout=60)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        assert r.status_code == 200
        assert r.json()["data"][0]["probabilities"]["positive"] == pytest.approx(alone["probabilities"]["positive"],
                                                                                 abs=1e-5)


def check_bad_requests(url: str, lm: str) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    chat, user = url + "/v1/chat/completions", [{"role": "user", "content": "hi"}]

    def post(body: Any, path: str = chat, headers: dict | None = None) -> Any:
        raw = body if isinstance(body, str) else json.dumps(body)
        return httpx.post(path, content=raw, headers={**auth, **(headers or {})}, timeout=30)

    error(post({"model": "nope", "messages": user}), 404, "model_not_found", "model")
    error(post('{"model": "x", "messages": ['), 400, "invalid_json")
    error(post(""), 400, "invalid_json")
    error(post("[1, 2]"), 400, "invalid_json")
    error(post({"model": lm, "messages": [{"role": "user", "content": "the film " * 200}]}), 400,
          "context_length_exceeded", "messages")
    error(post({"model": lm, "messages": user, "max_tokens": 500}), 400, "context_length_exceeded", "messages")
    error(post({"model": lm, "messages": user, "max_tokens": -3}), 400, "invalid_value", "max_tokens")
    error(post({"model": lm, "messages": user, "max_tokens": "5"}), 400, "invalid_type", "max_tokens")
    error(post({"model": lm, "messages": user, "temperature": "hot"}), 400, "invalid_type", "temperature")
    error(post({"model": lm, "messages": "hi"}), 400, "invalid_type", "messages")
    error(post({"model": lm, "messages": [{"role": "wizard", "content": "hi"}]}), 400, "invalid_type",
          "messages.0.role")
    error(post({"model": lm}), 400, "missing_required_parameter", "messages")
    error(post({"messages": user}), 400, "missing_required_parameter", "model")
    error(post({"model": lm, "prompt": 5}, url + "/v1/completions"), 400, "invalid_type", "prompt")
    error(post({"model": lm, "prompt": "hi", "max_tokens": 0}, url + "/v1/completions"), 400, "invalid_value",
          "max_tokens")
    error(post({"model": lm, "input": "hi"}, url + "/v1/classify"), 400, "model_not_supported", "model")
    error(post({"model": "clf", "messages": user}), 400, "model_not_supported", "model")
    error(post({"model": "clf", "input": [3]}, url + "/v1/classify"), 400, "invalid_type", "input[0]")
    error(post({"model": "clf", "input": []}, url + "/v1/classify"), 400, "invalid_value", "input")
    error(post({"model": "clf", "input": ["word " * 100]}, url + "/v1/classify"), 400, "context_length_exceeded",
          "input[0]")
    error(post({"model": "clf"}, url + "/v1/classify"), 400, "missing_required_parameter", "input")
    error(httpx.post(chat, json={"model": lm, "messages": user}, timeout=30), 401, "invalid_api_key")
    error(post({"model": lm, "messages": user}, headers={"Authorization": "Bearer nope"}), 401, "invalid_api_key")
    error(httpx.get(url + "/v1/models", timeout=30), 401, "invalid_api_key")
    error(httpx.get(url + "/v1/nothing", headers=auth, timeout=30), 404, "unknown_url")
    error(httpx.get(chat, headers=auth, timeout=30), 405, "method_not_allowed")
    assert httpx.get(url + "/health", timeout=30).json()["auth"] is True  # health and the page need no key
    assert "honelm serve" in httpx.get(url + "/", timeout=30).text
    assert httpx.get(url + f"/report?model={lm}", headers=auth, timeout=30).text.startswith("# run report")
    error(httpx.get(url + "/report?model=clf", headers=auth, timeout=30), 404, "no_report", "model")


def check_sigterm_finishes_the_request_in_flight(proc: subprocess.Popen, url: str, lm: str) -> None:
    """SIGTERM while a stream is being generated: the stream still ends properly, then the process exits 0."""
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    stream = client.completions.create(model=lm, prompt="the", max_tokens=100, temperature=2.0, seed=1, n=4,
                                       stream=True)
    first = next(iter(stream))
    proc.send_signal(signal.SIGTERM)
    rest = list(stream)
    finished = [c.choices[0].index for c in [first, *rest] if c.choices and c.choices[0].finish_reason]
    assert sorted(finished) == [0, 1, 2, 3]
    assert proc.wait(timeout=60) == 0
    assert "stopped on SIGTERM" in proc.stderr.read()
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/health", timeout=5)


@pytest.mark.slow  # ~10 s (a fresh process importing torch, a model trained for 2 s): .ci/run runs it explicitly
def test_a_real_server_speaks_openai_and_stops_cleanly(tmp_path):
    run = causal_lm(tmp_path / "chat-run")
    proc, url = start_server([run, classifier(tmp_path / "clf")], "--batch-window-ms", "20", "--name", "chat-run",
                             "--name", "clf", env={"HONELM_API_KEY": KEY})
    try:
        check_openai_client(url, "chat-run")
        check_raw_stream(url, "chat-run")
        check_classify(url)
        check_bad_requests(url, "chat-run")
        check_sigterm_finishes_the_request_in_flight(proc, url, "chat-run")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
