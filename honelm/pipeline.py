"""`honelm pipeline FILE`: run honelm verbs in order from one YAML file, chained by named outputs.

    # honelm pipeline configs/pipeline/demo.yaml
    out_dir: runs/pipeline/demo          # every stage's run goes to OUT_DIR/<name>
    vars: {data: runs/pipeline/demo/data}  # optional; ${vars.NAME} in a value; --var NAME=VALUE (docs/presets.md)
    stages:
      - name: tokenizer                  # optional (default: the verb); unique
        verb: tokenizer                  # any verb that writes a run directory ...
        config: bpe-8k                   # optional preset name or YAML path (--config)
        set: {data.train: "${vars.data}/corpus.txt"}   # overrides: dotted keys or nested mappings
      - name: pretrain
        verb: pretrain
        set: {model.tokenizer: "${tokenizer}"}          # ${NAME} = OUT_DIR/NAME, an earlier stage's run
      - name: data                       # ... or a command verb: honelm VERB ARGS...
        verb: demo
        args: [--data-only, --out, "${vars.data}"]
        output: "${vars.data}"           # what ${data} stands for (optional)

The file is read as `PipelineConfig` (each stage a `PipelineStageConfig`) by honelm.config's
`from_mapping`; `honelm pipeline --help` lists every field.

Each stage runs in this process through the registry and the runner, exactly as `honelm VERB ...` would.
Stages that write a run directory get `run.out_dir=OUT_DIR run.name=NAME`.

Resuming: run the same file again. A run stage is FINISHED when its run directory's
metrics.jsonl ends with an `end` event whose reason is not `interrupted` (the loop and the
tokenizer write it last, after best/ and the final checkpoint; failing that, when its newest
checkpoint is marked finished); it is skipped. One with a
checkpoint but no such event (killed or interrupted) is continued with `--resume`; one without
a checkpoint is started again (`run.overwrite=true`). A finished or resumable run whose saved
config.yaml differs from what the file now asks for is an error naming the keys: delete the
run directory to redo it. A command stage is finished when OUT_DIR/.pipeline/NAME.json records
that the same command line exited 0. `--dry-run` runs nothing: it shows each command and checks every input
and output (honelm.preflight; an earlier stage's output may be missing). A kept stage that started before a stage it names finished
(that input was redone since) is an error too: its result is stale. Every config is built (and
validated) before anything runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from honelm import config as C
from honelm import preflight, registry
from honelm.checkpoint import list_checkpoints
from honelm.registry import VERBS
from honelm.errors import ConfigError, HonelmError

REF = re.compile(r"\$\{([^}]*)\}")
NOT_IN_PIPELINES = ("pipeline", "chat")  # recursion; interactive
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a stage's name names its run directory


@dataclass
class PipelineStageConfig:
    """One stage of a pipeline file, as the file gives it."""

    verb: str = ""
    """The honelm verb to run: one that writes a run directory (tokenizer, pretrain, sft, ...) or a command
    (demo, export, test, ...)."""
    name: str = ""
    """The stage's name, unique in the file: its run is OUT_DIR/NAME and ${NAME} stands for it in later stages;
    empty = the verb."""
    config: str = ""
    """The verb's preset name or YAML path (its --config); empty = the verb's defaults."""
    set: dict[str, Any] = field(default_factory=dict)
    """Overrides of the verb's config: dotted keys or nested mappings, ${...} allowed in values."""
    args: list[str] = field(default_factory=list)
    """Command line of a command verb (honelm VERB ARGS...); for a run verb, extra key=value arguments (or its
    positional one, or `--var NAME=VALUE` for its preset's vars) before those of `set`."""
    output: str = ""
    """What ${NAME} stands for when the stage is a command (it has no run directory), e.g. the directory it
    writes."""

    def validate(self) -> None:
        if self.verb not in VERBS:
            hint = difflib.get_close_matches(self.verb, list(VERBS), n=1)
            raise C.FieldError("verb", f"{self.verb!r} is not a honelm verb"
                               + (f"; did you mean '{hint[0]}'?" if hint else ""))
        if self.verb in NOT_IN_PIPELINES:
            raise C.FieldError("verb", f"'{self.verb}' cannot run inside a pipeline")
        if not NAME.fullmatch(self.name or self.verb):
            raise C.FieldError("name", f"{self.name or self.verb!r} must be letters, digits, '-', '_' or '.' "
                                       "(it names a directory)")
        if not registry.has_config(self.verb) and (self.set or self.config):
            raise ConfigError(f"'{self.verb}' takes no config; give its command line as 'args'")


