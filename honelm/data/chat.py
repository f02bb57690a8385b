"""Conversations and preference pairs: formats, the default chat template, and completion-only labels.

Formats of an SFT row, detected per row (or forced with `fmt`), each an error naming file, line
and field when it does not fit:

  alpaca             {"instruction", "input"?, "output", "system"?}
  prompt_completion  {"prompt", "completion"} (strings, or lists of {role, content} messages)
  messages           {"messages": [{"role": system|user|assistant, "content"}, ...]}
  sharegpt           {"conversations": [{"from": system|human|gpt, "value"}, ...]}

Preference rows (reward, dpo): {"prompt", "chosen", "rejected"} (strings or message lists), or the
ShareGPT ranking form {"conversations": [...], "chosen": {"from": "gpt", "value"}, "rejected": {...}}
(LLaMA-Factory's dpo_en_demo), or {"chosen", "rejected"} alone, each a whole dialogue (hh-rlhf text or a
message list) whose shared beginning is the prompt (`honelm.data.dialogues`).

Everything becomes a list of {"role", "content"} messages rendered by the tokenizer's chat
template (`apply_chat_template`), so what honelm trains on is what any runtime renders. A model
trained from scratch gets `DEFAULT_CHAT_TEMPLATE` written into its tokenizer (`ensure_template`):

    <|role|>\\n content EOS      per message; the generation prompt is "<|assistant|>\\n"

(role headers are plain text, EOS ends every turn, so the model learns to stop and generation
stops at EOS without new special tokens.)

Labels (`encode_chat`): the rendered text is tokenised once with character offsets; a token is
a target when it starts inside an assistant message's span, which runs from the end of
the generation prompt to the end of that message's rendering (so the end-of-turn/EOS token is
trained). Padding is never a target because labels are built from spans, not by comparing token
ids with the pad id (which would drop EOS when pad == eos).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from honelm.data.dialogues import shared_prompt, turns_of_text
from honelm.data.readers import BadRows, Row, convert_rows, read_rows
from honelm.errors import DataError, HonelmError

IGNORE = -100
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
FORMATS = ("alpaca", "prompt_completion", "messages", "sharegpt")

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

Messages = list[dict[str, str]]


@dataclass
class Conversation:
    """One SFT example: messages ending with an assistant turn, and where it came from."""

    messages: Messages
    source: str
    line: int


@dataclass
class Preference:
    """One preference pair: a prompt (messages ending with a user turn) and two assistant replies."""

    prompt: Messages
    chosen: str
    rejected: str
    source: str
    line: int
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# reading


def _text(row: Row, name: str, value: Any, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise DataError(row.source, row.line, name, f"must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(row.source, row.line, name, "is empty")
    return value


def _messages(row: Row, name: str, value: Any, key_role: str = "role", key_text: str = "content",
              roles: dict[str, str] | None = None) -> Messages:
    if not isinstance(value, list) or not value:
        raise DataError(row.source, row.line, name, "must be a non-empty list of messages")
    out: Messages = []
    for i, m in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(m, dict):
            raise DataError(row.source, row.line, where, f"must be an object with {key_role!r} and {key_text!r}")
        for k in (key_role, key_text):
            if k not in m:
                raise DataError(row.source, row.line, f"{where}.{k}", "is missing")
        role = m[key_role]
        mapped = (roles or {r: r for r in ROLES}).get(role) if isinstance(role, str) else None
        if mapped is None:
            allowed = ", ".join(sorted(roles or ROLES))
            raise DataError(row.source, row.line, f"{where}.{key_role}", f"must be one of {allowed}, got {role!r}")
        content = _text(row, f"{where}.{key_text}", m[key_text], allow_empty=mapped == "system")
        out.append({"role": mapped, "content": content})
    _check_order(row, name, out)
    return out


def _check_order(row: Row, name: str, messages: Messages) -> None:
    """system? then alternating user/assistant, starting with user."""
    rest = messages[1:] if messages and messages[0]["role"] == "system" else messages
    for i, m in enumerate(rest):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            at = i + (len(messages) - len(rest))
            raise DataError(row.source, row.line, f"{name}[{at}]",
                            f"is {_article(m['role'])} {m['role']} message where {_article(want)} {want} message must come "
                            "(system first if any, then user and assistant alternating)")


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def detect_format(data: dict[str, Any]) -> str | None:
    if "conversations" in data:
        return "sharegpt"
    if "messages" in data:
        return "messages"
    if "instruction" in data and "output" in data:
        return "alpaca"
    if "prompt" in data and "completion" in data:
        return "prompt_completion"
    return None


def conversation_of(row: Row, fmt: str = "auto") -> Conversation:
    """A row as a Conversation; the format is detected unless given."""
    data = row.data
    kind = detect_format(data) if fmt == "auto" else fmt
    if kind is None:
        raise DataError(row.source, row.line, None,
                        f"no SFT format fits the fields {sorted(data)}: expected alpaca (instruction, output, "
                        "input?), prompt_completion (prompt, completion), messages (messages: [{role, content}]) "
                        "or sharegpt (conversations: [{from, value}])")
    if kind not in FORMATS:
        raise HonelmError(f"data.format: {kind!r} is not one of auto, {', '.join(FORMATS)}")
    for needed in {"alpaca": ("instruction", "output"), "prompt_completion": ("prompt", "completion"),
                   "messages": ("messages",), "sharegpt": ("conversations",)}[kind]:
        if needed not in data:
            raise DataError(row.source, row.line, needed, f"is missing (format {kind})")
    if kind == "alpaca":
        instruction = _text(row, "instruction", data["instruction"])
        extra = data.get("input") or ""
        if extra:
            instruction = f"{instruction}\n\n{_text(row, 'input', extra)}"
        msgs: Messages = []
        if data.get("system"):
            msgs.append({"role": "system", "content": _text(row, "system", data["system"])})
        msgs += [{"role": "user", "content": instruction},
                 {"role": "assistant", "content": _text(row, "output", data["output"])}]
    elif kind == "prompt_completion":
        prompt = data["prompt"]
        msgs = (_messages(row, "prompt", prompt) if isinstance(prompt, list)
                else [{"role": "user", "content": _text(row, "prompt", prompt)}])
        completion = data["completion"]
        if isinstance(completion, list):
            msgs += _assistant_list(row, "completion", completion)
        else:
            msgs.append({"role": "assistant", "content": _text(row, "completion", completion)})
        _check_order(row, "prompt", msgs)
    elif kind == "messages":
        msgs = _messages(row, "messages", data["messages"])
    else:
        msgs = _messages(row, "conversations", data["conversations"], "from", "value", SHAREGPT_ROLES)
    if msgs[-1]["role"] != "assistant":
        raise DataError(row.source, row.line, "messages" if kind in ("messages", "sharegpt") else None,
                        "the conversation must end with an assistant message (nothing to learn otherwise)")
    return Conversation(msgs, row.source, row.line)


def _assistant_list(row: Row, name: str, value: Any) -> Messages:
    if not isinstance(value, list) or len(value) != 1 or not isinstance(value[0], dict):
        raise DataError(row.source, row.line, name, "as a list must hold exactly one {role: assistant, content} message")
    m = value[0]
    if m.get("role") != "assistant":
        raise DataError(row.source, row.line, f"{name}[0].role", f"must be 'assistant', got {m.get('role')!r}")
    return [{"role": "assistant", "content": _text(row, f"{name}[0].content", m.get("content"))}]


def read_conversations(spec: str | Sequence[str], fmt: str = "auto", bad: BadRows | None = None) -> list[Conversation]:
    """Every row of the files as a Conversation; bad rows are reported together (or collected in `bad`)."""
    given, bad = bad, BadRows() if bad is None else bad
    out = convert_rows(read_rows(spec, bad), lambda r: conversation_of(r, fmt), bad)
    BadRows.finish(given, bad, out)
    return out


def preference_of(row: Row) -> Preference:
    """A row as a Preference: {prompt, chosen, rejected}, ShareGPT {conversations, chosen, rejected}, or
    {chosen, rejected} as two whole dialogues sharing their prompt (`honelm.data.dialogues`)."""
    data = row.data
    for needed in ("chosen", "rejected"):
        if needed not in data:
            raise DataError(row.source, row.line, needed, "is missing (a preference row needs prompt or "
                            "conversations, chosen and rejected)")
    if "conversations" in data:
        prompt = _messages(row, "conversations", data["conversations"], "from", "value", SHAREGPT_ROLES)
        chosen = _reply(row, "chosen", data["chosen"], "from", "value", ("gpt", "assistant"))
        rejected = _reply(row, "rejected", data["rejected"], "from", "value", ("gpt", "assistant"))
    elif "prompt" in data:
        raw = data["prompt"]
        prompt = (_messages(row, "prompt", raw) if isinstance(raw, list)
                  else [{"role": "user", "content": _text(row, "prompt", raw)}])
        chosen = _reply(row, "chosen", data["chosen"], "role", "content", ("assistant",))
        rejected = _reply(row, "rejected", data["rejected"], "role", "content", ("assistant",))
    else:
        prompt, chosen, rejected = _implicit_prompt(row)
    if prompt[-1]["role"] != "user":
        raise DataError(row.source, row.line, "conversations" if "conversations" in data else "prompt",
                        "the prompt must end with a user message")
    if chosen == rejected:
        raise DataError(row.source, row.line, "rejected", "is identical to chosen (no preference to learn)")
    return Preference(prompt, chosen, rejected, row.source, row.line)


def _implicit_prompt(row: Row) -> tuple[Messages, str, str]:
    """{chosen, rejected} as two whole dialogues (hh-rlhf text or message lists): their shared prompt and replies."""
    dialogues = []
    for name in ("chosen", "rejected"):
        value = row.data[name]
        if isinstance(value, str):
            value = turns_of_text(value, row.source, row.line, name)
        elif not isinstance(value, list):
            raise DataError(row.source, row.line, "prompt", "is missing (a preference row needs prompt or "
                            "conversations, or chosen and rejected as whole dialogues)")
        dialogues.append(_messages(row, name, value))
    return shared_prompt(dialogues[0], dialogues[1], row.source, row.line)


def _reply(row: Row, name: str, value: Any, key_role: str, key_text: str, roles: tuple[str, ...]) -> str:
    if isinstance(value, str):
        return _text(row, name, value)
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, dict):
        raise DataError(row.source, row.line, name, "must be a string or one assistant message")
    if value.get(key_role) not in roles:
        raise DataError(row.source, row.line, f"{name}.{key_role}", f"must be one of {', '.join(roles)}, "
                        f"got {value.get(key_role)!r}")
    return _text(row, f"{name}.{key_text}", value.get(key_text))


@dataclass
class Judged:
    """One unpaired example (KTO): a prompt, one assistant completion, and whether it is desirable."""

    prompt: Messages
    completion: str
    desirable: bool
    source: str
    line: int


LABEL_WORDS = {"true": True, "false": False, "1": True, "0": False}


def judged_of(row: Row) -> Judged:
    """A {prompt, completion, label} row (KTO's unpaired format): prompt text or messages, completion text or one
    assistant message, label a boolean (true = desirable; CSV cells "true"/"false"/"1"/"0")."""
    data = row.data
    for needed in ("prompt", "completion", "label"):
        if needed not in data:
            raise DataError(row.source, row.line, needed, "is missing (an unpaired row needs prompt, completion and "
                            "label)")
    raw = data["prompt"]
    prompt = (_messages(row, "prompt", raw) if isinstance(raw, list)
              else [{"role": "user", "content": _text(row, "prompt", raw)}])
    if prompt[-1]["role"] != "user":
        raise DataError(row.source, row.line, "prompt", "the prompt must end with a user message")
    completion = _reply(row, "completion", data["completion"], "role", "content", ("assistant",))
    label = data["label"]
    if isinstance(label, str):
        label = LABEL_WORDS.get(label.strip().lower(), label)
    elif isinstance(label, int) and not isinstance(label, bool) and label in (0, 1):
        label = bool(label)
    if not isinstance(label, bool):
        raise DataError(row.source, row.line, "label", f"must be true (desirable) or false (undesirable), got {label!r}")
    return Judged(prompt, completion, label, row.source, row.line)


def read_preferences(spec: str | Sequence[str], bad: BadRows | None = None) -> list[Preference]:
    """Every row of the files as a Preference; bad rows are reported together (or collected in `bad`)."""
    given, bad = bad, BadRows() if bad is None else bad
    out = convert_rows(read_rows(spec, bad), preference_of, bad)
    BadRows.finish(given, bad, out)
    return out


def prompt_of(row: Row) -> Messages:
    """The prompt of a row, for sampling (PPO rollouts): messages ending with a user turn.

    Accepts {"prompt": text | messages} alone, alpaca rows with or without "output", messages /
    sharegpt conversations ending with a user turn or with an assistant turn (the final reply is
    dropped: it is what the policy will write), prompt_completion rows and preference rows (their
    prompt).
    """
    data = row.data
    if "chosen" in data or "rejected" in data:
        return preference_of(row).prompt
    if "messages" in data or "conversations" in data:
        name = "messages" if "messages" in data else "conversations"
        msgs = (_messages(row, name, data[name]) if name == "messages"
                else _messages(row, name, data[name], "from", "value", SHAREGPT_ROLES))
        if msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
    elif "instruction" in data:
        instruction = _text(row, "instruction", data["instruction"])
        if data.get("input"):
            instruction = f"{instruction}\n\n{_text(row, 'input', data['input'])}"
        msgs = [{"role": "system", "content": _text(row, "system", data["system"])}] if data.get("system") else []
        msgs.append({"role": "user", "content": instruction})
    elif "prompt" in data:
        raw = data["prompt"]
        msgs = (_messages(row, "prompt", raw) if isinstance(raw, list)
                else [{"role": "user", "content": _text(row, "prompt", raw)}])
    else:
        raise DataError(row.source, row.line, "prompt", f"is missing: no prompt format fits the fields {sorted(data)} "
                        "(prompt, instruction, messages, conversations, or a preference row)")
    if not msgs or msgs[-1]["role"] != "user":
        raise DataError(row.source, row.line, "messages" if "messages" in data else "prompt",
                        "the prompt must end with a user message")
    return msgs


def reference_of(row: Row) -> str | None:
    """The reply a row holds for its prompt (`prompt_of`): the final assistant turn of an SFT row
    (alpaca `output`, prompt_completion `completion`, a messages / sharegpt conversation ending with
    an assistant turn); None for a row without one (a bare prompt, a conversation ending with a user
    turn, a preference pair, whose replies are ranked rather than one reference).
    """
    data = row.data
    if "chosen" in data or "rejected" in data:
        return None
    kind = detect_format(data)
    if kind in ("messages", "sharegpt"):
        msgs = (_messages(row, "messages", data["messages"]) if kind == "messages"
                else _messages(row, "conversations", data["conversations"], "from", "value", SHAREGPT_ROLES))
        return msgs[-1]["content"] if msgs[-1]["role"] == "assistant" else None
    return conversation_of(row, kind).messages[-1]["content"] if kind is not None else None


# --------------------------------------------------------------------------------------------
# templates and encoding


def ensure_template(tokenizer: Any, say: Any = None) -> bool:
    """Give a tokenizer without a chat template honelm's default one; True when it was added.

    The template is saved with the tokenizer (tokenizer_config.json / chat_template.jinja), so
    `apply_chat_template` gives the same rendering anywhere.
    """
    if getattr(tokenizer, "chat_template", None):
        return False
    if tokenizer.eos_token is None:
        raise HonelmError("the tokenizer has no EOS token, which honelm's default chat template ends turns with")
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    if say is not None:
        say("chat template: the tokenizer had none; wrote honelm's default (<|role|>\\n content EOS per turn)")
    return True


def render(tokenizer: Any, messages: Messages, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer: Any, messages: Messages) -> tuple[str, list[tuple[int, int]]]:
    """(rendered text, [(start, end) character spans of each assistant turn, end-of-turn included]).

    A turn's span starts where the rendering of the conversation up to it with the generation
    prompt ends, and ends where the rendering up to and including it ends; both renderings must
    be prefixes of the full text, which is checked (a template that is not prefix-stable cannot
    be trained turn by turn).
    """
    full = render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = render(tokenizer, messages[: i + 1])
        if not full.startswith(before) or not full.startswith(upto) or len(upto) < len(before):
            raise HonelmError("the chat template does not render a conversation's prefix as a prefix of the whole "
                              "(needed to find assistant turns); use another template")
        spans.append((len(before), len(upto)))
    return full, spans


@dataclass
class Encoded:
    """Token ids and labels (IGNORE where nothing is trained) of one example."""

    ids: list[int]
    labels: list[int]
    truncated: bool


def encode_chat(tokenizer: Any, messages: Messages, max_length: int, train_on: str = "assistant") -> Encoded | None:
    """Tokenise a conversation with completion-only labels; None when truncation leaves no target.

    train_on: "assistant" (every assistant turn), "last" (the final assistant turn only) or "all".
    Truncation keeps the start (the prompt) and cuts the end.
    """
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if train_on == "all":
        labels = list(ids)
    else:
        chosen = spans[-1:] if train_on == "last" else spans
        # a token is a target when it starts inside a turn's span (a token straddling the start
        # belongs to the prompt side; one straddling the end still carries reply characters)
        labels = [tok if b > a and any(s <= a < e for s, e in chosen) else IGNORE
                  for tok, (a, b) in zip(ids, offsets)]
    truncated = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    if all(x == IGNORE for x in labels[1:]):  # position 0 is never predicted
        return None
    return Encoded(ids, labels, truncated)


def encode_prompt_reply(tokenizer: Any, prompt: Messages, reply: str, max_length: int) -> Encoded | None:
    """prompt + one assistant reply, labels on the reply (with its end-of-turn); None if cut away."""
    return encode_chat(tokenizer, prompt + [{"role": "assistant", "content": reply}], max_length, train_on="last")


def prompt_ids(tokenizer: Any, prompt: Messages) -> list[int]:
    """The prompt rendered with the generation prompt, as token ids (what sampling continues)."""
    return tokenizer(render(tokenizer, prompt, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
