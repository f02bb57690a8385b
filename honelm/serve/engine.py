"""What `honelm serve` runs behind HTTP: the loaded model, and one worker thread that batches requests.

- `load_served(spec)`: a run directory (its best/ model) or a checkpoint directory, loaded as a
  causal LM (served by chat/completions) or as a sequence classifier (a classifier, regressor or
  reward model, served by classify), with what the server needs to know of it.
- `Batcher`: requests arriving together are run together. The worker thread waits for a first
  job, then takes every job already queued and waits (up to `window_s`) for those the server is
  still reading, until `max_batch` rows are in hand, and hands the batch to the engine. Jobs that
  arrive while a batch runs wait for the next one.
- `Engine.classify`: one right-padded forward per `max_batch` rows, logits per row.
- `Engine.generate`: jobs with the same sampling settings share one left-padded batch of
  `honelm.generate.sample_ids` (a job's `n` choices are rows of it); a `RowTracker` (a
  transformers `StoppingCriteria`, called once per decoding step) follows every row, emits its
  text as it grows, and ends it at EOS, at its own token limit, at a stop string, or when its
  client has gone. Greedy rows give the same tokens batched as alone (left padding with a mask;
  tested), sampled rows share the batch's random draws, so a seeded sampled request is
  reproducible when it runs with the same neighbours.

Every job carries an `emit` callable that the worker calls with events (thread-safe on the caller's
side): ("delta", choice, text), ("done", choice, finish_reason, completion_tokens), ("result",
logits) for a classification row, and ("error", message) when the model itself failed.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import StoppingCriteria

from honelm.adapters import adapter_info, is_adapter_dir
from honelm.checkpoint import resolve_model_dir
from honelm.data.batches import encode_examples
from honelm.data.chat import Messages, ensure_template, render
from honelm.data.readers import Example
from honelm.errors import HonelmError
from honelm.generate import SamplingConfig, sample_ids
from honelm.models import load_merged, load_model, model_kind
from honelm.tokenizer import load_tokenizer

Emit = Callable[[tuple], None]


@dataclass
class Served:
    """The model a server holds and what its endpoints need to know of it."""

    model: torch.nn.Module
    tokenizer: Any
    kind: str
    """"lm" (chat/completions) or "classifier" (classify: classifiers, regressors, reward models)."""
    name: str
    """The model id clients send (`model` in a request) and `/v1/models` lists."""
    path: Path
    """The model directory loaded."""
    run_dir: Path | None
    """The run it came from (for its report), when a run directory was given."""
    context: int
    """The longest sequence the model takes (max_position_embeddings)."""
    labels: list[str] | None = None
    """A classifier's label names in logit order; None: one output read as a score (regression, reward)."""
    created: int = 0
    """When the model directory was written (Unix seconds; `/v1/models` shows it)."""

    def report(self) -> Path | None:
        """The run's report.html (else report.md), when the run has one."""
        for name in ("report.html", "report.md"):
            if self.run_dir is not None and (self.run_dir / name).is_file():
                return self.run_dir / name
        return None


def _task_of(path: Path) -> tuple[str, dict[str, Any]]:
    """"lm" or "classifier" from the saved config's architectures (a LoRA adapter: its task_type), and the config."""
    if is_adapter_dir(path) and not (path / "config.json").is_file():
        task_type = adapter_info(path).get("task_type") or ""
        return ("classifier" if task_type == "SEQ_CLS" else "lm"), {}
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise HonelmError(f"{path}/config.json: cannot read the model config: {err}") from None
    names = config.get("architectures") or []
    if any(n.endswith("ForSequenceClassification") for n in names):
        return "classifier", config
    if any(n.endswith(("ForCausalLM", "LMHeadModel")) for n in names):
        return "lm", config
    raise HonelmError(f"{path}: architectures {names} is neither a causal LM nor a sequence classifier; "
                      "honelm serve serves those two")


