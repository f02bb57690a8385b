"""`honelm chat` with piped stdin, and `honelm generate` with chat prompts and a JSONL prompt file."""

from __future__ import annotations

import io
import json

from tests.stages.conftest import cli


def chat(pretrained, monkeypatch, capsys, text: str, *extra: str) -> tuple[str, str]:
    monkeypatch.setattr("sys.stdin", io.StringIO(text))
    cli("chat", str(pretrained), "sampling.max_new_tokens=6", *extra)
    out = capsys.readouterr()
    return out.out, out.err


def test_chat_from_piped_stdin(pretrained, monkeypatch, capsys):
    session = "hello there\n\n/reset\nhow was the film ?\n/bogus\nand the cast ?\n/quit\nnever read\n"
    out, err = chat(pretrained, monkeypatch, capsys, session)
    assert "(end of chat: 3 replies)" in err  # one per user turn; the blank line, commands and /quit are not turns
    assert "honelm's default" in err  # the pre-trained tokenizer had no chat template
    assert "(conversation reset)" in err and "unknown command /bogus" in err
    again, _ = chat(pretrained, monkeypatch, capsys, session)
    assert again == out  # turn k samples with seed + k: a piped session is reproducible
    other, _ = chat(pretrained, monkeypatch, capsys, session, "sampling.seed=5")
    assert other != out


def test_chat_drops_old_turns_to_fit_the_context(pretrained, monkeypatch, capsys):
    long_turn = "the film was wonderful and the cast was superb " * 3
    out, err = chat(pretrained, monkeypatch, capsys, f"{long_turn}\n{long_turn}\n{long_turn}\n",
                    "max_context=80", "system=you talk about films .")
    assert "dropped the 1 oldest turn(s)" in err


def test_generate_chat_prompts_and_jsonl_file(pretrained, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "how was the film ?"}\n{"prompt": "and the cast ?"}\n')
    out = tmp_path / "g.jsonl"
    cli("generate", str(pretrained), f"prompts_file={prompts}", f"out={out}", "chat=true", "num_samples=2",
        "sampling.max_new_tokens=4", "sampling.seed=7")
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["how was the film ?", "and the cast ?"] * 2
    assert [r["sampling"]["seed"] for r in rows] == [7, 7, 8, 8]  # each row names the seed it was sampled with
    cli("generate", str(pretrained), "prompt=how was it ?", "chat=true", "sampling.max_new_tokens=4")
    shown = capsys.readouterr().out
    assert shown.startswith("user: how was it ?\nassistant: ")
