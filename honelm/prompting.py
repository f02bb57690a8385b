"""Classification by prompting a causal LM: verbalizers, shots, prompts, and each label's log-likelihood.

For an example x and a label c with verbalizer v_c (a word or phrase, "great" for positive), the
label's score is

    s_c(x) = Σ_j log p(v_c[j] | prompt(x), v_c[<j])     (`normalize: sum`)
    s_c(x) = s_c(x) / |v_c|                              (`normalize: mean`: per verbalizer token)

where prompt(x) is the instruction, k shots per label drawn from the train split and x itself,
rendered through the tokenizer's chat template (each shot a user turn answered by an assistant
turn holding its verbalizer, then x as the last user turn and the generation prompt) or, with
`chat: false`, as plain text ("instruction\\n\\nshot verbalizer\\n\\n…x", the verbalizer after a
space). Prompt and verbalizer are tokenised apart and concatenated, so the scored tokens are the
verbalizer's own. The scores (N, C) are the classifier's logits: the prediction is their argmax
and their softmax a distribution over the labels. A longer verbalizer sums more (negative) terms,
so with verbalizers of different token counts `mean` keeps the comparison fair.

A prompted run keeps no copy of its model: `source_record` describes the directory it came from
(config sha256 and each weights file's size) and `check_source` refuses a directory that is gone or
no longer matches.
"""

from __future__ import annotations

import hashlib
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence

import torch
from transformers.utils import cached_file

from honelm.bounds import at_least
from honelm.data.chat import prompt_ids
from honelm.data.readers import Example
from honelm.errors import ConfigError, HonelmError
from honelm.objectives.logprobs import sum_by_row

