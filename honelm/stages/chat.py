"""`honelm chat RUN`: multi-turn chat with a model in the terminal, through its chat template.

Each line read from standard input is a user turn (or a command); the model's reply is sampled
with the `sampling` settings (as `honelm generate`; turn k uses seed + k, so a piped session is
reproducible) and printed on standard output, one reply per turn. A tokenizer without a chat
template gets honelm's default (`honelm.data.chat.ensure_template`), the one `sft` trains with.
Commands: /reset (start over), /system TEXT (set the system message and start over), /help,
/quit (or end of input). When the conversation outgrows the context, the oldest turns are
dropped, and the terminal is told.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Iterator, TextIO

from honelm import runtime as rt
from honelm.bounds import at_least
from honelm.checkpoint import resolve_model_dir
from honelm.config import section
from honelm.data.chat import Messages, ensure_template, prompt_ids
from honelm.errors import ConfigError
from honelm.generate import SamplingConfig, generate_ids
from honelm.models import load_model
from honelm.tokenizer import load_tokenizer

HELP = "commands: /reset starts over · /system TEXT sets the system message (and starts over) · /quit ends"


def _chat_sampling() -> SamplingConfig:
    return SamplingConfig(max_new_tokens=128, temperature=0.7, top_p=0.9)


@dataclass
class ChatConfig:
    """Chat with a causal language model in the terminal."""

    model: str = ""
    """A run directory (its best/ model) or a model directory; also accepted as the first argument."""
    system: str = ""
    """System message at the start of every conversation (empty = none)."""
    max_context: Annotated[int, at_least(0)] = 0
    """Longest conversation in tokens, reply included; 0 = the model's max_position_embeddings. Older turns are dropped to fit (and said so); a reply gets at most half of it."""
    sampling: SamplingConfig = section(_chat_sampling)


def _lines(stream: TextIO) -> Iterator[str]:
    """User lines: `input()` with a prompt on a terminal (line editing), plain lines from a pipe."""
    if stream.isatty():
        while True:
            try:
                yield input("you> ")
            except EOFError:
                return
    else:
        for line in stream:
            yield line.rstrip("\r\n")


def fit_context(tokenizer: Any, messages: Messages, limit: int, say: Callable[[str], None]) -> list[int] | None:
    """The prompt ids of `messages`, dropping the oldest user/assistant pairs (in place) until they fit.

    None when even the newest user turn alone does not fit (it is removed again).
    """
    first = 1 if messages and messages[0]["role"] == "system" else 0
    ids = prompt_ids(tokenizer, messages)
    dropped = 0
    while len(ids) > limit and len(messages) - first > 1:
        del messages[first:first + 2]  # the oldest user turn and its reply
        dropped += 1
        ids = prompt_ids(tokenizer, messages)
    if dropped:
        say(f"(dropped the {dropped} oldest turn(s) to fit the context of {limit} prompt tokens)")
    if len(ids) > limit:
        messages.pop()
        say(f"(that message is {len(ids)} tokens with the template; at most {limit} fit: say it shorter)")
        return None
    return ids


def run(cfg: ChatConfig, resume: str | None = None, stdin: TextIO | None = None,
        stdout: TextIO | None = None) -> dict[str, Any]:
    if resume:
        raise ConfigError("chat has nothing to resume")
    if not cfg.model:
        raise ConfigError("which model? give a run directory or model directory: honelm chat RUN")
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    path = resolve_model_dir(cfg.model)
    device = rt.setup().device
    tokenizer = load_tokenizer(path)
    ensure_template(tokenizer, say)
    model = load_model(path, "lm").to(device).eval()
    window = cfg.max_context or getattr(model.config, "max_position_embeddings", 2048)
    reply_tokens = cfg.sampling.max_new_tokens
    if reply_tokens > window // 2:  # keep at least half of the context for the conversation
        reply_tokens = max(window // 2, 1)
        say(f"(replies limited to {reply_tokens} tokens: the context holds {window}; sampling.max_new_tokens="
            f"{cfg.sampling.max_new_tokens} would leave no room for the conversation)")
    limit = window - reply_tokens
    base: Messages = [{"role": "system", "content": cfg.system}] if cfg.system else []
    messages = list(base)
    say(f"chatting with {path} (T={cfg.sampling.temperature}, top-p {cfg.sampling.top_p}, top-k {cfg.sampling.top_k}, "
        f"up to {reply_tokens} tokens per reply). {HELP}")
    turns = 0
    for line in _lines(stdin):
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, rest = text.partition(" ")
            if command in ("/quit", "/exit"):
                break
            if command == "/reset":
                messages = list(base)
                say("(conversation reset)")
            elif command == "/system":
                base = [{"role": "system", "content": rest.strip()}] if rest.strip() else []
                messages = list(base)
                say("(system message set; conversation reset)" if base else "(system message removed; conversation reset)")
            elif command == "/help":
                say(HELP)
            else:
                say(f"(unknown command {command}) {HELP}")
            continue
        messages.append({"role": "user", "content": text})
        ids = fit_context(tokenizer, messages, limit, say)
        if ids is None:
            continue
        sampling = SamplingConfig(**{**cfg.sampling.__dict__, "seed": cfg.sampling.seed + turns,
                                     "max_new_tokens": reply_tokens})
        reply = generate_ids(model, tokenizer, [ids], sampling)[0]
        messages.append({"role": "assistant", "content": reply})
        turns += 1
        prefix = "assistant> " if stdout.isatty() else ""
        print(prefix + reply, file=stdout, flush=True)
    say(f"(end of chat: {turns} replies)")
    return {"turns": turns}
