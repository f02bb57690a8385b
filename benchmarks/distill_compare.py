"""Teacher vs distilled student vs the same student without a teacher, on one sealed test split.

    python benchmarks/distill_compare.py --task sst2 --teacher RUN [--out runs/bench-distill/sst2]
    python benchmarks/distill_compare.py --task chemprot [--teacher RUN]   # the DAPT+TAPT MiniLM classifier
    python benchmarks/distill_compare.py --task chemprot --teacher RUN --pretrain-student 4000  # a pre-trained student

Hand-run and resumable (a finished step is skipped); never run by CI. Every step goes through the
real CLI (`honelm.cli.main`), as a user would type it:

1. the teacher: `--teacher RUN`, a finished `classify` run on the task's data settings. Without `--teacher`
   it is trained here: SST-2, `honelm classify --config sst2-minilm data.dedup=true`; ChemProt, the
   DAPT+TAPT MiniLM of configs/ablate/chemprot-minilm.yaml (its `dapt+tapt` variant at the file's
   settings, read from the file: `honelm adapt --config chemprot-dapt`, then `chemprot-tapt` from it, then
   `honelm classify` from that; OUT/teacher-dapt, OUT/teacher-tapt, OUT/teacher).
2. the student: `honelm distill --config <task preset>` (a ~1.9M-parameter encoder from scratch,
   WordPiece trained on the transfer text; ChemProt adds the PubMed abstracts as `data.unlabelled`);
   With `--pretrain-student STEPS` the student starts pre-trained instead: `honelm tokenizer` (WordPiece, 8,000)
   and `honelm adapt` (a masked LM from scratch, the same `tiny` encoder, STEPS steps) on the task's domain text
   (ChemProt: the PubMed and BC5CDR abstracts and the train sentences, never validation or test), then
   `model.init_from=` that run for the student and the control alike. Not for SST-2: its presets split validation
   off train.tsv inside the run, so pre-training on train.tsv would show the student its validation sentences;
3. the control: the same student, same data settings, same steps, `honelm classify` without a teacher;
4. `honelm test` on each (each run's one look; the teacher's earlier look is reused);
5. `honelm compare TEACHER STUDENT CONTROL`: metric with paired-bootstrap intervals, parameters,
   disk size, CPU latency at batch 1 and throughput at batch 32, peak memory, and the one line.

Numbers are recorded in docs/benchmarks.md with the command that produced them. Needs
../shared/data (skips with a message when absent).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from honelm import cli
from honelm.pipeline import run_finished

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data"

TASKS = {
    "sst2": {"data": DATA / "sst2", "teacher_config": "sst2-minilm", "student_config": "sst2-tiny",
             "teacher_set": ["data.dedup=true"], "unlabelled": ""},
    "chemprot": {"data": DATA / "biomed-chemprot", "teacher_config": "", "student_config": "chemprot-tiny",
                 "teacher_set": [], "unlabelled": str(DATA / "biomed-chemprot" / "corpus" / "pubmed_abstracts_1MB.txt")},
}


def domain_text(path: Path) -> Path:
    """ChemProt's student pre-training text, one document per line: text the task may use without labels (the
    domain corpus and the train split's sentences; never validation or test)."""
    data = TASKS["chemprot"]["data"]
    lines = (data / "corpus" / "pubmed_abstracts_1MB.txt").read_text(encoding="utf-8").splitlines()
    tsv = data / "corpus" / "bc5cdr_abstracts.tsv"
    for number, row in enumerate(tsv.read_text(encoding="utf-8").splitlines(), 1):
        if "\t" not in row:
            sys.exit(f"{tsv}:{number}: expected pmid<TAB>title and abstract, found no tab")
        lines.append(row.split("\t", 1)[1])
    lines += [json.loads(x)["text"] for x in (data / "chemprot" / "train.jsonl").read_text(encoding="utf-8")
              .splitlines()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(x.strip() for x in lines if x.strip()) + "\n", encoding="utf-8")
    return path


