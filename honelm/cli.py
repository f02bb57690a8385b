"""The `honelm` command: verbs → stages, `--config NAME|PATH`, `key.sub=value` overrides, `--help`.

    honelm <verb> [--config NAME|PATH] [--resume RUN [--allow-changed-data]] [key.sub=value ...]
    honelm <verb> --help        every field with type, default and doc
    honelm ls                   verbs, presets and recent runs

A config NAME is looked up as configs/<verb>/NAME.yaml in the current directory, then in the
configs/ folder shipped next to the package.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import inspect
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from honelm import __version__
from honelm import config as C
from honelm import registry
from honelm.errors import HonelmError
from honelm.registry import VERBS, Verb, presets

if TYPE_CHECKING:  # the loop imports torch and transformers: `honelm --help` and `honelm ls` need neither
    from honelm.loop import Callback


def config_usage(verb: Verb) -> str:
    """The usage line of a verb that takes a config."""
    return (f"usage: honelm {verb.name} [--config NAME|PATH [--var NAME=VALUE ...]] [--dry-run] "
            "[--resume RUN [--allow-changed-data]] [key.sub=value ...]")


def config_help(verb: Verb, cls: type) -> str:
    lines = [config_usage(verb), "",
             verb.summary, "", "fields (key: type = default   doc):"]
    section = None
    for key, tp, default, doc in C.describe(cls):
        head = key.split(".")[0]
        if head != section and "." in key:
            section = head
            lines.append(f"\n  [{head}]")
        lines.append(f"  {key}: {tp} = {default}")
        if doc:
            lines.append(f"      {doc}")
    names = presets(verb.name)
    if names:
        lines.append(f"\npresets (--config NAME): {', '.join(names)}")
    return "\n".join(lines)


def run_config_verb(verb: Verb, argv: list[str], callbacks: Sequence[Callback] = ()) -> Any:
    cls = registry.config_class(verb.name)
    if any(a in ("-h", "--help") for a in argv):
        print(config_help(verb, cls))
        return None
    config_path: str | None = None
    resume: str | None = None
    allow_changed = "--allow-changed-data" in argv  # resume on inputs that changed since the run started (honelm.pins)
    dry_run = "--dry-run" in argv
    overrides: list[str] = []
    variables: list[str] = []  # --var NAME=VALUE: fills ${vars.NAME} in the preset (config.resolve_vars)
    it = iter(a for a in argv if a not in ("--allow-changed-data", "--dry-run"))
    for arg in it:
        if arg == "--var" or arg.startswith("--var="):
            value = arg.split("=", 1)[1] if "=" in arg else next(it, None)
            if value is None or "=" not in value:
                raise HonelmError("--var needs NAME=VALUE (a variable the preset declares under vars)")
            variables.append(value)
        elif arg in ("--config", "-c"):
            config_path = next(it, None)
            if config_path is None:
                raise HonelmError("--config needs a preset name or a YAML path")
        elif arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
        elif arg == "--resume":
            resume = next(it, None)
            if resume is None:
                raise HonelmError("--resume needs the run directory to resume")
        elif arg.startswith("--resume="):
            resume = arg.split("=", 1)[1]
        elif arg.startswith("-"):
            raise HonelmError(f"unknown option {arg}; see honelm {verb.name} --help")
        elif "=" not in arg and verb.positional and not overrides:
            overrides.append(f"{verb.positional}={arg}")
        else:
            overrides.append(arg)
    if resume:
        if config_path:
            raise HonelmError("--resume uses the run's own config.yaml; drop --config")
        config_path = str(Path(resume) / "config.yaml")
        if overrides or variables:
            raise HonelmError("--resume continues the run exactly as configured; overrides are not allowed")
    elif allow_changed:
        raise HonelmError("--allow-changed-data applies to --resume only")
    cfg = registry.build_config(verb.name, config_path, overrides, dict(C.parse_overrides(variables)))
    if dry_run:
        return dry_run_verb(verb, cfg)
    return registry.run_verb(verb.name, cfg, resume=resume, callbacks=callbacks, allow_changed_data=allow_changed)


def dry_run_verb(verb: Verb, cfg: Any) -> None:
    """`honelm VERB ... --dry-run`: the config is built (and so valid); every input must exist and every output be
    writable, all problems reported at once."""
    problems = registry.preflight(verb.name, cfg)
    if problems:
        raise HonelmError(f"--dry-run found {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    print(f"honelm {verb.name} --dry-run: the config is valid, every input exists and every output can be written")


def cmd_ls(argv: list[str]) -> Any:
    p = argparse.ArgumentParser(prog="honelm ls", description="List verbs, config presets and recent runs.")
    p.add_argument("--runs", default="runs", help="directory holding runs (default: runs)")
    args = p.parse_args(argv)
    print("verbs:")
    for v in VERBS.values():
        print(f"  {v.name:<10} {v.summary}")
    files_verbs = ("pipeline", "search", "ablate")  # their YAML is a file of their own, not a config preset
    for title, wanted in (("config presets (honelm VERB --config NAME)", False),
                          ("pipeline, search and ablation files (honelm VERB FILE)", True)):
        print(f"\n{title}:")
        for root in registry.config_roots():
            for stage_dir in sorted(p for p in root.iterdir() if p.is_dir() and (p.name in files_verbs) == wanted):
                names = sorted(x.stem for x in stage_dir.glob("*.yaml"))
                if names:
                    print(f"  {stage_dir.name:<10} {', '.join(names)}   ({stage_dir})")
    runs = Path(args.runs)
    if runs.is_dir():
        print(f"\nruns under {runs}:")
        for stage_dir in sorted(p for p in runs.iterdir() if p.is_dir()):
            # run directories only (run.json), not a folder runs keep beside them (distill's teacher_cache)
            runs_here = (r for r in stage_dir.iterdir() if r.is_dir() and not r.is_symlink() and (r / "run.json").is_file())
            found = sorted(runs_here, key=os.path.getmtime)
            for r in found[-5:]:
                marks = [m for m, f in (("best", "best"), ("tested", "test_metrics.json"), ("report", "report.md")) if (r / f).exists()]
                print(f"  {str(r):<45} {' '.join(marks)}")
    return None


def usage() -> str:
    lines = ["usage: honelm <verb> [--config NAME|PATH] [key.sub=value ...]", "", "verbs:"]
    lines += [f"  {v.name:<10} {v.summary}" for v in VERBS.values()]
    lines += ["", "honelm <verb> --help lists every field of that verb with its type, default and doc."]
    return "\n".join(lines)


def run_command(name: str, argv: list[str], callbacks: Sequence[Callback]) -> Any:
    """A command verb; `callbacks` reach only a command whose `main` takes them (search's trials)."""
    main = registry.command(name)
    if not callbacks:
        return main(argv)
    if "callbacks" not in inspect.signature(main).parameters:
        raise TypeError(f"honelm {name}: this command runs no training that callbacks could observe")
    return main(argv, callbacks=callbacks)


def main(argv: list[str] | None = None, callbacks: Sequence[Callback] = ()) -> int:
    """`honelm ...`; returns the exit status. `callbacks` (honelm.loop.Callback) are passed to every
    training run of the verb: the config verbs' run(), and each trial of a search."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("--version", "-V"):
        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # transformers' own progress bars (checkpoint shards, weight loading) would interleave with our one-line
    # log; transformers reads this when it is first imported, which the verb does after this point
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    verb = VERBS.get(name)
    if verb is None:
        hint = difflib.get_close_matches(name, list(VERBS), n=1)
        print(f"honelm: unknown verb '{name}'" + (f"; did you mean '{hint[0]}'?" if hint else "") + "\n\n" + usage(),
              file=sys.stderr)
        return 2
    try:
        if verb.kind != "command":
            result = run_config_verb(verb, rest, callbacks)
        else:
            result = run_command(name, rest, callbacks)
        if verb.kind != "command" and isinstance(result, dict) and result.get("reason") == "interrupted":
            return 130  # the checkpoint is written; the shell should still see an interrupted command
        if isinstance(result, dict) and result.get("stop_requested"):
            # the stop came while a finished run saved itself: its work is kept, but a pipeline, a shell
            # script or a search must not go on as if nobody had asked to stop
            print(f"honelm {name}: stopped (the run had finished when the stop came)", file=sys.stderr)
            return 130
    except HonelmError as e:
        print(f"honelm {name}: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # the reader went away (`honelm classify --help | head`): no traceback; stdout is pointed at devnull so
        # the interpreter's final flush does not fail again, and the exit code says the output was cut (as Python's
        # own recipe for SIGPIPE does)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # a write outside the checkpoints (a log line, a report): still one line, and what to do
        print(f"honelm {name}: error: no space left on the device ({e.filename or e}): free disk space and run "
              "again (a training run continues with --resume)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"honelm {name}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