@dataclass
class PipelineConfig:
    """A pipeline file (configs/pipeline/*.yaml): where the runs go, named values, and the stages in order."""

    out_dir: str = ""
    """Directory that holds every stage's run (OUT_DIR/NAME); ${out_dir} stands for it. Required."""
    vars: dict[str, C.VarConfig] = field(default_factory=dict)
    """Named values, used as ${vars.NAME} in a stage's config, set, args or output: `NAME: VALUE` (a default), or
    NAME: {description, source} for one that `--var NAME=VALUE` must give (the error says what and where to get it)."""
    stages: list[PipelineStageConfig] = field(default_factory=list)
    """The stages, run in this order; a stage can name only stages before it. At least one."""

    def validate(self) -> None:
        if not self.out_dir.strip():
            raise C.FieldError("out_dir", "missing (the directory that holds every stage's run)")
        if not self.stages:
            raise C.FieldError("stages", "must be a non-empty list")


@dataclass
class Stage:
    """One stage as the file gives it, with its place in the file for error messages."""

    name: str
    verb: str
    line: int
    config: str = ""
    set: dict[str, Any] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    output: str = ""


@dataclass
class Pipeline:
    path: Path
    out_dir: Path
    variables: dict[str, str]
    stages: list[Stage]


def _where(pipe_path: Path, line: int | None) -> str:
    return f"{pipe_path}:{line}" if line else str(pipe_path)


def load(path: str | Path, variables: dict[str, str] | None = None) -> Pipeline:
    """Parse and check the pipeline file (structure, names, verbs), its vars filled from `variables` (--var) or their
    defaults; errors name file, line and field."""
    p = Path(path)
    raw = C.read_yaml(p, "pipeline file", C.LineLoader)
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: a pipeline file is a mapping with out_dir and stages")
    cfg = C.from_mapping(PipelineConfig, raw, p)
    stages: list[Stage] = []
    for i, (entry, item) in enumerate(zip(cfg.stages, raw["stages"])):
        line = C.line_of(item)
        name = entry.name or entry.verb
        if any(s.name == name for s in stages):
            raise ConfigError(f"{_where(p, line)}: stages[{i}].name: '{name}' is used by an earlier stage; "
                              "give this one a 'name'")
        stages.append(Stage(name, entry.verb, line or 0, entry.config, entry.set, entry.args, entry.output))
    return Pipeline(p, Path(cfg.out_dir), C.file_var_values(cfg.vars, variables or {}, p), stages)


# ----------------------------------------------------------------------------------------------
# references and overrides