def load_served(spec: str, name: str = "", say: Callable[[str], None] = print) -> Served:
    """Load a run directory's best model, or a checkpoint directory, for serving (eval mode, fp32)."""
    given = Path(spec).expanduser()
    if not given.exists():
        raise HonelmError(f"{spec}: no such run or model directory")
    path = Path(resolve_model_dir(str(given)))
    task, config = _task_of(path)
    tokenizer = load_tokenizer(path)
    if not config:
        model = load_merged(path).model  # a LoRA adapter: its own task and labels, merged into its base
    elif task == "classifier":  # the saved head as it is: its labels and problem type
        model = load_model(path, "classify", id2label=config.get("id2label"), num_labels=config.get("num_labels"),
                           problem_type=config.get("problem_type"))
    else:
        model = load_model(path, "lm")
    model.eval()
    labels = None
    if task == "classifier":
        n = int(model.config.num_labels)
        if n > 1 and getattr(model.config, "problem_type", None) != "regression":
            labels = [str(model.config.id2label.get(i, i)) for i in range(n)]
    elif ensure_template(tokenizer):
        say("chat template: the tokenizer had none; chat requests use honelm's default (<|role|>\\n content EOS)")
    run_dir = given.resolve() if path.parent == given.resolve() and (given / "run.json").is_file() else None
    served_name = name or (run_dir or path).name
    context = int(getattr(model.config, "max_position_embeddings", 0) or tokenizer.model_max_length)
    return Served(model, tokenizer, task, served_name, path, run_dir, context, labels,
                  int((path / ("config.json" if (path / "config.json").is_file() else "adapter_config.json")).stat().st_mtime))


# ----------------------------------------------------------------------------------------------
# jobs and the batching worker


@dataclass
class GenerateJob:
    """One generation request: its prompt (one row per choice), sampling settings and stop strings."""

    prompt: list[int]
    n: int
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: list[str]
    emit: Emit
    cancelled: threading.Event = field(default_factory=threading.Event)

    def rows(self) -> int:
        return self.n

    def key(self) -> tuple:
        """Jobs with equal keys can share a batch: one `generate` call takes one set of sampling knobs."""
        if self.temperature == 0:
            return ("greedy",)
        return ("sample", self.temperature, self.top_p, self.top_k, self.seed)


@dataclass
class ClassifyJob:
    """One classification request: token ids (and token type ids) per input."""

    ids: list[list[int]]
    type_ids: list[list[int]] | None
    emit: Emit
    cancelled: threading.Event = field(default_factory=threading.Event)

    def rows(self) -> int:
        return len(self.ids)


class Batcher:
    """A worker thread running jobs in batches: a first job, then every job already queued or still arriving.

    After the first job the worker takes what is queued, and waits (up to `window_s`) only while the
    server says more requests are being received (`arriving`: requests read but not yet submitted). A lone
    client's request runs at once; concurrent clients' requests, which the event loop reads one after
    another, are gathered into one batch of at most `max_batch` rows.
    """

    def __init__(self, run: Callable[[list[Any]], None], max_batch: int, window_s: float) -> None:
        self.run, self.max_batch, self.window_s = run, max_batch, window_s
        self.jobs: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="honelm-serve-engine", daemon=True)
        self.batches: list[int] = []
        """The row count of every batch run (what the tests and the benchmark read)."""
        self.arriving: Callable[[], int] = lambda: 0
        """How many requests the server is reading that have not been submitted yet (set by the HTTP layer)."""

    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Any) -> None:
        self.jobs.put(job)

    def stop(self) -> None:
        """Finish the jobs already submitted, then end the thread."""
        self.jobs.put(None)
        self.thread.join()

    def _collect(self, first: Any) -> tuple[list[Any], bool]:
        batch, rows, stop = [first], first.rows(), False
        deadline = time.monotonic() + self.window_s
        while rows < self.max_batch:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                if self.arriving() <= 0 or time.monotonic() >= deadline:
                    break
                time.sleep(0.0005)  # a request is being read: it joins this batch if it comes in time
                continue
            if job is None:
                stop = True
                break
            batch.append(job)
            rows += job.rows()
        return batch, stop

    def _loop(self) -> None:
        while True:
            first = self.jobs.get()
            if first is None:
                return
            batch, stop = self._collect(first)
            self.batches.append(sum(j.rows() for j in batch))
            try:
                self.run(batch)
            except Exception as err:  # a model failure must reach every waiting client, not kill the worker
                for job in batch:
                    job.emit(("error", f"{type(err).__name__}: {err}"))
            if stop:
                return