def pretrained_student(out: Path, steps: int) -> Path:
    """OUT/student-pretrain: a masked LM from scratch (the student presets' `tiny` encoder) on the task's domain
    text, with its own WordPiece tokenizer; the student and the control start from it."""
    tokenizer, mlm = out / "student-tokenizer", out / "student-pretrain"
    corpus = out / "student_corpus.txt"
    if finished(mlm):
        return mlm
    if not corpus.is_file():
        domain_text(corpus)
    if not (tokenizer / "tokenizer").is_dir():
        run("tokenizer", f"data.train={corpus}", "tokenizer.kind=wordpiece", "tokenizer.vocab_size=8000",
            "data.split=95:5:0", f"run.out_dir={out}", "run.name=student-tokenizer")
    if (mlm / "checkpoints").is_dir():
        run("adapt", "--resume", str(mlm))
    else:
        run("adapt", f"data.train={corpus}", "data.split=95:5:0", "model.arch=encoder", "model.size=tiny",
            "model.max_positions=512", f"model.tokenizer={tokenizer}", "model.dropout=0.1", "data.block_size=128",
            "train.batch_size=32", "train.lr=1e-3", f"train.max_steps={steps}", "train.warmup_ratio=0.06",
            "train.schedule=linear", "train.weight_decay=0.01", "train.eval_every=500", "train.save_every=500",
            "train.log_every=100", f"run.out_dir={out}", "run.name=student-pretrain")
    return mlm


def chemprot_teacher(out: Path, data: Path) -> Path:
    """OUT/teacher: the `dapt+tapt` variant of configs/ablate/chemprot-minilm.yaml at the file's settings (no
    search), seed 0: its shared adapt stages in order, each from the one before, then its classify stage from the
    last. The settings are read from the ablation file, so the teacher is the one its ablation trains."""
    spec = yaml.safe_load((REPO / "configs" / "ablate" / "chemprot-minilm.yaml").read_text(encoding="utf-8"))
    done: dict[str, str] = {}

    def resolve(value: object) -> str:
        text = str(value).replace("${vars.data}", str(data))
        for name, path in done.items():
            text = text.replace("${" + name + "}", path)
        return text

    def stage(verb: str, name: str, words: list[str]) -> Path:
        run_dir = out / name
        if not finished(run_dir):
            run(verb, *(["--resume", str(run_dir)] if (run_dir / "checkpoints").is_dir()
                        else [*words, f"run.out_dir={out}", f"run.name={name}"]))
        return run_dir

    variant = spec["variants"]["dapt+tapt"]
    for before in variant["before"]:
        words = ["--config", before["config"], *(resolve(a) for a in before.get("args", [])),
                 *(f"{k}={resolve(v)}" for k, v in before.get("set", {}).items()), "run.seed=0"]
        done[before["name"]] = str(stage(before["verb"], f"teacher-{before['name']}", words))
    (classify,) = spec["stages"]
    settings = {**classify["set"], **variant["set"]}
    return stage(classify["verb"], "teacher", [*(f"{k}={resolve(v)}" for k, v in settings.items()), "run.seed=0"])


def run(*words: str) -> None:
    print(f"\n$ honelm {' '.join(words)}", flush=True)
    code = cli.main(list(words))
    if code != 0:
        sys.exit(f"step failed ({code}): honelm {' '.join(words)}")


def finished(run_dir: Path) -> bool:
    """The run ended for a reason other than an interruption (an interrupted run has best/ and an `end` event too,
    and must be resumed, not used) and holds its best model."""
    return (run_dir / "best" / "best.json").is_file() and run_finished(run_dir)


def tested(run_dir: Path) -> bool:
    return (run_dir / "test_metrics.json").is_file()