TEMPLATES = {False: "Text: {text}\nAnswer:", True: "Text: {text}\nSecond text: {text_pair}\nAnswer:"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")


@dataclass
class PromptOptions:
    """How each example becomes a prompt and how each label's verbalizer is scored after it."""

    instruction: str = ""
    """Text telling the task, at the start of the first user turn; empty = "Classify the input. Answer with one of: " + the verbalizers."""
    verbalizers: str = ""
    """What each label is answered with, LABEL=WORD comma-separated ("negative=terrible,positive=great"); every train label needs one; empty = the label names themselves."""
    shots: Annotated[int, at_least(0)] = 0
    """Examples per label from the train split (chosen by run.seed, shuffled), shown before each example as answered turns; 0 = zero-shot."""
    template: str = ""
    """How an example is shown, with {text} (and {text_pair} for pair tasks); empty = "Text: {text}\\nAnswer:" (pairs: "Text: {text}\\nSecond text: {text_pair}\\nAnswer:")."""
    chat: bool = True
    """Render through the tokenizer's chat template (honelm's default written when it has none); false = plain text."""
    normalize: Literal["sum", "mean"] = "sum"
    """A label's score: the sum of its verbalizer tokens' log-probabilities, or their mean (fair between verbalizers of different token counts)."""


@dataclass
class ScoringConfig:
    """How the scoring runs. Nothing trains: the section keeps the name `train` that the runner and `search` share with the training stages."""

    eval_batch_size: Annotated[int, at_least(1)] = 16
    """Sequences per forward pass (one sequence per example and label)."""
    metric: str = ""
    """Validation metric recorded as the run's value in best/best.json (what a search scores); empty = val_accuracy."""
    metric_mode: Literal["auto", "min", "max"] = "auto"
    """Whether the metric is better when smaller (set by `search`; one evaluation compares nothing itself)."""
    threads: Annotated[int, at_least(0)] = 0
    """CPU threads for torch; 0 = leave torch's default."""
    progress: bool = True
    """Show the run's progress lines on the terminal."""
    tensorboard: bool = False
    """Also write TensorBoard events under tb/ when tensorboard is installed."""


@dataclass
class Prompted:
    """Examples as scored: per example, one sequence per label (prompt + that label's verbalizer), example-major."""

    sequences: list[list[int]]
    starts: list[int]
    """Where each sequence's verbalizer begins (the prompt's length)."""
    labels: torch.Tensor
    n_labels: int
    truncated: int
    """Texts cut to data.max_length tokens."""

    def __len__(self) -> int:
        return len(self.labels)


def parse_verbalizers(spec: str, id2label: dict[int, str]) -> list[str]:
    """Each label id's verbalizer from "LABEL=WORD,…" (empty: the names); errors name prompt.verbalizers."""
    names = [id2label[i] for i in sorted(id2label)]
    if not spec.strip():
        return names
    given: dict[str, str] = {}
    for part in spec.split(","):
        label, sep, word = (x.strip() for x in part.partition("="))
        if not sep or not label or not word:
            raise ConfigError(f"prompt.verbalizers: {part.strip()!r} is not LABEL=WORD "
                              "(e.g. negative=terrible,positive=great)")
        if label not in names:
            raise ConfigError(f"prompt.verbalizers: unknown label {label!r}; the train split's labels are "
                              f"{', '.join(names)}")
        if label in given:
            raise ConfigError(f"prompt.verbalizers: label {label!r} is given twice")
        given[label] = word
    missing = [n for n in names if n not in given]
    if missing:
        raise ConfigError(f"prompt.verbalizers: no verbalizer for label(s) {', '.join(missing)}; every train label "
                          "needs one")
    words = [given[n] for n in names]
    if len(set(words)) < len(words):
        raise ConfigError(f"prompt.verbalizers: two labels share a verbalizer ({spec}), so they cannot be told apart")
    return words


def pick_shots(train: Sequence[Example], k: int, seed: int, label2id: dict[Any, int]) -> list[Example]:
    """k train examples per label, chosen and ordered by `seed`."""
    g, chosen = torch.Generator().manual_seed(seed), []
    for label in label2id if k > 0 else ():
        pool = [e for e in train if e.label == label]
        if len(pool) < k:
            raise ConfigError(f"prompt.shots={k}: the train split has {len(pool)} example(s) of label {label!r}")
        chosen += [pool[i] for i in torch.randperm(len(pool), generator=g)[:k].tolist()]
    return [chosen[i] for i in torch.randperm(len(chosen), generator=g).tolist()]


def check_template(template: str, pair: bool) -> None:
    """{text} required, {text_pair} exactly for pair tasks, nothing else (ConfigError naming prompt.template)."""
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as err:
        raise ConfigError(f"prompt.template: {err} (write a literal brace as {{{{ or }}}})") from None
    allowed = {"text", "text_pair"} if pair else {"text"}
    if "text" not in fields or fields - allowed or (pair and "text_pair" not in fields):
        shown = " and ".join("{" + f + "}" for f in sorted(allowed))
        raise ConfigError(f"prompt.template: {template!r} must show {shown} and no other field"
                          + ("" if pair else " (data.pair_field is unset)"))


class Prompter:
    """Renders examples as prompts (instruction, shots, the example) and each label's verbalizer after them."""

    def __init__(self, tokenizer: Any, options: PromptOptions, label2id: dict[Any, int], id2label: dict[int, str],
                 shots: Sequence[Example], max_length: int, pair: bool) -> None:
        self.tokenizer, self.options, self.label2id, self.max_length = tokenizer, options, label2id, max_length
        self.words = parse_verbalizers(options.verbalizers, id2label)
        self.template = options.template or TEMPLATES[pair]
        check_template(self.template, pair)
        self.instruction = options.instruction or f"Classify the input. Answer with one of: {', '.join(self.words)}."
        self.truncated = 0
        self.shots = [(self.show(e), self.words[label2id[e.label]]) for e in shots]
        lead = "" if options.chat else " "  # plain text: "Answer: great"; a chat reply starts its own turn
        self.continuations = [tokenizer(lead + w, add_special_tokens=False)["input_ids"] for w in self.words]

    def cut(self, text: str) -> str:
        """The text, cut to max_length tokens (counted)."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= self.max_length:
            return text
        self.truncated += 1
        return self.tokenizer.decode(ids[: self.max_length])

    def show(self, example: Example) -> str:
        return self.template.format(text=self.cut(example.text), text_pair=self.cut(example.text_pair or ""))

    def prompt(self, shown: str) -> list[int]:
        """Token ids of the prompt that ends where the answer starts."""
        if not self.options.chat:
            text = "\n\n".join([self.instruction, *(f"{q} {a}" for q, a in self.shots), shown])
            return self.tokenizer(text)["input_ids"]
        messages = []
        for i, (q, a) in enumerate([*self.shots, (shown, None)]):
            messages.append({"role": "user", "content": f"{self.instruction}\n\n{q}" if i == 0 else q})
            if a is not None:
                messages.append({"role": "assistant", "content": a})
        return prompt_ids(self.tokenizer, messages)

    def encode(self, rows: Sequence[Example]) -> Prompted:
        self.truncated = 0
        sequences, starts = [], []
        for e in rows:
            prompt = self.prompt(self.show(e))
            for continuation in self.continuations:
                sequences.append(prompt + continuation)
                starts.append(len(prompt))
        labels = torch.tensor([self.label2id[e.label] for e in rows], dtype=torch.long)
        return Prompted(sequences, starts, labels, len(self.words), self.truncated)


@torch.no_grad()
def verbalizer_scores(model: torch.nn.Module, data: Prompted, batch_size: int, device: torch.device,
                      mean: bool = False) -> torch.Tensor:
    """(N, C) label scores: each sequence's verbalizer log-likelihood, right-padded batches of `batch_size`."""
    out = []
    for first in range(0, len(data.sequences), batch_size):
        chunk, starts = data.sequences[first:first + batch_size], data.starts[first:first + batch_size]
        ids = torch.zeros(len(chunk), max(map(len, chunk)), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, seq in enumerate(chunk):
            ids[r, :len(seq)], mask[r, :len(seq)] = torch.tensor(seq), 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        # token t of a sequence is predicted at t - 1: only the verbalizer's positions go through the softmax
        rows = torch.cat([torch.full((len(s) - b,), r) for r, (s, b) in enumerate(zip(chunk, starts))])
        cols = torch.cat([torch.arange(b, len(s)) for s, b in zip(chunk, starts)])
        logp = logits[rows, cols - 1].float().log_softmax(-1).gather(-1, ids[rows, cols, None].to(device))[:, 0]
        taken = torch.zeros(ids.shape, dtype=torch.bool)
        taken[rows, cols] = True  # row-major, as rows and cols list them
        sums = sum_by_row(logp, taken.to(device)).cpu()
        counts = torch.tensor([len(s) - b for s, b in zip(chunk, starts)], dtype=torch.float32)
        out.append(sums / counts if mean else sums)
    return torch.cat(out).view(-1, data.n_labels)


# ----------------------------------------------------------------------------------------------
# where the model lives


def fingerprint(model_dir: Path) -> dict[str, Any]:
    """A model directory's identity, read cheaply: its config's sha256 and each weights file's size."""
    config = next((model_dir / n for n in ("config.json", "adapter_config.json") if (model_dir / n).is_file()), None)
    if config is None:
        raise HonelmError(f"{model_dir}: no config.json")
    weights = {p.name: p.stat().st_size for p in sorted(model_dir.iterdir()) if p.name.endswith(WEIGHT_SUFFIXES)}
    return {"config": config.name, "sha256": hashlib.sha256(config.read_bytes()).hexdigest(), "weights": weights}


def source_record(spec: str, resolved: str) -> dict[str, Any]:
    """What a prompted run records of its model: init_from as given, the local directory, its fingerprint.

    A hub id (`resolved` not a directory) is recorded as the snapshot the loader just used from the cache.
    """
    path = Path(resolved) if Path(resolved).is_dir() else Path(cached_file(resolved, "config.json")).parent
    path = path.resolve()
    return {"init_from": spec, "path": str(path), **fingerprint(path)}


def check_source(record: dict[str, Any], where: Path) -> Path:
    """The recorded model directory, when it is there and unchanged; else a HonelmError saying which."""
    path = Path(record["path"])
    if not path.is_dir():
        raise HonelmError(f"{where}: the prompted model {path} is gone (a prompt run records its model, it keeps no "
                          "copy); put it back or prompt again")
    now = fingerprint(path)
    if {k: record.get(k) for k in now} != now:
        raise HonelmError(f"{where}: the prompted model {path} changed since the run (its config or weights files "
                          "differ from the record): the run's validation does not describe it; prompt again")
    return path
