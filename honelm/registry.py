"""The one list of verbs and commands, and where their config presets are found.

Every verb `honelm` knows is listed here once, with what it runs: a training stage (a
`honelm.stages.contract.Stage` subclass, run by `honelm.stages.runner`), a config verb (a module
with a config class and `run(cfg, resume)`) or a command (a `main(argv)` function with argparse
options of its own). Targets are named as "module:attribute" strings and imported on first use,
so `honelm --help` does not load torch. `cli`, `pipeline`, `search`, `ablate`, `boost`, `test` and
`report` find stages through this module and know none by name; `tests/unit/test_registry.py`
keeps it, `configs/` and the README's verb table in sync.

A config NAME is looked up as configs/<verb>/NAME.yaml in the current directory, then in the
configs/ folder shipped next to the package.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

from honelm import config as C
from honelm.errors import HonelmError


@dataclass(frozen=True)
class Verb:
    name: str
    summary: str
    kind: Literal["stage", "config", "command"]
    target: str | Any
    """stage: "module:StageClass"; config: "module:ConfigClass" (the module has run(cfg, resume)); command: "module:main".
    A registered plug-in may give the object itself instead of its "module:attribute" name."""
    positional: str = ""
    """Config verbs: the field a bare first argument fills (`honelm generate RUN`)."""

    @property
    def module(self) -> str:
        """The module that defines a stage's or config verb's config class ("" for a command)."""
        if self.kind == "command":
            return ""
        return self.target.split(":")[0] if isinstance(self.target, str) else self.target.__module__


VERBS: dict[str, Verb] = {v.name: v for v in [
    Verb("tokenizer", "train a byte-level BPE or WordPiece tokenizer on a corpus", "config",
         "honelm.stages.tokenizer:TokenizerConfig"),
    Verb("pretrain", "causal-LM pre-training on packed text (loss, perplexity, bits-per-byte)", "stage",
         "honelm.stages.pretrain:Pretrain"),
    Verb("adapt", "continued pre-training on domain/task text: DAPT, TAPT, curated TAPT (MLM or causal LM)", "stage",
         "honelm.stages.adapt:Adapt"),
    Verb("classify", "fine-tune a sequence classifier / regressor (single texts or pairs)", "stage",
         "honelm.stages.classify:Classification"),
    Verb("distill", "knowledge distillation into a smaller student: a teacher classifier/regressor's soft labels on a "
         "transfer set, or a teacher causal LM's answers (sequence-level) or next-token distribution (token-level)",
         "stage",
         "honelm.stages.distill:Distillation"),
    Verb("prompt", "zero/few-shot classification with a causal LM: each label's verbalizer scored through the chat "
         "template; validated, tested once like a trained run", "stage", "honelm.stages.prompt:PromptStage"),
    Verb("sft", "instruction tuning: loss on assistant replies of chat data (alpaca, messages, sharegpt, "
         "prompt/completion), packed", "stage", "honelm.stages.sft:SFT"),
    Verb("reward", "Bradley-Terry reward model on preference pairs (scalar head, optional margin and centring)",
         "stage", "honelm.stages.reward:Reward"),
    Verb("dpo", "direct preference optimisation of a causal LM: DPO, cDPO, IPO, hinge; frozen, LoRA-disabled or "
         "precomputed reference", "stage", "honelm.stages.dpo:DPOStage"),
    Verb("ppo", "PPO against a reward model or a programmatic reward, per-token KL to the starting policy, value head",
         "stage", "honelm.stages.ppo:PPOStage"),
    Verb("grpo", "group-relative policy optimisation: G sampled answers per prompt scored by checks against reference "
         "answers (or a reward model), clipped ratio, optional k3 KL, no value model", "stage",
         "honelm.stages.grpo:GRPOStage"),
    Verb("test", "evaluate a run's best checkpoint on its test split, once", "command", "honelm.protocol.test:main"),
    Verb("generate", "sample from a causal LM (temperature, top-k, top-p, seed)", "config",
         "honelm.stages.generate:GenerateConfig", "model"),
    Verb("chat", "multi-turn chat with a model in the terminal, through its chat template (/reset, /quit)", "config",
         "honelm.stages.chat:ChatConfig", "model"),
    Verb("export", "write a run's best model as a standalone directory (--merge: LoRA merged into a plain "
         "transformers model; --format onnx [--quantize int8]: a classifier as ONNX, checked and measured on "
         "validation)", "command", "honelm.protocol.deploy:main"),
    Verb("serve", "serve a run's model over HTTP: the OpenAI API (chat, completions, streaming), /v1/classify for "
         "classifiers, batched requests, and a web page to chat or classify", "command", "honelm.serve.main:main"),
    Verb("report", "write report.md and a self-contained report.html for a run, a search, an ablation or a boost",
         "command",
         "honelm.protocol.reports:main"),
    Verb("ls", "list verbs, config presets and recent runs", "command", "honelm.cli:cmd_ls"),
    Verb("demo", "offline end-to-end demo on generated data (tokenizer → pretrain → classify → test → report)",
         "command", "honelm.demo:main"),
    Verb("pipeline", "run the stages of a pipeline YAML in order, chained by named outputs; finished stages are "
         "skipped", "command", "honelm.pipeline:main"),
    Verb("search", "hyperparameter search (Optuna TPE/random/grid, pruning) on validation only; resumable study",
         "command", "honelm.protocol.search:main"),
    Verb("ablate", "boosters vs baseline over seeds, each variant with its own search: mean ± std, paired-bootstrap CI "
         "and verdict on validation, the chosen variant tested once, cost",
         "command", "honelm.protocol.ablate:main"),
    Verb("boost", "try every booster on a classification task (TAPT, DAPT, LoRA, adversarial, plae, distillation), "
         "each with its own search on validation; the best on validation tested once; one report", "command",
         "honelm.protocol.boost:main"),
    Verb("compare", "models side by side on the same sealed test split: test metrics with paired-bootstrap "
         "intervals, parameters, disk size, CPU latency and throughput, peak memory", "command",
         "honelm.protocol.compare:main"),
]}


RUNNER = "honelm.stages.runner:run_stage"
PREFLIGHT = "honelm.preflight:check"


def resolve(target: str | Any) -> Any:
    """The object a \"module:attribute\" name stands for, imported on first use (an object is returned as is)."""
    if not isinstance(target, str):
        return target
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)