def control_config(name: str, out: Path) -> Path:
    """The student's distill preset as a classify config: the same data, model and training, no teacher."""
    cfg = yaml.safe_load((REPO / "configs" / "distill" / f"{name}.yaml").read_text(encoding="utf-8"))
    for key in ("teacher", "distill", "augment"):
        cfg.pop(key, None)
    cfg.get("data", {}).pop("unlabelled", None)
    path = out / "control.yaml"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def curves(out: Path, runs: dict[str, Path], teacher: Path) -> Path:
    """OUT/curves.png: validation accuracy (and train loss) over steps of the student and the control, with the
    teacher's best validation accuracy as a line: where each stops improving, and how far validation overshoots test."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, run in runs.items():
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        ev = [r for r in rows if r["event"] == "eval"]
        tr = [r for r in rows if r["event"] == "train"]
        test = json.loads((run / "test_metrics.json").read_text()).get("test_accuracy") if tested(run) else None
        line, = left.plot([r["step"] for r in ev], [r["val_accuracy"] for r in ev], marker="o", ms=3,
                          label=f"{name} (validation)")
        if test is not None:
            left.axhline(test, ls=":", color=line.get_color(), label=f"{name} (test, one look) {test:.3f}")
        right.plot([r["step"] for r in tr], [r["loss"] for r in tr], label=name)
    best = json.loads((teacher / "best" / "best.json").read_text())["val_accuracy"]
    left.axhline(best, color="black", lw=1, label=f"teacher (validation) {best:.3f}")
    left.set(xlabel="step", ylabel="accuracy", title="validation accuracy")
    right.set(xlabel="step", ylabel="train loss", title="training loss (KD for the student, CE for the control)")
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=110)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=sorted(TASKS), default="sst2")
    p.add_argument("--teacher", default="", help="a finished classify run on the task (else trained here)")
    p.add_argument("--out", default="", help="output directory (default runs/bench-distill/TASK)")
    p.add_argument("--set", nargs="*", default=[], help="extra key=value for the student and the control alike")
    p.add_argument("--rounds", type=int, default=5, help="timing rounds of honelm compare")
    p.add_argument("--pretrain-student", type=int, default=0, metavar="STEPS",
                   help="start the student and the control from a masked LM pre-trained from scratch for STEPS "
                        "steps on the task's domain text (chemprot only; 0: from random init, the presets' default)")
    args = p.parse_args(argv)
    task = TASKS[args.task]
    if args.pretrain_student and args.task != "chemprot":  # refused before anything trains
        sys.exit(f"--pretrain-student is for --task chemprot: {args.task}'s presets split validation off their train "
                 "file inside the run, so pre-training on that file would show the student its validation sentences")
    if not task["data"].is_dir():
        print(f"skipped: {task['data']} is absent (see ../shared/data/README.md)")
        return
    data = ["--var", f"data={task['data']}"]  # where the presets' ${vars.data} is (docs/presets.md)
    out = Path(args.out or f"runs/bench-distill/{args.task}")
    teacher = Path(args.teacher) if args.teacher else out / "teacher"
    if not args.teacher and args.task == "chemprot":
        teacher = chemprot_teacher(out, task["data"])
    elif not args.teacher and not finished(teacher):
        run("classify", "--config", task["teacher_config"], *task["teacher_set"], f"run.out_dir={out}",
            "run.name=teacher", *(["--resume", str(teacher)] if (teacher / "checkpoints").is_dir() else data))
    student, control = out / "student", out / "control"
    if args.pretrain_student:
        args.set = [f"model.init_from={pretrained_student(out, args.pretrain_student)}", *args.set]
    common = [*(f"data.unlabelled={task['unlabelled']}",) * bool(task["unlabelled"]), *args.set]
    if not finished(student):
        resume = ["--resume", str(student)] if (student / "checkpoints").is_dir() else data
        run("distill", "--config", task["student_config"], f"teacher.model={teacher}", f"run.out_dir={out}",
            "run.name=student", *common, *resume)
    if not finished(control):
        # the same student settings through classify: the distill preset minus what only distill has
        resume = ["--resume", str(control)] if (control / "checkpoints").is_dir() else data
        run("classify", "--config", str(control_config(task["student_config"], out)), f"run.out_dir={out}",
            "run.name=control", *[s for s in args.set if not s.startswith(("distill.", "augment.", "teacher."))],
            *resume)
    for r in (teacher, student, control):
        if not tested(r):
            run("test", str(r))
    if not (out / "compare" / "compare.json").is_file():
        run("compare", str(teacher), str(student), str(control), "--out", str(out / "compare"), "--rounds",
            str(args.rounds))
    print(f"learning curves: {curves(out, {'student': student, 'control': control}, teacher)}")


if __name__ == "__main__":
    main()