# ----------------------------------------------------------------------------------------------
# generation: rows followed step by step


class RowState:
    """One choice of one request as it is generated: its tokens, the text sent so far, why it ended."""

    def __init__(self, job: GenerateJob, choice: int, tokenizer: Any, eos_id: int | None) -> None:
        self.job, self.choice, self.tokenizer, self.eos_id = job, choice, tokenizer, eos_id
        self.tokens: list[int] = []
        self.sent = ""
        self.finished = False

    def _safe(self, text: str) -> str:
        """The part of `text` that can be sent now: not a half-decoded character, nor what may start a stop string."""
        text = text.rstrip("\ufffd")  # a multi-byte character whose bytes have not all come yet
        hold = max((k for s in self.job.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return text[: len(text) - hold]

    def _send(self, text: str) -> None:
        if text.startswith(self.sent) and len(text) > len(self.sent):
            self.job.emit(("delta", self.choice, text[len(self.sent):]))
            self.sent = text

    def _finish(self, reason: str, text: str) -> None:
        self._send(text)
        self.finished = True
        self.job.emit(("done", self.choice, reason, len(self.tokens)))

    def step(self, token: int) -> None:
        """Take the row's next token: send new text, or end the row (EOS, a stop string, its limit, a gone client)."""
        if self.job.cancelled.is_set():
            self.finished = True
            return
        self.tokens.append(token)
        if token == self.eos_id:
            self._finish("stop", self.tokenizer.decode(self.tokens[:-1], skip_special_tokens=True))
            return
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cuts = [text.find(s) for s in self.job.stop if s and s in text]
        if cuts:
            self._finish("stop", text[: min(cuts)])
        elif len(self.tokens) >= self.job.max_tokens:
            self._finish("length", text)
        else:
            self._send(self._safe(text))


class RowTracker(StoppingCriteria):
    """Called by `generate` after every step with all ids so far: each unfinished row takes its new token."""

    def __init__(self, rows: list[RowState]) -> None:
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        for state, token in zip(self.rows, input_ids[:, -1].tolist()):
            if not state.finished:
                state.step(token)
        return torch.tensor([s.finished for s in self.rows], dtype=torch.bool, device=input_ids.device)


class Engine:
    """Runs batches of jobs on the served model (on the batcher's worker thread)."""

    def __init__(self, served: Served, max_batch: int = 32, window_s: float = 0.02, seed: int = 0) -> None:
        self.served = served
        self.next_seed = seed
        """Seeds for sampled batches whose requests named none: seed, seed+1, ... (a server run is reproducible)."""
        run = self.generate if served.kind == "lm" else self.classify
        self.batcher = Batcher(run, max_batch, window_s)

    def generate(self, jobs: list[GenerateJob]) -> None:
        groups: dict[tuple, list[GenerateJob]] = {}
        for job in jobs:
            if not job.cancelled.is_set():
                groups.setdefault(job.key(), []).append(job)
        for group in groups.values():
            chunk: list[GenerateJob] = []
            for job in group:  # a group too large for one batch runs as several
                if chunk and not self._fits(chunk + [job]):
                    self._generate_batch(chunk)
                    chunk = []
                chunk.append(job)
            self._generate_batch(chunk)

    def _fits(self, jobs: list[GenerateJob]) -> bool:
        """At most max_batch rows, and the left-padded width plus the longest reply within the context: a row
        that finished keeps taking positions while others go on (learned position tables have no more)."""
        rows = sum(j.n for j in jobs)
        width = max(len(j.prompt) for j in jobs) + max(j.max_tokens for j in jobs)
        return rows <= self.batcher.max_batch and width <= self.served.context

    def _generate_batch(self, jobs: list[GenerateJob]) -> None:
        tok, model = self.served.tokenizer, self.served.model
        eos = tok.eos_token_id
        states = [RowState(job, c, tok, eos) for job in jobs for c in range(job.n)]
        first = jobs[0]
        seed = first.seed
        if seed is None:
            seed, self.next_seed = self.next_seed, self.next_seed + 1
        sampling = SamplingConfig(max_new_tokens=max(j.max_tokens for j in jobs), temperature=first.temperature,
                                  top_p=first.top_p, top_k=first.top_k, seed=seed, do_sample=first.temperature > 0)
        prompts = [s.job.prompt for s in states]
        sample_ids(model, tok, prompts, sampling, batch_size=len(prompts), stopping_criteria=[RowTracker(states)])
        for s in states:  # a row the model's own limit ended before the tracker saw it end
            if not s.finished and not s.job.cancelled.is_set():
                s._finish("length", tok.decode(s.tokens, skip_special_tokens=True))

    @torch.inference_mode()
    def classify(self, jobs: list[ClassifyJob]) -> None:
        rows = [(job, i) for job in jobs if not job.cancelled.is_set() for i in range(len(job.ids))]
        for part in length_buckets(rows, lambda r: len(r[0].ids[r[1]]), self.batcher.max_batch):
            self._classify_part(part)

    def _classify_part(self, part: list[tuple[ClassifyJob, int]]) -> None:
        pad = self.served.tokenizer.pad_token_id
        pad = 0 if pad is None else pad
        # right padding, as the classify stage trains: a decoder classifier reads the last non-pad token
        width = max(len(job.ids[i]) for job, i in part)
        ids = torch.full((len(part), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        types = torch.zeros_like(ids) if part[0][0].type_ids is not None else None
        for r, (job, i) in enumerate(part):
            n = len(job.ids[i])
            ids[r, :n], mask[r, :n] = torch.tensor(job.ids[i]), 1
            if types is not None and job.type_ids is not None:
                types[r, :n] = torch.tensor(job.type_ids[i])
        device = next(self.served.model.parameters()).device
        extra = {"token_type_ids": types.to(device)} if types is not None else {}
        logits = self.served.model(input_ids=ids.to(device), attention_mask=mask.to(device), **extra).logits.float()
        for (job, i), row in zip(part, logits.tolist()):
            job.emit(("result", i, row))


def length_buckets(rows: list[Any], length: Callable[[Any], int], max_batch: int, waste: float = 0.25) -> list[list[Any]]:
    """`rows` sorted by length and cut into forwards of at most `max_batch` rows, a new one started when padding the
    next (longer) row would make padding more than `waste` of the forward's tokens.

    On a CPU a classifier as small as MiniLM is compute-bound already at one row (batched, a row costs only about
    half as much), so the tokens spent on padding are what batching must not waste: one batch of sentences from 3
    to 60 tokens padded to the longest is about half padding.
    """
    out: list[list[Any]] = []
    part: list[Any] = []
    real = 0
    for row in sorted(rows, key=length):
        n = length(row)
        if part and (len(part) >= max_batch or n * (len(part) + 1) > (1 + waste) * (real + n)):
            out.append(part)
            part, real = [], 0
        part.append(row)
        real += n
    return out + ([part] if part else [])


def encode_inputs(served: Served, inputs: list[tuple[str, str | None] | Messages]) -> tuple[list[list[int]], list[list[int]] | None]:
    """Token ids (and token type ids) of classification inputs, untruncated: a text or a (text, text_pair) as the
    classify stage encodes them, a conversation (messages) rendered through the chat template as a reward model
    reads prompt and reply."""
    ids: list[list[int]] = [[] for _ in inputs]
    types: list[list[int]] = [[] for _ in inputs]
    with_types = False
    for pairs in (False, True):  # singles and pairs apart: the tokenizer takes a batch of one kind
        texts = [(i, x) for i, x in enumerate(inputs) if isinstance(x, tuple) and (x[1] is not None) == pairs]
        if not texts:
            continue
        examples = [Example(text, pair, 0.0, "request", i) for i, (text, pair) in texts]
        encoded = encode_examples(served.tokenizer, examples, None, 10 ** 9, model_kind(served.model) == "decoder")
        with_types = with_types or encoded.type_ids is not None
        for k, (i, _) in enumerate(texts):
            ids[i] = encoded.ids[k]
            types[i] = encoded.type_ids[k] if encoded.type_ids is not None else [0] * len(ids[i])
    for i, x in enumerate(inputs):
        if not isinstance(x, tuple):
            ids[i] = served.tokenizer(render(served.tokenizer, x), add_special_tokens=False)["input_ids"]
            types[i] = [0] * len(ids[i])
    return ids, types if with_types else None
