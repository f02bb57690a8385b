"""Bad inputs and bad config values, counted: does each one end in a clean refusal that loses nothing?

    python benchmarks/bad_inputs.py [--out runs/bench-bad-inputs] [--json results.json] [--only NAME,...]

Issue 23's attacker fed honelm broken data files and out-of-range settings; this script replays that
catalogue and more against the real CLI, one subprocess per case (`python -m honelm VERB ...`), on a tiny
model pre-trained once at the start. Every case names what is due:

- refuse: exit 1, no traceback, and stderr names what is wrong (the key and value, or the file and line);
  the data file is byte-for-byte unchanged, no run directory is left behind and `latest` is not moved;
- warn: exit 0, and the log says the named thing (a near-duplicate label, a tiny class, skipped rows);
- accept: exit 0 (unusual but valid input: CRLF line ends, a byte-order mark, blank lines).

The outcome of each case is one of: as due; traceback (a Python traceback on stderr: always a failure);
silent (exit 0 where a refusal or a warning was due); wrong (refused where it should run, or the
message does not name the thing, or it left files behind). The script prints one row per case and the
totals that docs/benchmarks.md ("Reliability") records. Hand-run, never by CI; about 5-8 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, child_env  # noqa: E402

sys.path.insert(0, str(REPO))
from honelm.demo import generate_data  # noqa: E402

FAST = ["train.precision=fp32", "train.progress=false", "train.tensorboard=false", "train.threads=1",
        "train.max_steps=2", "train.eval_every=2", "train.save_every=2", "train.batch_size=4", "train.log_every=1"]


@dataclass
class Case:
    """One bad (or merely unusual) input: the verb, its data file (written by `make`), extra overrides, what is due."""
    name: str
    verb: str
    due: str  # refuse | warn | accept
    names: tuple[str, ...] = ()  # substrings the error (refuse) or the log (warn) must contain
    make: Callable[[Path, Path], Path] | None = None  # (data dir, case dir) -> the data file; None = the verb's own
    args: tuple[str, ...] = ()
    kind: str = "input"  # input | config


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in items), encoding="utf-8")
    return path


def edited(source: str, edit: Callable[[list[dict]], None]) -> Callable[[Path, Path], Path]:
    """A copy of data/SOURCE with `edit` applied to its rows."""
    def make(data: Path, where: Path) -> Path:
        items = rows(data / source)
        edit(items)
        return write(where / source, items)
    return make


def raw(name: str, content: bytes | Callable[[Path], bytes]) -> Callable[[Path, Path], Path]:
    """A file of exactly these bytes (or bytes computed from the data directory)."""
    def make(data: Path, where: Path) -> Path:
        path = where / name
        path.write_bytes(content(data) if callable(content) else content)
        return path
    return make


def setter(i: int, key: str, value: object) -> Callable[[list[dict]], None]:
    def edit(items: list[dict]) -> None:
        items[i][key] = value
    return edit


def dropper(i: int, key: str) -> Callable[[list[dict]], None]:
    def edit(items: list[dict]) -> None:
        del items[i][key]
    return edit


def both(*edits: Callable[[list[dict]], None]) -> Callable[[list[dict]], None]:
    def edit(items: list[dict]) -> None:
        for e in edits:
            e(items)
    return edit


def one_class(items: list[dict]) -> None:
    for r in items:
        r["label"] = "positive"


def lonely_class(items: list[dict]) -> None:
    items[7]["label"] = "neutral"


def hh_no_shared_prefix(items: list[dict]) -> None:
    items.clear()
    items.extend({"chosen": f"\n\nHuman: question {i}?\n\nAssistant: a good answer {i}",
                  "rejected": f"\n\nHuman: question {i}?\n\nAssistant: a poor answer {i}"} for i in range(40))
    items[5]["rejected"] = "\n\nHuman: something else entirely\n\nAssistant: no"


def kto_rows(label: object) -> Callable[[list[dict]], None]:
    def edit(items: list[dict]) -> None:
        originals = [r for r in items if "prompt" in r]  # the demo mixes in conversation rows: keep prompt rows
        items.clear()
        for r in originals:
            items.append({"prompt": r["prompt"], "completion": r["chosen"], "label": True})
            items.append({"prompt": r["prompt"], "completion": r["rejected"], "label": False})
        items[9]["label"] = label
    return edit


def insert_line(path: Path, index: int, line: bytes) -> bytes:
    lines = path.read_bytes().splitlines(keepends=True)
    return b"".join(lines[:index] + [line + b"\n"] + lines[index:])


def latin1(data: Path) -> bytes:
    text = (data / "reviews.jsonl").read_text(encoding="utf-8").splitlines()
    text[4] = json.dumps({"text": "caf\u00e9 review", "label": "positive"}, ensure_ascii=False)
    return ("\n".join(text) + "\n").encode("latin-1")


def crlf(name: str) -> Callable[[Path], bytes]:
    return lambda data: (data / name).read_bytes().replace(b"\n", b"\r\n")


def bom(name: str) -> Callable[[Path], bytes]:
    return lambda data: b"\xef\xbb\xbf" + (data / name).read_bytes()


def blank_lines(data: Path) -> bytes:
    return (data / "reviews.jsonl").read_bytes().replace(b"\n", b"\n\n", 10)


def scores(bad_index: int, bad_value: bytes) -> bytes:
    """A regression file of 40 rows (scores 0..4) whose row `bad_index` has the label `bad_value` (raw JSON)."""
    return b"".join(b'{"text": "review %d", "label": %s}\n' % (i, bad_value if i == bad_index else b"%d" % (i % 5))
                    for i in range(40))


def tsv_extra_column(data: Path) -> bytes:
    lines = ["text\tlabel"] + [f"{r['text']}\t{r['label']}" for r in rows(data / "reviews.jsonl")]
    lines[5] += "\tsurplus"
    return ("\n".join(lines) + "\n").encode()


def csv_missing_column(data: Path) -> bytes:
    lines = ["text,label"] + [f"\"{r['text']}\",{r['label']}" for r in rows(data / "reviews.jsonl")]
    lines[12] = f"\"{rows(data / 'reviews.jsonl')[11]['text']}\""
    return ("\n".join(lines) + "\n").encode()


def input_cases() -> list[Case]:
    """Data files that are broken, or unusual and valid; each verb reads its own kind."""
    c: list[Case] = []
    add = c.append
    rv, ins, pref, ari = "reviews.jsonl", "instructions.jsonl", "preferences.jsonl", "arithmetic_prompts.jsonl"
    add(Case("missing file", "classify", "refuse", ("nope.jsonl",), raw("nope.jsonl", b"")))  # removed below
    add(Case("empty file", "classify", "refuse", ("empty.jsonl",), raw("empty.jsonl", b"")))
    add(Case("whitespace-only file", "classify", "refuse", ("blank.jsonl",), raw("blank.jsonl", b"\n \n\n")))
    add(Case("directory without data files", "classify", "refuse", ("nodata",),
             lambda d, w: (w / "nodata").mkdir() or (w / "nodata")))
    add(Case("invalid JSON line", "classify", "refuse", ("bad.jsonl:6",),
             raw("bad.jsonl", lambda d: insert_line(d / rv, 5, b"{not json"))))
    add(Case("label field missing in one row", "classify", "refuse", (f"{rv}:21", "label"), edited(rv, dropper(20, "label"))))
    add(Case("two bad rows listed together", "classify", "refuse", ("2 bad rows", f"{rv}:4", f"{rv}:31"),
             edited(rv, both(setter(3, "text", ""), dropper(30, "label")))))
    add(Case("empty text", "classify", "refuse", (f"{rv}:4", "text"), edited(rv, setter(3, "text", ""))))
    add(Case("NUL byte in text", "classify", "refuse", (f"{rv}:11", "NUL"), edited(rv, setter(10, "text", "a \u0000 b"))))
    add(Case("label null", "classify", "refuse", (f"{rv}:6", "label"), edited(rv, setter(5, "label", None))))
    add(Case("label a float in classification", "classify", "refuse", (f"{rv}:6", "label"), edited(rv, setter(5, "label", 1.5))))
    add(Case("text is a number", "classify", "refuse", (f"{rv}:3", "text"), edited(rv, setter(2, "text", 42))))
    add(Case("text is a list", "classify", "refuse", (f"{rv}:3", "text"), edited(rv, setter(2, "text", ["a", "b"]))))
    add(Case("not UTF-8 (latin-1 bytes)", "classify", "refuse", ("latin.jsonl", "UTF-8"), raw("latin.jsonl", latin1)))
    add(Case("binary garbage", "classify", "refuse", ("garbage.jsonl",), raw("garbage.jsonl", bytes(range(256)) * 8)))
    add(Case("text field named wrongly", "classify", "refuse", ("data.text_field", "body"), args=("data.text_field=body",)))
    add(Case("label field = the text field", "classify", "refuse", ("data.label_field",), args=("data.label_field=text",)))
    add(Case("one class only", "classify", "refuse", ("class",), edited(rv, one_class)))
    add(Case("regression label not a number", "classify", "refuse", ("scores.jsonl:8", "label"),
             raw("scores.jsonl", scores(7, b'"abc"')), ("data.task=regression",)))
    add(Case("regression label NaN", "classify", "refuse", ("scores.jsonl:3", "label"),
             raw("scores.jsonl", scores(2, b"NaN")), ("data.task=regression",)))
    add(Case("regression label infinite", "classify", "refuse", ("scores.jsonl:3", "label"),
             raw("scores.jsonl", scores(2, b"1e999")), ("data.task=regression",)))
    add(Case("CSV row missing a column", "classify", "refuse", ("reviews.csv:13",), raw("reviews.csv", csv_missing_column)))
    add(Case("label with a stray space", "classify", "warn", ("positive ",), edited(rv, setter(9, "label", "positive "))))
    add(Case("label differing in case", "classify", "warn", ("Positive",), edited(rv, setter(9, "label", "Positive"))))
    add(Case("a class with one example", "classify", "warn", ("neutral",), edited(rv, lonely_class)))
    add(Case("bad rows skipped when asked", "classify", "warn", ("2",),
             edited(rv, both(setter(3, "text", ""), dropper(30, "label"))), ("data.skip_bad_rows=true",)))
    add(Case("CRLF line ends", "classify", "accept", (), raw("crlf.jsonl", crlf(rv))))
    add(Case("UTF-8 byte-order mark", "classify", "accept", (), raw("bom.jsonl", bom(rv))))
    add(Case("blank lines between rows", "classify", "accept", (), raw("gaps.jsonl", blank_lines)))
    # instruction tuning
    add(Case("sft: output missing", "sft", "refuse", (f"{ins}:5",), edited(ins, dropper(4, "output"))))
    add(Case("sft: output empty", "sft", "refuse", (f"{ins}:5",), edited(ins, setter(4, "output", ""))))
    add(Case("sft: messages with an unknown role", "sft", "refuse", ("msgs.jsonl:2", "role"),
             raw("msgs.jsonl", b"".join(b'{"messages": [{"role": "%s", "content": "hi %d"}, {"role": "assistant", "content": "yo"}]}\n'
                                        % (b"wizard" if i == 1 else b"user", i) for i in range(30)))))
    add(Case("sft: CRLF line ends", "sft", "accept", (), raw("crlf.jsonl", crlf(ins))))
    # preferences
    add(Case("dpo: rejected missing", "dpo", "refuse", (f"{pref}:3", "rejected"), edited(pref, dropper(2, "rejected"))))
    add(Case("dpo: chosen is a number", "dpo", "refuse", (f"{pref}:3", "chosen"), edited(pref, setter(2, "chosen", 3))))
    add(Case("dpo: hh-rlhf dialogues that share no prompt", "dpo", "refuse", (f"{pref}:6",), edited(pref, hh_no_shared_prefix)))
    add(Case("kto: label not a boolean", "dpo", "refuse", (f"{pref}:10", "label"), edited(pref, kto_rows("maybe")),
             ("dpo.loss=kto",)))
    # GRPO prompts and rewards
    add(Case("grpo: answer missing for the numeric check", "grpo", "refuse", (f"{ari}:4", "answer"),
             edited(ari, dropper(3, "answer"))))
    add(Case("grpo: python checker that does not exist", "grpo", "refuse", ("no_such_module",),
             args=("reward.function=python:no_such_module:check",)))
    add(Case("grpo: unknown check name", "grpo", "refuse", ("nonsense",), args=("reward.checks=[nonsense:3]",)))
    # the other verbs that read data: reward (preference pairs), adapt (domain and task text), distill (a teacher)
    add(Case("reward: chosen missing", "reward", "refuse", (f"{pref}:4", "chosen"), edited(pref, dropper(3, "chosen"))))
    add(Case("adapt: NUL bytes in the domain text", "adapt", "refuse", ("nul.txt:3", "NUL"),
             raw("nul.txt", b"first line\nsecond line\nthird \x00 line\n" + b"more text here\n" * 50)))
    add(Case("adapt: task file missing its text field", "adapt", "refuse", ("task.text_field", "body"),
             args=("task.text_field=body", f"task.train={{data}}/{rv}")))
    add(Case("distill: teacher that does not exist", "distill", "refuse", ("teacher.model", "no/such/teacher"),
             args=("teacher.model=no/such/teacher",)))
    add(Case("distill: teacher with pickle weights only", "distill", "refuse", ("allow_pickle",),
             args=("teacher.model={pickled}",)))
    add(Case("classify: init model that does not exist", "classify", "refuse", ("model.init_from", "no/such/run"),
             args=("model.init_from=no/such/run",)))
    add(Case("classify: TSV row with an extra column", "classify", "refuse", ("reviews.tsv:6",),
             raw("reviews.tsv", lambda d: tsv_extra_column(d))))
    add(Case("classify: validation label never seen in train", "classify", "refuse", ("val.jsonl", "'neutral'"),
             args=("data.val={out}/val.jsonl",)))
    add(Case("classify: a JSON array instead of JSON lines", "classify", "accept", (),
             raw("reviews.json", lambda d: json.dumps(rows(d / rv)).encode())))
    # pre-training corpora
    add(Case("pretrain: empty corpus", "pretrain", "refuse", ("empty.txt",), raw("empty.txt", b"")))
    add(Case("pretrain: NUL bytes in the corpus", "pretrain", "refuse", ("nul.txt:3", "NUL"),
             raw("nul.txt", b"first line\nsecond line\nthird \x00 line\n" + b"more text here\n" * 50)))
    return c


CONFIG_VALUES = [  # (verb, override): the error must name the override's key
    ("classify", "train.batch_size=0"), ("classify", "train.batch_size=-4"), ("classify", "train.grad_accum=0"),
    ("classify", "train.lr=-0.001"), ("classify", "model.dropout=2"), ("classify", "train.adam_beta2=1.5"),
    ("classify", "data.split=9:1"), ("classify", "data.split=0:0:1"), ("classify", "data.split=a:b:c"),
    ("classify", "data.split=9:-1:2"), ("classify", "data.split=9:0:1"), ("classify", "data.max_length=0"),
    ("classify", "train.max_steps=-5"), ("classify", "train.epochs=0"), ("classify", "train.epochs=-1"),
    ("classify", "train.warmup_ratio=2"), ("classify", "train.eval_every=-1"), ("classify", "data.near_dup_threshold=0"),
    ("classify", "lora.r=0"), ("classify", "lora.dropout=1.5"), ("classify", "train.precision=fp8"),
    ("classify", "train.schedule=sawtooth"), ("classify", "train.lrr=1e-3"), ("classify", "train.batch_size=abc"),
    ("classify", "adversarial.method=fgsm"), ("classify", "adversarial.epsilon=-1"), ("classify", "train.grad_clip=-1"),
    ("classify", "run.seed=-3"), ("classify", "train.threads=0.5"),
    ("dpo", "dpo.beta=0"), ("dpo", "dpo.label_smoothing=0.7"), ("dpo", "dpo.loss=ppo"),
    ("grpo", "grpo.group_size=1"), ("grpo", "grpo.clip=-0.1"), ("grpo", "grpo.temperature=-1"),
    ("grpo", "grpo.kl_coef=-0.5"), ("sft", "data.max_length=-1"), ("pretrain", "data.block_size=0"),
]


def config_cases() -> list[Case]:
    cases = [Case(f"{verb}: {override}", verb, "refuse", (override.split("=", 1)[0],), args=(override,), kind="config")
             for verb, override in CONFIG_VALUES]
    cases.append(Case("config file that does not exist", "classify", "refuse", ("nowhere.yaml",),
                      args=("--config", "nowhere.yaml"), kind="config"))
    cases.append(Case("config file with a YAML syntax error", "classify", "refuse", ("broken.yaml", "line 3"),
                      args=("--config", "{out}/broken.yaml"), kind="config"))
    cases.append(Case("config file with an unknown section", "classify", "refuse", ("trian",),
                      args=("--config", "{out}/typo.yaml"), kind="config"))
    return cases


DEFAULT_DATA = {"classify": "reviews.jsonl", "sft": "instructions.jsonl", "dpo": "preferences.jsonl",
                "grpo": "arithmetic_prompts.jsonl", "pretrain": "corpus.txt", "reward": "preferences.jsonl",
                "adapt": "corpus.txt", "distill": "reviews.jsonl"}


def base_args(verb: str, pre: Path) -> list[str]:
    if verb == "pretrain":
        return ["model.size=test", "model.vocab_size=300", "data.block_size=32", *FAST]
    extra = {"grpo": ["reward.function=numeric", "grpo.group_size=2", "grpo.prompts_per_rollout=2",
                      "grpo.response_length=4", "train.grad_accum=1"],
             "sft": ["data.max_length=64"], "dpo": ["data.max_length=64"], "reward": ["data.max_length=64"],
             "adapt": ["data.block_size=32"],
             "distill": [f"teacher.model={pre.parent / 'teacher'}", "data.max_length=32"]}.get(verb, [])
    if verb == "distill":  # a from-scratch student with the teacher's tokenizer
        return ["model.size=test", f"model.tokenizer={pre}", *FAST, *extra]
    return [f"model.init_from={pre}", *FAST, *extra]


def honelm(args: list[str], cwd: Path | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """`python -m honelm ARGS` in its own process, offline and on one thread, its output captured."""
    return subprocess.run([sys.executable, "-m", "honelm", *args], cwd=cwd, capture_output=True, text=True,
                          check=check, timeout=600, env=child_env(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))


def digest(path: Path) -> str:
    if not path.exists():
        return "absent"
    if path.is_dir():
        return "dir:" + ",".join(sorted(p.name for p in path.iterdir()))
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Outcome:
    name: str
    kind: str
    due: str
    result: str
    detail: str = ""
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def judge(case: Case, proc: subprocess.CompletedProcess, log: str, left_behind: bool, data_changed: bool,
          latest_moved: bool) -> tuple[str, str]:
    """The outcome of one case and the line that shows it."""
    err = proc.stderr.strip()
    last = err.splitlines()[-1] if err else ""
    if "Traceback (most recent call last)" in proc.stderr:
        return "traceback", last[:160]
    if case.due == "refuse":
        if proc.returncode == 0:
            return "silent", "exit 0"
        missing = [n for n in case.names if n not in err]
        if missing:
            return "wrong", f"message lacks {missing}: {err[-300:]}"
        if left_behind or data_changed or latest_moved:
            return "wrong", f"left files={left_behind} data changed={data_changed} latest moved={latest_moved}"
        first = next((line for line in err.splitlines() if "error:" in line), last)
        return "as due", first[:200]
    if proc.returncode != 0:
        return "wrong", f"exit {proc.returncode}: {last[:200]}"
    if case.due == "warn":
        text = proc.stderr + log
        missing = [n for n in case.names if n not in text]
        if missing:
            return "silent", f"no word of {missing}"
        hit = next((line for line in text.splitlines() if all(n in line for n in case.names)), "")
        return "as due", hit.strip()[:200]
    return "as due", "exit 0"


def run_case(case: Case, index: int, out: Path, data: Path, pre: Path) -> Outcome:
    where = out / "cases" / f"{index:02d}"
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    path = case.make(data, where) if case.make else data / DEFAULT_DATA[case.verb]
    if case.name == "missing file":
        path.unlink()
    before = digest(path)
    runs = where / "runs"
    runs.mkdir()
    (runs / "earlier").mkdir()
    (runs / "latest").symlink_to("earlier")
    places = {"data": str(data), "out": str(out), "pickled": str(out / "pickled")}
    args = [case.verb, *base_args(case.verb, pre), f"data.train={path}", f"run.out_dir={runs}", "run.name=case",
            *(a.format(**places) for a in case.args)]  # a case's own key=value comes last, and the last one wins
    start = time.perf_counter()
    proc = honelm(args, cwd=where)
    seconds = time.perf_counter() - start
    log = (runs / "case" / "log.txt").read_text(encoding="utf-8") if (runs / "case" / "log.txt").exists() else ""
    left = (runs / "case").exists() and any((runs / "case").iterdir())
    moved = os.readlink(runs / "latest") != "earlier" if (runs / "latest").is_symlink() else True
    result, detail = judge(case, proc, log, left, digest(path) != before, moved)
    return Outcome(case.name, case.kind, case.due, result, detail, round(seconds, 1),
                   {"rc": proc.returncode, "stderr_tail": proc.stderr[-600:]})


def prepare(out: Path) -> tuple[Path, Path]:
    """The demo data (honelm.demo.generate_data, seed 1), a tiny decoder pre-trained on it for 8 steps, a classifier
    from it (the distill cases' teacher) and a pickle-only copy of that classifier, and the files some cases name:
    a broken and a mistyped config, a validation file with a label train never has."""
    data = out / "data"
    if not (data / "reviews.jsonl").is_file():
        generate_data(data, n_corpus=400, n_labelled=80, seed=1, n_instructions=80, n_preferences=80)
    pre = out / "pre"
    if not (pre / "best").is_dir():
        shutil.rmtree(pre, ignore_errors=True)
        args = ["pretrain", f"data.train={data / 'corpus.txt'}", "model.size=test", "model.vocab_size=300",
                "data.block_size=32", f"run.out_dir={out}", "run.name=pre",
                *[a for a in FAST if not a.startswith("train.max_steps")], "train.max_steps=8"]
        honelm(args, check=True)
    teacher = out / "teacher"
    if not (teacher / "best").is_dir():  # a classifier for the distill cases: 4 steps from the pre-trained model
        shutil.rmtree(teacher, ignore_errors=True)
        args = ["classify", f"model.init_from={pre}", f"data.train={data / 'reviews.jsonl'}", f"run.out_dir={out}",
                "run.name=teacher", *FAST]
        honelm(args, check=True)
    (out / "broken.yaml").write_text("train:\n  lr: 1e-3\n  batch_size: [4\n", encoding="utf-8")
    (out / "typo.yaml").write_text("trian:\n  lr: 1e-3\n", encoding="utf-8")
    write(out / "val.jsonl", [{"text": f"an unseen kind of review {i}", "label": "neutral"} for i in range(8)])
    pickled = out / "pickled"
    if not pickled.is_dir():  # the teacher's weights as pytorch_model.bin only (torch.save of the state dict)
        shutil.copytree(teacher / "best", pickled)
        from safetensors.torch import load_file
        import torch
        torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
        (pickled / "model.safetensors").unlink()
    return data, pre


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench-bad-inputs")
    parser.add_argument("--json", default="")
    parser.add_argument("--only", default="", help="comma-separated case names (substring match)")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data, pre = prepare(out)
    cases = input_cases() + config_cases()
    if args.only:
        wanted = [w.strip() for w in args.only.split(",")]
        cases = [c for c in cases if any(w in c.name for w in wanted)]
    outcomes = []
    for i, case in enumerate(cases):
        o = run_case(case, i, out, data, pre)
        outcomes.append(o)
        print(f"{o.kind:6} {o.due:6} {o.result:9} {o.seconds:5.1f}s  {o.name}: {o.detail}", flush=True)
    print()
    for kind in ("input", "config"):
        mine = [o for o in outcomes if o.kind == kind]
        good = sum(o.result == "as due" for o in mine)
        tracebacks = sum(o.result == "traceback" for o in mine)
        refused = sum(o.due == "refuse" and o.result == "as due" for o in mine)
        print(f"{kind}: {good}/{len(mine)} as due ({refused} refused cleanly of {sum(o.due == 'refuse' for o in mine)} "
              f"due a refusal), {tracebacks} tracebacks")
    if args.json:
        Path(args.json).write_text(json.dumps([o.__dict__ for o in outcomes], indent=1), encoding="utf-8")
    return 0 if all(o.result == "as due" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
