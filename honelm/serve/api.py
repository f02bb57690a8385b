"""The HTTP side of `honelm serve`: OpenAI's API (FastAPI), its error shape, the web page and the run's report.

Endpoints (https://platform.openai.com/docs/api-reference for the OpenAI ones):

    GET  /health                 {"status": "ok", "models": [{"id", "kind", "labels", "context", "report"}], "auth"}
                                 (no key needed)
    GET  /v1/models              the served models, as OpenAI lists models; /v1/models/{id} one
    POST /v1/chat/completions    causal LM: messages through the model's chat template; SSE with stream=true
    POST /v1/completions         causal LM: a prompt (or a list of prompts) continued as plain text
    POST /v1/classify            classifier / regressor / reward model: {"model", "input": text | [text |
                                 [text, text_pair] | messages, ...]} -> labels and probabilities (or scores)
    GET  /                       the web page (chat with an LM, or classify texts; the run's report)
    GET  /report?model=ID        the run's report.html (or report.md), when the model came from a run that has one

One server may serve several models (a causal LM and a classifier, say), each with its own engine
and worker thread; a request names its model in `model`.

Every error, a bad request or not, is JSON in OpenAI's shape with a 4xx status for what the client
sent: {"error": {"message", "type", "param", "code"}}. Request bodies are parsed here, strictly
(a string where a number belongs is refused, never coerced), so the error names the field. With an
API key, /v1/* and /report need `Authorization: Bearer KEY` (401 otherwise).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from honelm.data.chat import prompt_ids
from honelm.serve.engine import ClassifyJob, Engine, GenerateJob, Served, encode_inputs

PAGE = Path(__file__).parent / "static" / "index.html"


class ApiError(Exception):
    """A request the server refuses: HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


# ----------------------------------------------------------------------------------------------
# request bodies


