"""docs/guide/ runs as written: every page has a runnable example; its commands name real verbs and
build valid configs (default suite, no training); and each page's example runs, in order, in a fresh
directory (slow: one test per page)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from honelm import registry
from honelm.cli import main
from tests.docs.guide_blocks import ROOT, Command, commands, guide_pages

PAGES = guide_pages()
FAST_ENV = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def config_parts(words: tuple[str, ...]) -> tuple[str | None, list[str]]:
    """`--config NAME` and the `key=value` overrides of a config verb's command line (positional → its key)."""
    verb = registry.verb(words[0])
    config, overrides, rest = None, [], list(words[1:])
    while rest:
        word = rest.pop(0)
        if word in ("--config", "-c"):
            config = rest.pop(0)
        elif "=" in word and not word.startswith("-"):
            overrides.append(word)
        elif not word.startswith("-") and verb.positional and not overrides:
            overrides.append(f"{verb.positional}={word}")
    return config, overrides


def test_every_task_has_a_guide_page_with_a_runnable_example():
    names = {p.stem for p in PAGES}
    assert {"pretrain", "adapt", "classify", "sft", "preference-rl", "distill", "boost", "search-ablate",
            "serve-export", "multi-gpu"} <= names
    for page in PAGES:
        assert commands(page), f"docs/guide/{page.name} has no runnable example (a ```bash block after <!-- run -->)"


@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_each_command_names_a_verb_and_builds_its_config(page):
    for cmd in commands(page):
        where = f"docs/guide/{cmd.page}:{cmd.line}"
        assert cmd.words[0] in ("honelm", "torchrun"), f"{where}: a runnable block runs honelm or torchrun only"
        words = cmd.words[1:] if cmd.words[0] == "honelm" else cmd.words[cmd.words.index("honelm") + 1:]
        assert words and words[0] in registry.VERBS, f"{where}: {words[:1]} is not a honelm verb"
        if registry.verb(words[0]).kind != "command" and "--resume" not in words:
            config, overrides = config_parts(words)
            registry.build_config(words[0], config, overrides)  # unknown keys and bad values fail here


def run(cmd: Command) -> None:
    """One command as written: honelm in this process (the real CLI), torchrun as a process."""
    where = f"docs/guide/{cmd.page}:{cmd.line}: {' '.join(cmd.words)}"
    if cmd.words[0] == "honelm":
        assert main(list(cmd.words[1:])) == 0, where
        return
    env = {**os.environ, **FAST_ENV, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", *cmd.words[1:]], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"{where}\n{proc.stderr[-3000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_the_guide_runs_as_written(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for key, value in FAST_ENV.items():
        monkeypatch.setenv(key, value)
    for cmd in commands(page):
        run(cmd)