def register(entry: Verb) -> None:
    """Add a verb (a plug-in stage, say) to the registry; its name must be new."""
    if entry.name in VERBS:
        raise HonelmError(f"verb '{entry.name}' is already registered")
    VERBS[entry.name] = entry


def unregister(name: str) -> None:
    VERBS.pop(name, None)


def verb(name: str) -> Verb:
    found = VERBS.get(name)
    if found is None:
        raise HonelmError(f"unknown verb '{name}'")
    return found


def has_config(name: str) -> bool:
    """Whether the verb is run with a config (`--config`, `key=value`): stages and config verbs."""
    return name in VERBS and VERBS[name].kind != "command"


def training_verbs() -> list[str]:
    """The verbs that train a run (a Stage)."""
    return [v.name for v in VERBS.values() if v.kind == "stage"]


def stage(name: str) -> Any:
    """The Stage object of a training verb."""
    v = verb(name)
    if v.kind != "stage":
        raise HonelmError(f"'{name}' is not a training stage")
    return resolve(v.target)()


def config_class(name: str) -> type:
    """The config dataclass of a stage or config verb."""
    v = verb(name)
    if v.kind == "stage":
        return resolve(v.target).config
    if v.kind == "config":
        return resolve(v.target)
    raise HonelmError(f"'{name}' takes no config (see honelm {name} --help)")


def command(name: str) -> Any:
    """The `main(argv)` of a command verb."""
    return resolve(verb(name).target)


def run_verb(name: str, cfg: Any, resume: str | None = None, callbacks: Sequence[Any] = (),
             allow_changed_data: bool = False) -> Any:
    """Run a stage (through the runner) or a config verb with a built config; returns its summary.
    `allow_changed_data`: a resumed stage run continues even on inputs that changed (honelm.pins)."""
    v = verb(name)
    if v.kind == "stage":
        return resolve(RUNNER)(stage(name), cfg, resume=resume, callbacks=callbacks,
                               allow_changed_data=allow_changed_data)
    if callbacks:
        raise TypeError(f"honelm {name} trains nothing that callbacks could observe")
    return importlib.import_module(v.module).run(cfg, resume=resume)


def preflight(name: str, cfg: Any) -> list[str]:
    """What `honelm VERB --dry-run` finds wrong with a built config: inputs that do not exist, outputs that cannot be
    written (`honelm.preflight.check`, imported on first use: it loads torch)."""
    return resolve(PREFLIGHT)(cfg, name)


def exit_code(result: Any) -> int:
    """The exit status of a verb that returned `result`: 130 when its run was interrupted (the checkpoint saved)
    or a stop came as the finished run saved itself (nothing after it should start), else 0."""
    if isinstance(result, dict) and (result.get("reason") == "interrupted" or result.get("stop_requested")):
        return 130
    return 0


# ----------------------------------------------------------------------------------------------
# config presets


def config_roots() -> list[Path]:
    roots = [Path.cwd() / "configs", Path(__file__).resolve().parent.parent / "configs"]
    seen, out = set(), []
    for r in roots:
        if r.resolve() not in seen and r.is_dir():
            seen.add(r.resolve())
            out.append(r)
    return out


def presets(name: str) -> list[str]:
    return sorted({p.stem for r in config_roots() for p in (r / name).glob("*.yaml")})


def find_config(name: str, spec: str) -> Path:
    path = Path(spec)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise HonelmError(f"{spec}: no such config file")
        return path
    for root in config_roots():
        candidate = root / name / f"{spec}.yaml"
        if candidate.is_file():
            return candidate
    raise HonelmError(f"no config preset '{spec}' for {name}; presets: {', '.join(presets(name)) or 'none'}")


def build_config(name: str, config: str | None, overrides: list[str], variables: dict[str, str] | None = None) -> Any:
    """The verb's config: defaults < the preset or YAML `config` (its ${vars.NAME} filled from `variables`) <
    `key=value` overrides."""
    path = find_config(name, config) if config else None
    return C.build(config_class(name), path, overrides, variables)