def _flatten(mapping: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.extend(_flatten(value, dotted + "."))
        else:
            out.append((dotted, value))
    return out


def _as_override(value: Any) -> str:
    """A YAML value as the text of a `key=value` override (what C.build parses)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    if isinstance(value, list):
        return yaml.safe_dump(value, default_flow_style=True).strip()
    return str(value)


def run_dir_of(pipe: Pipeline, stage: Stage) -> Path:
    return pipe.out_dir / stage.name


def has_run_dir(verb: str) -> bool:
    """Whether the verb's config has a `run` section (so it writes OUT_DIR/NAME)."""
    if not registry.has_config(verb):
        return False
    return any(f.name == "run" for f in dataclasses.fields(registry.config_class(verb)))


def resolve(pipe: Pipeline, index: int, text: str, what: str) -> str:
    """Replace ${NAME}, ${vars.X} and ${out_dir} in `text`; a stage may only name stages before it."""
    stage = pipe.stages[index]
    earlier = {s.name: s for s in pipe.stages[:index]}
    later = {s.name for s in pipe.stages[index:]}

    def one(match: re.Match[str]) -> str:
        ref = match.group(1).strip()
        where = f"{_where(pipe.path, stage.line)}: stage '{stage.name}' {what}"
        if ref == "out_dir":
            return str(pipe.out_dir)
        if ref.startswith("vars."):
            key = ref[5:]
            if key not in pipe.variables:
                raise ConfigError(f"{where}: ${{{ref}}} is not defined under vars ({', '.join(pipe.variables) or 'none'})")
            return pipe.variables[key]
        if ref in earlier:
            target = earlier[ref]
            if has_run_dir(target.verb):
                return str(run_dir_of(pipe, target))
            if target.output:
                return resolve(pipe, pipe.stages.index(target), target.output, "output")
            raise ConfigError(f"{where}: ${{{ref}}} names a '{target.verb}' stage with no 'output' to stand for")
        if ref in later:
            raise ConfigError(f"{where}: ${{{ref}}} names a stage that runs later (or this one); stages run in order")
        raise ConfigError(f"{where}: ${{{ref}}} is not an earlier stage, vars.NAME or out_dir "
                          f"(stages before it: {', '.join(earlier) or 'none'})")

    return REF.sub(one, text)


@dataclass
class Planned:
    """A stage ready to run: its command line, and for run stages its built config."""

    stage: Stage
    argv: list[str]
    run_dir: Path | None = None
    config: Any = None
    config_cls: type | None = None
    status: str = ""  # done | resume | restart | run


def _build_config(cls: type, verb: Any, argv: list[str]) -> Any:
    """The config `honelm VERB ARGV...` would run with (the CLI's own rules: --config, --var, a positional,
    key=value)."""
    config_path, overrides, variables = None, [], []
    it = iter(argv)
    for arg in it:
        if arg in ("--config", "-c"):
            config_path = next(it, None)
        elif arg == "--var":
            variables.append(next(it, ""))
        elif "=" not in arg and verb.positional and not overrides:
            overrides.append(f"{verb.positional}={arg}")
        elif "=" in arg:
            overrides.append(arg)
        else:
            raise ConfigError(f"unexpected argument {arg!r} (give settings under 'set')")
    return C.build(cls, registry.find_config(verb.name, config_path) if config_path else None, overrides,
                   dict(C.parse_overrides(variables)))


def var_args(argv: list[str]) -> dict[str, str]:
    """The `--var NAME=VALUE` pairs among a run stage's arguments (what its preset's ${vars.NAME} are given)."""
    return dict(C.parse_overrides([value for flag, value in zip(argv, argv[1:]) if flag == "--var"]))


def plan(pipe: Pipeline) -> list[Planned]:
    """Every stage's command line and config, built (and validated) before anything runs."""
    out: list[Planned] = []
    for i, stage in enumerate(pipe.stages):
        verb = VERBS[stage.verb]
        args = [resolve(pipe, i, a, "args") for a in stage.args]
        if not registry.has_config(stage.verb):
            out.append(Planned(stage, [stage.verb, *args]))
            continue
        argv = (["--config", resolve(pipe, i, stage.config, "config")] if stage.config else []) + args
        argv += [f"{k}={resolve(pipe, i, _as_override(v), f'set.{k}')}" for k, v in _flatten(stage.set)]
        run_dir = None
        if has_run_dir(stage.verb):
            run_dir = run_dir_of(pipe, stage)
            argv += [f"run.out_dir={pipe.out_dir}", f"run.name={stage.name}"]
        cls = registry.config_class(stage.verb)
        try:
            built = _build_config(cls, verb, argv)
        except HonelmError as e:
            raise ConfigError(f"{_where(pipe.path, stage.line)}: stage '{stage.name}' ({stage.verb}): {e}") from None
        out.append(Planned(stage, [stage.verb, *argv], run_dir, built, cls))
    return out


# ----------------------------------------------------------------------------------------------
# finished, resumable or new


def finished_reason(run_dir: Path) -> str | None:
    """The reason of the last `end` event in run_dir/metrics.jsonl, unless it is `interrupted`."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    reason = None
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash
        if row.get("event") == "end":
            reason = row.get("reason")
    return None if reason in (None, "interrupted") else str(reason)


def run_finished(run_dir: Path) -> bool:
    """Finished: the last `end` event is not `interrupted`, or (the event lost to a crash right after it)
    the newest checkpoint says so."""
    if finished_reason(run_dir) is not None:
        return True
    found = list_checkpoints(run_dir / "checkpoints")
    if not found:
        return False
    try:
        return bool(json.loads((found[-1] / "trainer_state.json").read_text(encoding="utf-8")).get("finished"))
    except (OSError, ValueError):
        return False


def config_differences(planned: Planned) -> list[str]:
    """Dotted keys where the run's saved config.yaml differs from the planned one (run.overwrite ignored)."""
    assert planned.run_dir is not None and planned.config_cls is not None
    saved = C.to_dict(C.build(planned.config_cls, planned.run_dir / "config.yaml"))
    wanted = C.to_dict(planned.config)
    flat_saved, flat_wanted = dict(_flatten(saved)), dict(_flatten(wanted))
    return sorted(k for k in set(flat_saved) | set(flat_wanted)
                  if k != "run.overwrite" and flat_saved.get(k) != flat_wanted.get(k))


def _marker(pipe: Pipeline, stage: Stage) -> Path:
    return pipe.out_dir / ".pipeline" / f"{stage.name}.json"


def decide(pipe: Pipeline, planned: Planned) -> str:
    """done, resume, restart or run; an error when an existing run no longer matches the file."""
    stage = planned.stage
    if planned.run_dir is None:  # a command stage
        marker = _marker(pipe, stage)
        if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")).get("argv") == planned.argv:
            return "done"
        return "run"
    run_dir = planned.run_dir
    if not (run_dir / "config.yaml").is_file():
        return "restart" if run_dir.exists() and any(run_dir.iterdir()) else "run"
    has_checkpoint = bool(list_checkpoints(run_dir / "checkpoints")) or any(
        list_checkpoints(sub / "checkpoints") for sub in run_dir.iterdir() if sub.is_dir())
    done = run_finished(run_dir)
    if done or has_checkpoint:
        diff = config_differences(planned)
        if diff:
            shown = ", ".join(diff[:8]) + (f" and {len(diff) - 8} more" if len(diff) > 8 else "")
            raise HonelmError(f"{_where(pipe.path, stage.line)}: stage '{stage.name}' already has a "
                              f"{'finished' if done else 'started'} run in {run_dir} with a different config "
                              f"({shown}); delete {run_dir} to run it again with the new settings")
        return "done" if done else "resume"
    return "restart"


def inputs_of(pipe: Pipeline, index: int) -> list[int]:
    """Indices of the earlier stages that stage `index` names (${NAME} in its config, set or args)."""
    stage = pipe.stages[index]
    texts = [stage.config, *stage.args, *(_as_override(v) for _, v in _flatten(stage.set))]
    names = {m.group(1).strip() for t in texts for m in REF.finditer(t)}
    return [i for i, s in enumerate(pipe.stages[:index]) if s.name in names]


def _times(pipe: Pipeline, planned: Planned) -> tuple[float | None, float | None]:
    """(started, finished) of a stage's existing result, as its run (or marker) recorded them."""
    try:
        if planned.run_dir is None:
            marker = json.loads(_marker(pipe, planned.stage).read_text(encoding="utf-8"))
            return marker.get("started"), marker.get("finished")
        started = json.loads((planned.run_dir / "run.json").read_text(encoding="utf-8")).get("started")
        finished = None
        for line in (planned.run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
            if '"event": "end"' in line:
                finished = json.loads(line).get("time")
        return started, finished
    except (OSError, ValueError):
        return None, None


def check_fresh(pipe: Pipeline, steps: list[Planned], index: int) -> None:
    """A kept (finished or resumable) stage must have started after every stage it uses finished.

    Otherwise one of its inputs was redone after it ran (or while it ran), and its result is stale.
    """
    started, _ = _times(pipe, steps[index])
    if started is None:
        return
    for i in inputs_of(pipe, index):
        _, upstream_done = _times(pipe, steps[i])
        if upstream_done is not None and upstream_done > started:
            stage = steps[index].stage
            where = steps[index].run_dir or _marker(pipe, stage)
            raise HonelmError(f"{_where(pipe.path, stage.line)}: stage '{stage.name}' ran on an older result of "
                              f"'{steps[i].stage.name}', which was redone after it started; delete {where} (and the "
                              "results of the stages that use it) to run it again on the new one")


def command_for(planned: Planned) -> list[str]:
    if planned.status == "resume":
        return [planned.stage.verb, "--resume", str(planned.run_dir)]
    if planned.status == "restart":
        return planned.argv + ["run.overwrite=true"]
    return planned.argv


def run_planned(planned: Planned) -> int:
    """Run one stage in this process through the registry, as `honelm VERB ...` would; its exit code.

    Failures print the CLI's own line (`honelm VERB: error: ...`); 130 means interrupted (its
    checkpoint saved) or a stop that came as the finished run saved itself.
    """
    verb = planned.stage.verb
    try:
        if planned.config is None:  # a command: test, export, report
            registry.command(verb)(planned.argv[1:])
            return 0
        cfg, resume = planned.config, None
        if planned.status == "resume":
            assert planned.run_dir is not None and planned.config_cls is not None
            cfg, resume = C.build(planned.config_cls, planned.run_dir / "config.yaml"), str(planned.run_dir)
        elif planned.status == "restart":
            assert planned.config_cls is not None
            cfg = _build_config(planned.config_cls, registry.verb(verb), planned.argv[1:] + ["run.overwrite=true"])
        result = registry.run_verb(verb, cfg, resume=resume)
    except HonelmError as e:
        print(f"honelm {verb}: error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print(f"honelm {verb}: interrupted", file=sys.stderr, flush=True)
        return 130
    return registry.exit_code(result)


def run_pipeline(path: str | Path, dry_run: bool = False, variables: dict[str, str] | None = None
                 ) -> list[dict[str, Any]]:
    """Run (or, dry, only show and check) every stage that is not finished; returns one summary row per stage.
    `variables` (--var NAME=VALUE) fill the file's vars."""
    return execute(load(path, variables), dry_run)


def execute(pipe: Pipeline, dry_run: bool = False, again: str = "") -> list[dict[str, Any]]:
    """Run the stages of `pipe` that are not finished (see the module docstring); `again` is the
    command that continues it after an interruption (default: `honelm pipeline FILE`)."""
    again = again or f"honelm pipeline {pipe.path}"
    steps = plan(pipe)
    summary: list[dict[str, Any]] = []
    print(f"pipeline {pipe.path}: {len(steps)} stages, runs under {pipe.out_dir}", flush=True)
    for index, planned in enumerate(steps):
        planned.status = decide(pipe, planned)
        if planned.status in ("done", "resume"):
            check_fresh(pipe, steps, index)
        stage = planned.stage
        words = command_for(planned)
        row: dict[str, Any] = {"stage": stage.name, "verb": stage.verb, "status": planned.status,
                               "run_dir": str(planned.run_dir) if planned.run_dir else None}
        summary.append(row)
        if planned.status == "done":
            print(f"\n= {stage.name}: finished earlier, skipped ({planned.run_dir or 'same command'})", flush=True)
            continue
        label = {"resume": "resuming", "restart": "starting again (no checkpoint)", "run": "running"}[planned.status]
        print(f"\n> {stage.name}: {label}\n$ honelm {' '.join(_quote(w) for w in words)}", flush=True)
        if dry_run:
            continue
        started = time.time()
        if planned.run_dir is None:
            _marker(pipe, stage).unlink(missing_ok=True)
        code = run_planned(planned)
        row["time_s"] = round(time.time() - started, 1)
        if code != 0:
            how = "was interrupted" if code == 130 else f"failed (exit {code})"
            message = (f"stage '{stage.name}' {how}; run `{again}` again to continue "
                       "(finished stages are skipped, a stage with a checkpoint resumes)")
            if code == 130:  # the shell should see an interrupted command, as for the verb itself
                print(message, file=sys.stderr, flush=True)
                raise KeyboardInterrupt
            raise HonelmError(message)
        if planned.run_dir is not None and not run_finished(planned.run_dir):
            raise HonelmError(f"stage '{stage.name}' exited without finishing its run in {planned.run_dir}")
        if planned.run_dir is None:
            marker = _marker(pipe, stage)
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(json.dumps({"argv": planned.argv, "started": started, "finished": time.time()}, indent=2),
                              encoding="utf-8")
    if dry_run:
        check_dry(pipe, steps)
    else:
        done = ", ".join(f"{r['stage']} ({r['status']})" for r in summary)
        print(f"\npipeline finished: {done}", flush=True)
    return summary


def check_dry(pipe: Pipeline, steps: list[Planned]) -> None:
    """`--dry-run`: every input of every stage that would run exists, or an earlier stage makes it (its run
    directory, or a command stage's `output`), and every output can be written; all problems at once, each with
    its stage and field (HonelmError), else one line saying so."""
    problems = [f"{pipe.path}: out_dir: {why}"] if (why := preflight.writable(pipe.out_dir)) else []
    produced: list[Path] = []
    for index, planned in enumerate(steps):
        stage = planned.stage
        if planned.config is not None and planned.status != "done":
            where = f"{_where(pipe.path, stage.line)}: stage '{stage.name}' ({stage.verb})"
            problems += [f"{where}: {line}" for line in preflight.check(planned.config, stage.verb, produced)]
        if planned.run_dir is not None:
            produced.append(planned.run_dir)
        elif stage.output:
            produced.append(Path(resolve(pipe, index, stage.output, "output")))
    if problems:
        raise HonelmError(f"--dry-run found {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    print("\ndry run: every config is valid, every input exists (or an earlier stage makes it) and every output "
          "can be written", flush=True)


def _quote(word: str) -> str:
    return word if re.fullmatch(r"[\w@%+=:,./${}-]+", word) else "'" + word.replace("'", "'\\''") + "'"


def main(argv: list[str]) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(prog="honelm pipeline", description="Run the stages of a pipeline YAML in order "
                                "(see configs/pipeline/); finished stages are skipped, interrupted ones resume.",
                                epilog=C.fields_help(PipelineConfig, "fields of the file (key: type = default   doc):"),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="pipeline YAML (e.g. configs/pipeline/demo.yaml)")
    p.add_argument("--var", action="append", default=[], metavar="NAME=VALUE", help="set one of the file's vars")
    p.add_argument("--dry-run", action="store_true", help="show what would run and check it without running: every "
                   "config, every input (files, model directories; an earlier stage's output may be missing) and "
                   "that every output can be written")
    args = p.parse_args(argv)
    return run_pipeline(args.file, dry_run=args.dry_run, variables=dict(C.parse_overrides(args.var)))
