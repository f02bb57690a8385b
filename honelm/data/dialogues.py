"""Preference rows as they are shipped: two whole dialogues whose shared beginning is the prompt.

Many exports (Anthropic's hh-rlhf, chat logs with a thumbs-up/down pair) give a preference row as
`{chosen, rejected}` only, each the WHOLE conversation, prompt included:

    hh-rlhf text      "\\n\\nHuman: hi\\n\\nAssistant: hello!\\n\\nHuman: a joke?\\n\\nAssistant: <reply>"
    chat messages     [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"}, ...]

`turns_of_text` reads the hh-rlhf text into messages (Human → user, Assistant → assistant; the
text before the first marker must be blank). `shared_prompt` splits two dialogues into the prompt
and two replies: the prompt is their longest common prefix of whole messages, cut back to the
start of the last assistant turn in it, and what follows in each dialogue must be exactly one
assistant message (the reply). Bad rows are errors naming file and line (never dropped):

  * final assistant turns identical: there is no preference to learn;
  * no common prefix (the first turns differ): the two dialogues answer different prompts;
  * a dialogue with more than the final assistant turn after the shared prompt: the dialogues
    diverge earlier, so the row compares two conversations, not two replies to one prompt.
"""

from __future__ import annotations

import re
from typing import Any

from honelm.errors import DataError

Messages = list[dict[str, str]]

HH_MARKER = re.compile(r"(?:\A\s*|\n\n)(Human|Assistant):")
"""A turn marker of the hh-rlhf text format, at the very start (after blanks) or after a blank line."""
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def turns_of_text(text: str, source: str, line: int, field: str) -> list[dict[str, Any]]:
    """hh-rlhf dialogue text as [{role, content}] (content stripped; validated by the caller)."""
    parts = HH_MARKER.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise DataError(source, line, field, "is a string without a prompt: give prompt (or conversations), or the "
                        "whole dialogue as hh-rlhf text starting with '\\n\\nHuman:' (or a list of messages)")
    return [{"role": HH_ROLES[role], "content": content.strip()} for role, content in zip(parts[1::2], parts[2::2])]


def shared_prompt(chosen: Messages, rejected: Messages, source: str, line: int) -> tuple[Messages, str, str]:
    """(prompt, chosen reply, rejected reply) of two whole dialogues (validated message lists)."""
    for name, dialogue in (("chosen", chosen), ("rejected", rejected)):
        if dialogue[-1]["role"] != "assistant":
            raise DataError(source, line, name, "must end with an assistant turn (the reply the preference is about)")
    if chosen[-1]["content"] == rejected[-1]["content"]:
        raise DataError(source, line, "rejected", "its final assistant turn is identical to chosen's (no preference "
                        "to learn)")
    common = 0
    while common < min(len(chosen), len(rejected)) and chosen[common] == rejected[common]:
        common += 1
    if common == 0:
        raise DataError(source, line, "rejected", "shares no prefix with chosen: the two dialogues must begin with the "
                        "same prompt (their first turns differ)")
    # the prompt ends where the last assistant turn inside the shared prefix (or right after it) starts
    start = min(common, len(chosen) - 1, len(rejected) - 1)
    while start > 0 and chosen[start]["role"] != "assistant":
        start -= 1
    for name, dialogue in (("chosen", chosen), ("rejected", rejected)):
        if len(dialogue) != start + 1:
            raise DataError(source, line, name, f"differs from the other dialogue at message {common}, before the "
                            "final assistant turn: a preference row compares two replies to one prompt")
    return chosen[:start], chosen[start]["content"], rejected[start]["content"]
