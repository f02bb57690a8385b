"""The `honelm` command: verbs → stages, `--config NAME|PATH`, `key.sub=value` overrides, `--help`.

    honelm <verb> [--config NAME|PATH] [--resume RUN] [key.sub=value ...]
    honelm <verb> --help        every field with type, default and doc
    honelm ls                   verbs, presets and recent runs

A config NAME is looked up as configs/<verb>/NAME.yaml in the current directory, then in the
configs/ folder shipped next to the package.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from honelm import config as C
from honelm.errors import HonelmError

if TYPE_CHECKING:  # the loop imports torch and transformers: `honelm --help` and `honelm ls` need neither
    from honelm.loop import Callback


@dataclass(frozen=True)
class Verb:
    name: str
    summary: str
    module: str = ""  # config verbs: module with `run(cfg, resume, callbacks)` and a config class
    config: str = ""  # name of the config class in `module`
    positional: str = ""  # config field filled by a bare first argument


VERBS: dict[str, Verb] = {v.name: v for v in [
    Verb("tokenizer", "train a byte-level BPE or WordPiece tokenizer on a corpus", "honelm.stages.tokenizer", "TokenizerConfig"),
    Verb("pretrain", "causal-LM pre-training on packed text (loss, perplexity, bits-per-byte)", "honelm.stages.pretrain", "PretrainConfig"),
    Verb("adapt", "continued pre-training on domain/task text: DAPT, TAPT, curated TAPT (MLM or causal LM)", "honelm.stages.adapt", "AdaptConfig"),
    Verb("classify", "fine-tune a sequence classifier / regressor (single texts or pairs)", "honelm.stages.classify", "ClassifyConfig"),
    Verb("sft", "instruction tuning: loss on assistant replies of chat data (alpaca, messages, sharegpt, prompt/completion), packed", "honelm.stages.sft", "SFTConfig"),
    Verb("reward", "Bradley-Terry reward model on preference pairs (scalar head, optional margin and centring)", "honelm.stages.reward", "RewardConfig"),
    Verb("dpo", "direct preference optimisation of a causal LM: DPO, cDPO, IPO, hinge; frozen, LoRA-disabled or precomputed reference", "honelm.stages.dpo", "DPOConfig"),
    Verb("ppo", "PPO against a reward model or a programmatic reward, per-token KL to the starting policy, value head", "honelm.stages.ppo", "PPOConfig"),
    Verb("test", "evaluate a run's best checkpoint on its test split, once"),
    Verb("generate", "sample from a causal LM (temperature, top-k, top-p, seed)", "honelm.stages.generate", "GenerateConfig", "model"),
    Verb("chat", "multi-turn chat with a model in the terminal, through its chat template (/reset, /quit)", "honelm.stages.chat", "ChatConfig", "model"),
    Verb("export", "write a run's best model as a standalone directory (--merge: LoRA merged into a plain transformers model)"),
    Verb("report", "write report.md and a self-contained report.html for a run, a search or an ablation"),
    Verb("ls", "list verbs, config presets and recent runs"),
    Verb("demo", "offline end-to-end demo on generated data (tokenizer → pretrain → classify → test → report)"),
    Verb("pipeline", "run the stages of a pipeline YAML in order, chained by named outputs; finished stages are skipped"),
    Verb("search", "hyperparameter search (Optuna TPE/random/grid, pruning) on validation only; resumable study"),
    Verb("ablate", "boosters vs baseline over seeds: mean ± std, paired-bootstrap CI on test, verdict, cost"),
]}


def config_roots() -> list[Path]:
    roots = [Path.cwd() / "configs", Path(__file__).resolve().parent.parent / "configs"]
    seen, out = set(), []
    for r in roots:
        if r.resolve() not in seen and r.is_dir():
            seen.add(r.resolve())
            out.append(r)
    return out


def find_config(verb: str, spec: str) -> Path:
    path = Path(spec)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise HonelmError(f"{spec}: no such config file")
        return path
    for root in config_roots():
        candidate = root / verb / f"{spec}.yaml"
        if candidate.is_file():
            return candidate
    names = sorted({p.stem for r in config_roots() for p in (r / verb).glob("*.yaml")})
    raise HonelmError(f"no config preset '{spec}' for {verb}; presets: {', '.join(names) or 'none'}")


def config_help(verb: Verb, cls: type) -> str:
    lines = [f"usage: honelm {verb.name} [--config NAME|PATH] [--resume RUN] [key.sub=value ...]", "",
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
    presets = sorted({p.stem for r in config_roots() for p in (r / verb.name).glob("*.yaml")})
    if presets:
        lines.append(f"\npresets (--config NAME): {', '.join(presets)}")
    return "\n".join(lines)


def run_config_verb(verb: Verb, argv: list[str], callbacks: Sequence[Callback] = ()) -> Any:
    module = importlib.import_module(verb.module)
    cls = getattr(module, verb.config)
    if any(a in ("-h", "--help") for a in argv):
        print(config_help(verb, cls))
        return None
    config_path: str | None = None
    resume: str | None = None
    overrides: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg in ("--config", "-c"):
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
        if overrides:
            raise HonelmError("--resume continues the run exactly as configured; overrides are not allowed")
    path = find_config(verb.name, config_path) if config_path else None
    cfg = C.build(cls, path, overrides)
    from honelm.runtime import reset_peak_memory

    reset_peak_memory()  # the run's `end` event reports its own peak, not an earlier run's in this process
    return module.run(cfg, resume=resume, callbacks=callbacks)


def cmd_test(argv: list[str]) -> Any:
    p = argparse.ArgumentParser(prog="honelm test", description="Evaluate RUN's best checkpoint on its test split, once. "
                                "This is the only command that reads the test split; every look is recorded.")
    p.add_argument("run", help="run directory (e.g. runs/classify/latest), or a search directory (its best trial)")
    p.add_argument("--force", action="store_true", help="look again although the test split was already evaluated (recorded)")
    args = p.parse_args(argv)
    from honelm.protocol.test import run_test

    run = Path(args.run)
    if (run / "search.json").is_file():  # a search directory: its best trial is the run to test
        best = run / "best.json"
        if not best.is_file():
            raise HonelmError(f"{run}: this search has no complete trial yet")
        run = Path(json.loads(best.read_text(encoding="utf-8"))["run_dir"])
        print(f"testing the search's best trial: {run}")
    metrics = run_test(run, force=args.force)
    for k, v in metrics.items():
        print(f"{k}: {v}")
    return metrics


def cmd_report(argv: list[str]) -> Any:
    p = argparse.ArgumentParser(prog="honelm report", description="Write DIR/report.md and a self-contained "
                                "DIR/report.html (plots embedded) for a run, a search or an ablation directory.")
    p.add_argument("run", help="run, search or ablation directory")
    args = p.parse_args(argv)
    from honelm.protocol.reports import write_any

    path = write_any(args.run)
    print(path)
    print(path.with_suffix(".html"))
    return path


def cmd_export(argv: list[str]) -> Any:
    p = argparse.ArgumentParser(prog="honelm export", description="Write RUN's best model to a directory that needs "
                                "nothing else: a LoRA run merged into a plain transformers model (--merge) or its "
                                "PEFT adapter as is; any other run's best/ copied.")
    p.add_argument("run", help="run directory (e.g. runs/classify/latest) or a model/adapter directory (then --out)")
    p.add_argument("--merge", action="store_true", help="merge a LoRA adapter into its base (in fp32) and save a plain checkpoint")
    p.add_argument("--out", default=None, help="destination directory (default: RUN/export)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty destination")
    args = p.parse_args(argv)
    from honelm.stages.export import export

    return export(args.run, merge=args.merge, out=args.out, overwrite=args.overwrite)


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
        for root in config_roots():
            for stage_dir in sorted(p for p in root.iterdir() if p.is_dir() and (p.name in files_verbs) == wanted):
                names = sorted(x.stem for x in stage_dir.glob("*.yaml"))
                if names:
                    print(f"  {stage_dir.name:<10} {', '.join(names)}   ({stage_dir})")
    runs = Path(args.runs)
    if runs.is_dir():
        print(f"\nruns under {runs}:")
        for stage_dir in sorted(p for p in runs.iterdir() if p.is_dir()):
            found = sorted((r for r in stage_dir.iterdir() if r.is_dir() and not r.is_symlink()), key=os.path.getmtime)
            for r in found[-5:]:
                marks = [m for m, f in (("best", "best"), ("tested", "test_metrics.json"), ("report", "report.md")) if (r / f).exists()]
                print(f"  {str(r):<45} {' '.join(marks)}")
    return None


def cmd_demo(argv: list[str]) -> Any:
    from honelm.demo import main

    return main(argv)


def cmd_pipeline(argv: list[str]) -> Any:
    from honelm.pipeline import main

    return main(argv)


def cmd_search(argv: list[str], callbacks: Sequence[Callback] = ()) -> Any:
    from honelm.protocol.search import main

    return main(argv, callbacks)


def cmd_ablate(argv: list[str]) -> Any:
    from honelm.protocol.ablate import main

    return main(argv)


COMMANDS: dict[str, Callable[[list[str]], Any]] = {"test": cmd_test, "export": cmd_export, "report": cmd_report,
                                                   "ls": cmd_ls, "demo": cmd_demo, "pipeline": cmd_pipeline,
                                                   "search": cmd_search, "ablate": cmd_ablate}


def usage() -> str:
    lines = ["usage: honelm <verb> [--config NAME|PATH] [key.sub=value ...]", "", "verbs:"]
    lines += [f"  {v.name:<10} {v.summary}" for v in VERBS.values()]
    lines += ["", "honelm <verb> --help lists every field of that verb with its type, default and doc."]
    return "\n".join(lines)


def run_command(name: str, argv: list[str], callbacks: Sequence[Callback]) -> Any:
    """A verb that is not a config verb; `callbacks` reach the runs of `search` only."""
    if name == "search":
        return cmd_search(argv, callbacks)
    if callbacks:
        raise TypeError(f"honelm {name}: callbacks reach the config verbs and search only")
    return COMMANDS[name](argv)


def main(argv: list[str] | None = None, callbacks: Sequence[Callback] = ()) -> int:
    """`honelm ...`; returns the exit status. `callbacks` (honelm.loop.Callback) are passed to every
    training run of the verb: the config verbs' run(), and each trial of a search."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("--version", "-V"):
        from honelm import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:  # transformers' own per-shard progress bars would interleave with our one-line log
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    verb = VERBS.get(name)
    if verb is None:
        import difflib

        hint = difflib.get_close_matches(name, list(VERBS), n=1)
        print(f"honelm: unknown verb '{name}'" + (f"; did you mean '{hint[0]}'?" if hint else "") + "\n\n" + usage(),
              file=sys.stderr)
        return 2
    try:
        result = run_config_verb(verb, rest, callbacks) if verb.module else run_command(name, rest, callbacks)
        if verb.module and isinstance(result, dict) and result.get("reason") == "interrupted":
            return 130  # the checkpoint is written; the shell should still see an interrupted command
        if isinstance(result, dict) and result.get("stop_requested"):
            # the stop came while a finished run saved itself: its work is kept, but a pipeline, a shell
            # script or a search must not go on as if nobody had asked to stop
            print(f"honelm {name}: stopped (the run had finished when the stop came)", file=sys.stderr)
            return 130
    except HonelmError as e:
        print(f"honelm {name}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"honelm {name}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
