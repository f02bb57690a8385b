"""Prompts for rollouts: reading, splitting and tokenising what the policy is asked to continue.

A prompt file is plain text (one prompt per non-empty line) or structured rows in any format
`honelm.data.chat.prompt_of` reads (a prompt, an alpaca instruction, a conversation whose reply
is dropped, a preference row's prompt). Prompts are split like documents (by content, seeded;
`honelm.data.splits.make_splits`), so validation prompts are never trained on.

A structured row may carry its reference answer (an `answer` field, else the reply the row holds:
alpaca `output`, a `completion`, a final assistant turn) and any other fields a reward check
reads (`honelm.rl.checks`); both travel with the prompt to the scorer.

Tokenising: with a chat template the prompt is rendered with the generation prompt
(`prompt_ids`); without one (a plain `pretrain` model) a prompt must be a single user message,
whose text the model continues as it is. Prompts longer than the limit keep their end (the part
the reply continues) and are counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Literal, Sequence

from honelm.bounds import at_least
from honelm.data.chat import Messages, prompt_ids, prompt_of, reference_of
from honelm.data.readers import BadRows, Document, Row, convert_rows, expand_paths, read_documents, read_rows
from honelm.data.sources import (SplitDataConfig, check_not_empty, read_test_later, report_skipped, say_split,
                                 skipping)
from honelm.data.splits import make_splits, parse_ratios
from honelm.errors import ConfigError, DataError


STRUCTURED = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


@dataclass
class PromptDataConfig(SplitDataConfig):
    """Prompts the policy is sampled on: a text file (one per line) or rows with a prompt, instruction, conversation or preference pair."""

    split: str = "9:1:0"
    """train:val:test ratios of the prompts (validation prompts measure the reward at eval time; a test share lets `honelm test` score the final policy's answers)."""
    chat: Literal["auto", "on", "off"] = "auto"
    """Render prompts with the tokenizer's chat template: auto = when the tokenizer has one; on = always (honelm's default template is added to a tokenizer without one); off = plain text continuation."""
    max_prompt_length: Annotated[int, at_least(1)] = 128
    """Longest prompt in tokens; a longer one keeps its last tokens (counted in the log)."""


@dataclass(frozen=True)
class PromptDocument(Document):
    """A prompt as a split row: `text` identifies it (roles and contents), `messages` holds it."""

    messages: tuple[tuple[str, str], ...] = ()
    reference: str | None = None
    """The row's reference answer (None: it has none)."""
    fields_json: str = "{}"
    """The row's fields as JSON (kept as text so that the document stays hashable)."""

    @property
    def conversation(self) -> Messages:
        return [{"role": r, "content": c} for r, c in self.messages]

    @property
    def fields(self) -> dict[str, Any]:
        return json.loads(self.fields_json)


@dataclass
class EncodedPrompt:
    """A tokenised prompt and what the scorer needs to see it again."""

    ids: list[int]
    prompt: Messages | str  # messages in chat mode, the plain text otherwise
    source: str
    line: int
    reference: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)


def _document(messages: Messages, source: str, line: int, reference: str | None = None,
              fields: dict[str, Any] | None = None) -> PromptDocument:
    text = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
    return PromptDocument(text, source, line, tuple((m["role"], m["content"]) for m in messages), reference,
                          json.dumps(fields or {}, ensure_ascii=False, default=str))


def _row_document(row: Row) -> PromptDocument:
    """A structured row's prompt with its reference answer (`answer`, else the row's reply) and its fields."""
    answer = row.data.get("answer")
    if answer is not None and (isinstance(answer, bool) or not isinstance(answer, (str, int, float))):
        raise DataError(row.source, row.line, "answer", f"must be a string or a number, got {type(answer).__name__}")
    reference = str(answer) if answer is not None else reference_of(row)
    return _document(prompt_of(row), row.source, row.line, reference, {**row.data, "answer": reference})


def read_prompt_documents(spec: str | Sequence[str], bad: BadRows | None = None) -> list[PromptDocument]:
    """Every prompt of the files (comma-separated, directories or globs), with file and line; bad rows are raised
    together, or collected in `bad` for its owner (`honelm.data.readers.BadRows`)."""
    given, bad = bad, BadRows() if bad is None else bad
    out: list[PromptDocument] = []
    for path in expand_paths(spec.split(",") if isinstance(spec, str) else spec):
        if path.suffix.lower() not in STRUCTURED:  # plain text, one prompt per non-empty line
            for doc in read_documents([path], unit="lines", bad=bad):
                out.append(_document([{"role": "user", "content": doc.text}], doc.source, doc.line))
        else:
            out.extend(convert_rows(read_rows([path], bad), _row_document, bad))
    BadRows.finish(given, bad, out)
    if not out:
        raise DataError(str(spec), None, None, "no prompts found")
    return out


def prompt_splits(data: PromptDataConfig, say: Callable[[str], None]) -> Any:
    """Prompts split by data.split (or the given val file), by content and seed."""
    if not data.train:
        raise ConfigError("data.train is empty: give a prompt file (.txt, one per line, or JSONL rows with a prompt, "
                          "an instruction or a conversation)")
    bad = skipping(data)
    train = read_prompt_documents(data.train, bad)
    val = read_prompt_documents(data.val, bad) if data.val else None
    bad.check()
    load_test = read_test_later(lambda b: read_prompt_documents(data.test, b), data, say) if data.test else None
    splits = make_splits(train, ratios=parse_ratios(data.split), seed=data.seed, stratify=False, val=val,
                         load_test=load_test, test_path=data.test.split(",") if data.test else None, dedup=data.dedup,
                         near_dup_threshold=data.near_dup_threshold)
    report_skipped(bad, splits.manifest, say)
    say_split(splits.manifest, say)
    check_not_empty(splits.manifest, data)
    return splits


def use_chat(data: PromptDataConfig, tokenizer: Any) -> bool:
    return data.chat == "on" or (data.chat == "auto" and bool(getattr(tokenizer, "chat_template", None)))


def encode_prompts(tokenizer: Any, docs: Sequence[PromptDocument], chat: bool, max_length: int
                   ) -> tuple[list[EncodedPrompt], int]:
    """Tokenised prompts and how many were cut to their last `max_length` tokens."""
    out: list[EncodedPrompt] = []
    cut = 0
    for d in docs:
        messages = d.conversation
        if chat:
            ids = prompt_ids(tokenizer, messages)
            prompt: Messages | str = messages
        else:
            if len(messages) != 1 or messages[0]["role"] != "user":
                raise DataError(d.source, d.line, "prompt", "has a system message or several turns, which need a chat "
                                "template: set data.chat=on (or use a model with a chat template)")
            prompt = messages[0]["content"]
            ids = tokenizer(prompt)["input_ids"]
        if not ids:
            raise DataError(d.source, d.line, "prompt", "tokenizes to zero tokens")
        if len(ids) > max_length:
            cut += 1
            ids = ids[-max_length:]
        out.append(EncodedPrompt(list(ids), prompt, d.source, d.line, d.reference, d.fields))
    return out, cut