class _Strict(BaseModel):
    # unknown fields (user, logprobs=false, ...) are ignored as OpenAI's clients send many; known ones are typed
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_dict(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(_Strict):
    include_usage: bool = False


class Sampled(_Strict):
    """The fields chat and completions share: OpenAI's sampling settings (top_k is honelm's)."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = Field(None)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None


class ChatRequest(Sampled):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(Sampled):
    prompt: str | list[str]


class ClassifyRequest(_Strict):
    model: str
    input: str | list[Any]


def parse(cls: type[BaseModel], body: Any) -> Any:
    """`body` as `cls`, or a 400 naming the first bad field (OpenAI's `param`)."""
    try:
        return cls.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        loc = [str(x) for x in first["loc"] if not (isinstance(x, str) and x in ("str", "list[str]", "list[TextPart]",
                                                                                    "list[any]"))]
        param = ".".join(loc) or None
        kind = first["type"]
        what = "is missing" if kind == "missing" else first["msg"].lower()
        code = ("missing_required_parameter" if kind == "missing" else
                "invalid_type" if kind.endswith("_type") or kind == "literal_error" else "invalid_value")
        raise ApiError(400, f"{param or 'body'}: {what}", param, code) from None


async def read_body(request: Request) -> Any:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON: {err}", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
    return body


# ----------------------------------------------------------------------------------------------
# the server's state and its checks


@dataclass
class State:
    engines: dict[str, Engine]
    """Model id -> the engine serving it (`engine.served` is the model)."""
    api_key: str
    default_max_tokens: int
    arriving: int = 0
    """Requests being read and checked, not yet handed to an engine (each engine's batcher waits for them)."""

    def find(self, name: str) -> Engine:
        if name not in self.engines:
            raise ApiError(404, f"The model '{name}' does not exist; this server serves "
                           f"{', '.join(repr(n) for n in self.engines)}", "model", "model_not_found")
        return self.engines[name]

    def check_model(self, name: str, kind: str, route: str) -> Engine:
        engine = self.find(name)
        if kind != engine.served.kind:
            other = "/v1/classify" if engine.served.kind == "classifier" else "/v1/chat/completions and /v1/completions"
            raise ApiError(400, f"{route} needs a {'causal LM' if kind == 'lm' else 'classifier'}; "
                           f"'{name}' is a {'causal LM' if engine.served.kind == 'lm' else 'classifier'}: use {other}",
                           "model", "model_not_supported")
        return engine

    def handed(self, request: Request) -> None:
        """The request's job is with an engine (or never will be): it no longer counts as arriving."""
        if getattr(request.state, "arriving", False):
            request.state.arriving = False
            self.arriving -= 1

    def check_key(self, request: Request) -> None:
        if not self.api_key:
            return
        given = request.headers.get("authorization", "")
        token = given[7:].strip() if given[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise ApiError(401, "Incorrect API key provided: send Authorization: Bearer KEY (honelm serve --api-key)",
                           None, "invalid_api_key")

    def limits(self, engine: Engine, req: Sampled, prompt_len: int, param: str, max_tokens: int | None) -> int:
        """The request's max_tokens, checked against the context (OpenAI's context_length_exceeded)."""
        ctx = engine.served.context
        if req.n > engine.batcher.max_batch:
            raise ApiError(400, f"n={req.n} is more than this server's --max-batch {engine.batcher.max_batch}",
                           "n", "invalid_value")
        stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        if len(stops) > 4:
            raise ApiError(400, f"stop: at most 4 sequences, got {len(stops)}", "stop", "invalid_value")
        room = ctx - prompt_len
        if max_tokens is None and room >= 1:
            return min(self.default_max_tokens, room)
        if room < 1 or (max_tokens or 0) > room:
            asked = prompt_len + (max_tokens or 0)
            raise ApiError(400, f"This model's maximum context length is {ctx} tokens. However, you requested {asked} "
                           f"tokens ({prompt_len} in the {param}, {max_tokens or 0} in the completion). Please reduce "
                           f"the length of the {param} or completion.", param, "context_length_exceeded")
        return max_tokens

    def job(self, req: Sampled, ids: list[int], max_tokens: int, emit: Any) -> GenerateJob:
        stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        return GenerateJob(ids, req.n, max_tokens, req.temperature, req.top_p, req.top_k, req.seed,
                           [s for s in stops if s], emit)


class Channel:
    """Engine events for one request, handed from the worker thread to the event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def emit(self, event: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop has closed: the client is gone and nobody reads
            pass

    def shifted(self, offset: int) -> Any:
        """An emit for a job whose choices are numbered from `offset` (the prompts of one completions request)."""
        return lambda ev: self.emit((ev[0], ev[1] + offset, *ev[2:]) if ev[0] in ("delta", "done") else ev)


# ----------------------------------------------------------------------------------------------
# generation responses


def _chunk(kind: str, rid: str, created: int, model: str, choices: list[dict], usage: dict | None = None) -> str:
    body: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                            "created": created, "model": model, "system_fingerprint": None, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def _choice(kind: str, index: int, text: str | None, finish: str | None, first: bool = False) -> dict:
    if kind == "chat":
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else ({} if text is None else
                                                                                    {"content": text})
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}


async def _stream(model: str, kind: str, channel: Channel, jobs: list[GenerateJob], prompt_tokens: int,
                  usage_wanted: bool) -> AsyncIterator[str]:
    rid, created = _new_id(kind), int(time.time())
    total = sum(j.n for j in jobs)
    completion = done = 0
    try:
        if kind == "chat":
            yield _chunk(kind, rid, created, model, [_choice(kind, i, None, None, True) for i in range(total)])
        while done < total:
            event = await channel.queue.get()
            if event[0] == "delta":
                yield _chunk(kind, rid, created, model, [_choice(kind, event[1], event[2], None)])
            elif event[0] == "done":
                done, completion = done + 1, completion + event[3]
                yield _chunk(kind, rid, created, model, [_choice(kind, event[1], None, event[2])])
            else:
                error = {"message": f"the model failed: {event[1]}", "type": "server_error", "param": None, "code": None}
                yield f"data: {json.dumps({'error': error})}\n\n"
                break
        if usage_wanted:
            yield _chunk(kind, rid, created, model, [], _usage(prompt_tokens, completion))
        yield "data: [DONE]\n\n"
    finally:
        for job in jobs:  # a client that left early frees its rows; after the last event this changes nothing
            job.cancelled.set()


async def _collect(model: str, kind: str, channel: Channel, jobs: list[GenerateJob], prompt_tokens: int) -> dict:
    total = sum(j.n for j in jobs)
    texts, reasons, completion = [""] * total, [""] * total, 0
    try:
        while not all(reasons):
            event = await channel.queue.get()
            if event[0] == "delta":
                texts[event[1]] += event[2]
            elif event[0] == "done":
                reasons[event[1]], completion = event[2], completion + event[3]
            else:
                raise ApiError(500, f"the model failed: {event[1]}", None, None, "server_error")
    finally:
        for job in jobs:
            job.cancelled.set()
    if kind == "chat":
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
    else:
        choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
    return {"id": _new_id(kind), "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model, "system_fingerprint": None,
            "choices": choices, "usage": _usage(prompt_tokens, completion)}


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _new_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"


async def _answer(state: State, request: Request, engine: Engine, kind: str, req: Sampled, prompts: list[list[int]],
                  max_tokens: list[int]) -> Response:
    channel = Channel()
    jobs = [state.job(req, ids, m, channel.shifted(k * req.n)) for k, (ids, m) in enumerate(zip(prompts, max_tokens))]
    for job in jobs:
        engine.batcher.submit(job)
    state.handed(request)
    prompt_tokens = sum(len(p) for p in prompts)
    if req.stream:
        usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_stream(req.model, kind, channel, jobs, prompt_tokens, usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return JSONResponse(await _collect(req.model, kind, channel, jobs, prompt_tokens))


# ----------------------------------------------------------------------------------------------
# the endpoints' bodies


async def chat_completions(state: State, request: Request) -> Response:
    req = parse(ChatRequest, await read_body(request))
    engine = state.check_model(req.model, "lm", "/v1/chat/completions")
    messages = [m.as_dict() for m in req.messages]
    try:
        ids = prompt_ids(engine.served.tokenizer, messages)
    except Exception as err:  # the template's own refusal (jinja raise_exception): the messages are at fault
        raise ApiError(400, f"messages: the chat template refused them: {err}", "messages", "invalid_value") from None
    asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens = state.limits(engine, req, len(ids), "messages", asked)
    return await _answer(state, request, engine, "chat", req, [ids], [max_tokens])


async def completions(state: State, request: Request) -> Response:
    req = parse(CompletionRequest, await read_body(request))
    engine = state.check_model(req.model, "lm", "/v1/completions")
    texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if not texts:
        raise ApiError(400, "prompt: give a string or a non-empty list of strings", "prompt", "invalid_value")
    tok = engine.served.tokenizer
    prompts, limits = [], []
    for i, text in enumerate(texts):
        # an empty prompt starts from EOS, as a document does in pre-training (honelm generate does the same)
        ids = tok(text)["input_ids"] if text else ([tok.eos_token_id] if tok.eos_token_id is not None else [])
        if not ids:
            raise ApiError(400, f"prompt[{i}] has no tokens and the tokenizer has no EOS to start from", "prompt",
                           "invalid_value")
        prompts.append(ids)
        limits.append(state.limits(engine, req, len(ids), "prompt", req.max_tokens))
    if len(texts) * req.n > engine.batcher.max_batch:
        raise ApiError(400, f"{len(texts)} prompts x n={req.n} is more than --max-batch "
                       f"{engine.batcher.max_batch}", "prompt", "invalid_value")
    return await _answer(state, request, engine, "completion", req, prompts, limits)


def _classify_inputs(req: ClassifyRequest, served: Served) -> list[Any]:
    items = [req.input] if isinstance(req.input, str) else req.input
    if not items:
        raise ApiError(400, "input: give a text or a non-empty list of inputs", "input", "invalid_value")
    out: list[Any] = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            out.append((item, None))
        elif isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) for x in item):
            out.append((item[0], item[1]))
        elif isinstance(item, list) and item and all(isinstance(x, dict) for x in item):
            if not getattr(served.tokenizer, "chat_template", None):
                raise ApiError(400, f"input[{i}]: this model's tokenizer has no chat template to render messages "
                               "with; send texts", f"input[{i}]", "invalid_value")
            try:
                out.append([Message.model_validate(m).as_dict() for m in item])
            except ValidationError as err:
                raise ApiError(400, f"input[{i}]: not a list of messages: {err.errors()[0]['msg']}", f"input[{i}]",
                               "invalid_type") from None
        else:
            raise ApiError(400, f"input[{i}]: each input is a text, a [text, text_pair] pair or a list of "
                           "{role, content} messages", f"input[{i}]", "invalid_type")
    return out


async def classify(state: State, request: Request) -> Response:
    req = parse(ClassifyRequest, await read_body(request))
    engine = state.check_model(req.model, "classifier", "/v1/classify")
    served = engine.served
    ids, types = encode_inputs(served, _classify_inputs(req, served))
    for i, row in enumerate(ids):
        if len(row) > served.context:
            raise ApiError(400, f"input[{i}] is {len(row)} tokens; this model's maximum context length is "
                           f"{served.context} tokens", f"input[{i}]", "context_length_exceeded")
    channel = Channel()
    job = ClassifyJob(ids, types, channel.emit)
    engine.batcher.submit(job)
    state.handed(request)
    logits: list[list[float] | None] = [None] * len(ids)
    try:
        for _ in ids:
            event = await channel.queue.get()
            if event[0] == "error":
                raise ApiError(500, f"the model failed: {event[1]}", None, None, "server_error")
            logits[event[1]] = event[2]
    finally:
        job.cancelled.set()
    data = [dict(_classified(served.labels, row), object="classification", index=i)
            for i, row in enumerate(logits)]
    tokens = sum(map(len, ids))
    return JSONResponse({"object": "list", "model": served.name, "data": data,
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def _classified(labels: list[str] | None, row: list[float] | None) -> dict[str, Any]:
    """One input's answer: the label and each label's probability (softmax), or a regressor's / reward model's score."""
    assert row is not None
    if labels is None:
        return {"label": None, "score": row[0]}
    probs = [float(p) for p in _softmax(row)]
    best = max(range(len(probs)), key=probs.__getitem__)
    return {"label": labels[best], "score": probs[best], "probabilities": dict(zip(labels, probs)), "logits": row}


def _softmax(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(x - top) for x in row]
    total = sum(exps)
    return [e / total for e in exps]


# ----------------------------------------------------------------------------------------------
# the app


def _routes(app: FastAPI, state: State) -> None:
    @app.post("/v1/chat/completions")
    async def chat_route(request: Request) -> Response:
        return await _counted(state, request, chat_completions)

    @app.post("/v1/completions")
    async def completions_route(request: Request) -> Response:
        return await _counted(state, request, completions)

    @app.post("/v1/classify")
    async def classify_route(request: Request) -> Response:
        return await _counted(state, request, classify)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        state.check_key(request)
        return JSONResponse({"object": "list", "data": [_model_card(e.served) for e in state.engines.values()]})

    @app.get("/v1/models/{name:path}")
    async def model(request: Request, name: str) -> Response:
        state.check_key(request)
        return JSONResponse(_model_card(state.find(name).served))

    @app.get("/health")
    async def health() -> Response:
        return JSONResponse({"status": "ok", "models": [_health(e.served) for e in state.engines.values()],
                             "auth": bool(state.api_key)})

    @app.get("/report")
    async def report(request: Request, model: str = "") -> Response:
        state.check_key(request)
        found = state.find(model or next(iter(state.engines))).served.report()
        if found is None:
            raise ApiError(404, f"the model '{model}' was not served from a run directory with a report "
                           "(honelm report RUN writes one)", "model", "no_report")
        if found.suffix == ".md":
            return PlainTextResponse(found.read_text(encoding="utf-8"), media_type="text/markdown; charset=utf-8")
        return FileResponse(found, media_type="text/html; charset=utf-8")

    @app.get("/")
    async def page() -> Response:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))


async def _counted(state: State, request: Request, answer: Any) -> Response:
    """Run an endpoint, counted in `state.arriving` until its job is submitted (`State.handed`) or it fails."""
    state.arriving += 1
    request.state.arriving = True
    try:
        state.check_key(request)
        return await answer(state, request)
    finally:
        state.handed(request)


def _model_card(served: Served) -> dict[str, Any]:
    return {"id": served.name, "object": "model", "created": served.created, "owned_by": "honelm", "kind": served.kind}


def _health(served: Served) -> dict[str, Any]:
    report = served.report()
    return {"id": served.name, "kind": served.kind, "labels": served.labels, "context": served.context,
            "report": report.suffix[1:] if report else None}


def build_app(engines: list[Engine], api_key: str = "", default_max_tokens: int = 256) -> FastAPI:
    """The FastAPI app serving each engine's model (ids must differ); the engines' workers run while the app does."""
    names = [e.served.name for e in engines]
    if len(set(names)) < len(names):
        raise ValueError(f"two served models share an id ({', '.join(names)}): give each its own --name")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for engine in engines:
            engine.batcher.start()
        try:
            yield
        finally:  # uvicorn ends the lifespan after the in-flight requests have been answered
            for engine in engines:
                engine.batcher.stop()

    app = FastAPI(title="honelm serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    state = State({e.served.name: e for e in engines}, api_key, default_max_tokens)
    for engine in engines:
        engine.batcher.arriving = lambda: state.arriving

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> Response:
        return err.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> Response:
        message = (f"Unknown request URL: {request.method} {request.url.path}" if err.status_code == 404
                   else f"{request.method} {request.url.path}: {err.detail}")
        code = "unknown_url" if err.status_code == 404 else "method_not_allowed" if err.status_code == 405 else None
        return ApiError(err.status_code, message, None, code).response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> Response:
        return ApiError(400, f"invalid request: {err.errors()[0].get('msg')}", None, "invalid_request").response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception) -> Response:
        return ApiError(500, f"the server failed: {type(err).__name__}: {err}", None, None, "server_error").response()

    _routes(app, state)
    return app
