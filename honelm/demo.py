"""`honelm demo`: the whole foundation path, offline, on data honelm generates itself.

1. generate a small synthetic review language: an unlabelled corpus and a labelled sentiment set
   whose labels depend on word order (negation, contrast), so a bag of words is not enough;
2. train a byte-level BPE tokenizer; 3. pre-train a tiny Llama-style decoder;
4. fine-tune a classifier from the pre-trained model and, for comparison, from random init;
5. test both once; 6. write the reports; distil the fine-tuned classifier into a student a quarter
   of its width, train the same student without a teacher, test both once and compare the three
   (quality with intervals, parameters, size, latency, throughput);
7. search the classifier's learning rate and batch size on validation (a few Optuna trials), test
   the winner once; 8. `honelm boost` (configs/boost/demo.yaml): baseline vs +LoRA vs +FGM, each with
   its own small search (LoRA's learning-rate range reaching 10x higher, FGM's epsilon relative to the
   embeddings), over 2 seeds, paired-bootstrap intervals and verdicts on validation, the variant with
   the best validation mean tested once, and an HTML report (the project's test ledger counts every
   look at the test split).

Every step runs through the real CLI (`honelm.cli.main`), exactly as a user would type it.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Callable

from honelm import cli, registry

SUBJECTS = ["the film", "this movie", "the story", "the acting", "the soundtrack", "the ending", "the director's new work",
            "the cast", "the script", "the second half", "this documentary", "the sequel", "the camera work", "the dialogue"]
POSITIVE = ["wonderful", "moving", "brilliant", "charming", "gripping", "delightful", "superb", "clever", "beautiful",
            "touching", "fresh", "funny"]
NEGATIVE = ["dull", "clumsy", "boring", "tedious", "awful", "messy", "bland", "forgettable", "shallow", "predictable",
            "painful", "lifeless"]
INTENSIFIERS = ["", "", "truly ", "quite ", "really ", "surprisingly ", "rather ", "genuinely "]
FILLERS = ["i watched it on a rainy sunday .", "my friend recommended it to me .", "it runs about two hours .",
           "the theatre was half empty .", "i went in knowing nothing about it .", "it was released last spring .",
           "we saw the late show .", "the trailer gave little away ."]
CONTRAST = ["but", "although", "even though"]


def _clause(rng: random.Random, positive: bool) -> str:
    words = POSITIVE if positive else NEGATIVE
    subject = rng.choice(SUBJECTS)
    if rng.random() < 0.25:  # negation flips the surface word's polarity
        other = NEGATIVE if positive else POSITIVE
        return f"{subject} was not {rng.choice(other)}"
    return f"{subject} was {rng.choice(INTENSIFIERS)}{rng.choice(words)}"


def review(rng: random.Random, positive: bool) -> str:
    """One review; its overall sentiment is that of the main (final) clause."""
    parts = []
    if rng.random() < 0.5:
        parts.append(rng.choice(FILLERS))
    if rng.random() < 0.4:  # a contrasting clause first, then the verdict
        parts.append(f"{_clause(rng, not positive)} , {rng.choice(CONTRAST)} overall {_clause(rng, positive)} .")
    else:
        parts.append(f"{_clause(rng, positive)} .")
        if rng.random() < 0.5:
            parts.append(f"{_clause(rng, positive)} too .")
    return " ".join(parts)


def instruction_rows(n: int, seed: int = 0) -> list[dict]:
    """Instruction-tuning rows in the review language, in two formats (detected per row by `honelm sft`).

    alpaca rows ask for a review's sentiment (a one-word reference answer: exact match and token
    F1 mean something) or for a new review of a given sentiment; messages rows (with a system
    prompt) ask for the sentiment, then for a review of the opposite sentiment (two assistant turns).
    """
    rng = random.Random(f"instructions-{seed}")  # its own stream: corpus.txt and reviews.jsonl do not change
    rows: list[dict] = []
    for _ in range(n):
        positive = rng.random() < 0.5
        label = "positive" if positive else "negative"
        other = "negative" if positive else "positive"
        kind = rng.random()
        if kind < 0.45:
            rows.append({"instruction": "is this review positive or negative ?", "input": review(rng, positive),
                         "output": label})
        elif kind < 0.75:
            rows.append({"instruction": f"write a short {label} review of a film .", "input": "",
                         "output": review(rng, positive)})
        else:
            rows.append({"messages": [
                {"role": "system", "content": "you answer questions about film reviews ."},
                {"role": "user", "content": f"what is the sentiment of this review ? {review(rng, positive)}"},
                {"role": "assistant", "content": label},
                {"role": "user", "content": f"now write a {other} one ."},
                {"role": "assistant", "content": review(rng, not positive)}]})
    return rows


ASKS = ["what did you think of {s} ?", "how was {s} ?", "tell me about {s} .", "give me your verdict on {s} .",
        "write a short review of {s} .", "would you recommend {s} ?"]


def preference_rows(n: int, seed: int = 0) -> list[dict]:
    """Preference pairs in the review language for `honelm reward` / `honelm dpo`, separable by design.

    The prompt asks about a subject (after an optional filler sentence); the chosen reply is a
    positive review of that subject, the rejected one a negative review of it, built the same way
    (same length distribution, no negation), so a reward model can reach near-perfect accuracy.
    One row in five uses the ShareGPT ranking form ({conversations, chosen, rejected}).
    """
    rng = random.Random(f"preferences-{seed}")  # its own stream: the other files do not change

    def reply(subject: str, positive: bool) -> str:
        words = POSITIVE if positive else NEGATIVE
        text = f"{subject} was {rng.choice(INTENSIFIERS)}{rng.choice(words)} ."
        if rng.random() < 0.5:
            text += f" {rng.choice(SUBJECTS)} was {rng.choice(words)} too ."
        return text

    rows: list[dict] = []
    for _ in range(n):
        subject = rng.choice(SUBJECTS)
        prompt = rng.choice(ASKS).format(s=subject)
        if rng.random() < 0.5:
            prompt = f"{rng.choice(FILLERS)} {prompt}"
        chosen, rejected = reply(subject, True), reply(subject, False)
        if rng.random() < 0.2:
            rows.append({"conversations": [{"from": "human", "value": prompt}],
                         "chosen": {"from": "gpt", "value": chosen}, "rejected": {"from": "gpt", "value": rejected}})
        else:
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def arithmetic_data(n_sft: int = 6000, n_prompts: int = 2000, seed: int = 0) -> tuple[list[str], list[dict], list[dict]]:
    """Comparisons for the GRPO worked example, "which is larger, a or b?" (10 <= a != b < 100, answer the
    larger number): (corpus lines, SFT rows, GRPO prompt rows).

    The 8,010 problems are shuffled once; the first `n_sft` give the pre-training corpus (question and
    answer on one line) and the SFT rows (prompt, completion), the next `n_prompts` the GRPO prompt rows
    (prompt, answer). No GRPO prompt, held-out or not, was seen in pre-training or SFT: held-out accuracy
    measures comparing numbers, not recall (guessing one of the two is right half the time).
    """
    rng = random.Random(f"arithmetic-{seed}")  # its own stream: the review data does not change
    problems = [(a, b) for a in range(10, 100) for b in range(10, 100) if a != b]
    rng.shuffle(problems)
    if n_sft + n_prompts > len(problems):
        raise ValueError(f"only {len(problems)} problems: n_sft + n_prompts = {n_sft + n_prompts}")
    sft, held = problems[:n_sft], problems[n_sft:n_sft + n_prompts]
    ask = "which is larger, {} or {}?".format
    corpus = [f"{ask(a, b)} {max(a, b)}" for a, b in sft]
    return (corpus, [{"prompt": ask(a, b), "completion": str(max(a, b))} for a, b in sft],
            [{"prompt": ask(a, b), "answer": str(max(a, b))} for a, b in held])


def write_arithmetic(out: Path, seed: int = 0) -> None:
    """arithmetic_corpus.txt, arithmetic_sft.jsonl and arithmetic_prompts.jsonl (see `arithmetic_data`)."""
    corpus, sft, prompts = arithmetic_data(seed=seed)
    (out / "arithmetic_corpus.txt").write_text("\n".join(corpus) + "\n", encoding="utf-8")
    for name, rows in (("arithmetic_sft.jsonl", sft), ("arithmetic_prompts.jsonl", prompts)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def generate_data(out: Path, n_corpus: int = 6000, n_labelled: int = 1200, seed: int = 0,
                  n_instructions: int = 600, n_preferences: int = 600) -> tuple[Path, Path]:
    """Write corpus.txt (unlabelled, one document per line), reviews.jsonl (text, label),
    instructions.jsonl (instruction-tuning rows for `honelm sft`, see `instruction_rows`) and
    preferences.jsonl (preference pairs for `honelm reward` / `honelm dpo`, see `preference_rows`) and the
    arithmetic files of the GRPO worked example (`write_arithmetic`)."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus.txt"
    corpus.write_text("\n".join(review(rng, rng.random() < 0.5) for _ in range(n_corpus)) + "\n", encoding="utf-8")
    labelled = out / "reviews.jsonl"
    with open(labelled, "w", encoding="utf-8") as handle:
        for _ in range(n_labelled):
            positive = rng.random() < 0.5
            handle.write(json.dumps({"text": review(rng, positive), "label": "positive" if positive else "negative"}) + "\n")
    with open(out / "instructions.jsonl", "w", encoding="utf-8") as handle:
        for row in instruction_rows(n_instructions, seed):
            handle.write(json.dumps(row) + "\n")
    with open(out / "preferences.jsonl", "w", encoding="utf-8") as handle:
        for row in preference_rows(n_preferences, seed):
            handle.write(json.dumps(row) + "\n")
    write_arithmetic(out, seed)
    return corpus, labelled


def distill(step: Callable[..., None], out: Path, stamp: str, labelled: Path, tok: str) -> dict[str, dict]:
    """Can a smaller model replace the classifier? The fine-tuned one teaches a student a quarter of its width
    (`honelm distill`, augmented copies of the train texts in the transfer set); the same student is also
    trained without a teacher; each is tested once and `honelm compare` puts the three side by side."""
    teacher = f"{out}/classify/{stamp}-from-pretrained"
    student = ["model.arch=decoder", "model.size=test", f"model.tokenizer={tok}"]
    step("distill", "--config", "demo", f"data.train={labelled}", f"teacher.model={teacher}", *student,
         f"run.out_dir={out}/distill", f"run.name={stamp}")
    step("classify", "--config", "demo", f"data.train={labelled}", *student, "train.lr=3e-3", "train.epochs=8",
         f"run.out_dir={out}/classify", f"run.name={stamp}-student-alone")
    found = {}
    for name, run_dir in (("distilled student", f"{out}/distill/{stamp}"),
                          ("student alone", f"{out}/classify/{stamp}-student-alone")):
        step("test", run_dir)
        found[name] = json.loads(Path(run_dir, "test_metrics.json").read_text())
    step("compare", f"teacher={teacher}", f"distilled={out}/distill/{stamp}",
         f"alone={out}/classify/{stamp}-student-alone", "--out", f"{out}/compare/{stamp}", "--rounds", "3",
         "--no-memory")
    return found


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="honelm demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo-runs", help="directory for the generated data and all runs")
    p.add_argument("--steps", type=int, default=400, help="pre-training steps")
    p.add_argument("--trials", type=int, default=4, help="trials of the demo's hyperparameter search (0 = skip it)")
    p.add_argument("--seeds", type=int, default=2, help="seeds per variant in the demo's boost (0 = skip it)")
    p.add_argument("--data-only", action="store_true", help="only write the generated data to OUT/data (corpus, "
                   "labelled reviews, instructions, preference pairs, arithmetic) and stop")
    args = p.parse_args(argv)
    out = Path(args.out)
    t0 = time.time()
    corpus, labelled = generate_data(out / "data")
    if args.data_only:
        print(f"generated data in {out / 'data'}: {', '.join(sorted(f.name for f in (out / 'data').iterdir()))}")
        return {}
    stamp = time.strftime("%Y%m%d-%H%M%S")

    def step(*words: str) -> None:
        print(f"\n$ honelm {' '.join(words)}", flush=True)
        code = cli.main(list(words))  # looked up at each call: the real CLI, exactly as a user types it
        if code == 130:  # Ctrl-C: the step saved what it had; stop the demo as an interrupted command
            raise KeyboardInterrupt
        if code != 0:
            raise SystemExit(f"demo step failed: honelm {' '.join(words)}")

    step("tokenizer", f"data.train={corpus}", "tokenizer.vocab_size=1000", f"run.out_dir={out}/tokenizer", f"run.name={stamp}")
    tok = f"{out}/tokenizer/{stamp}"
    step("pretrain", "--config", "demo", f"data.train={corpus}", f"model.tokenizer={tok}", f"train.max_steps={args.steps}",
         f"run.out_dir={out}/pretrain", f"run.name={stamp}")
    runs = {}
    for variant, model_args in (("from-pretrained", [f"model.init_from={out}/pretrain/{stamp}"]),
                                ("from-scratch", [f"model.tokenizer={tok}", "model.arch=decoder", "model.size=tiny"])):
        name = f"{stamp}-{variant}"
        step("classify", "--config", "demo", f"data.train={labelled}", *model_args, f"run.out_dir={out}/classify",
             f"run.name={name}")
        run_dir = f"{out}/classify/{name}"
        step("test", run_dir)
        step("report", run_dir)
        runs[variant] = json.loads(Path(run_dir, "test_metrics.json").read_text())
    runs.update(distill(step, out, stamp, labelled, tok))
    step("report", f"{out}/pretrain/{stamp}")
    step("generate", f"{out}/pretrain/{stamp}", "prompt=the film was", "sampling.max_new_tokens=16",
         "sampling.temperature=0.8", "num_samples=2")
    pretrained = f"{out}/pretrain/{stamp}"
    reports = [f"{out}/classify/{stamp}-*/report.html", f"{pretrained}/report.html"]
    if args.trials:  # choose lr and batch size on validation; the test split is sealed meanwhile
        search_dir = f"{out}/search/{stamp}"
        step("search", str(registry.find_config("search", "demo")), "--out-dir", search_dir, "--n-trials", str(args.trials),
             f"data.train={labelled}", f"model.init_from={pretrained}")
        step("test", search_dir)
        step("report", search_dir)
        reports.append(f"{search_dir}/report.html")
    if args.seeds:  # honelm boost: baseline vs +LoRA vs +FGM, each its own search; verdicts on validation, chosen tested once
        boost_dir = f"{out}/boost/{stamp}"
        step("boost", str(registry.find_config("boost", "demo")), f"out_dir={boost_dir}", f"set.data.train={labelled}",
             f"set.model.init_from={pretrained}", f"seeds={args.seeds}")
        reports.append(f"{boost_dir}/report.html")
    print(f"\ndemo finished in {time.time() - t0:.0f} s; test accuracy (read once per run):")
    for variant, metrics in runs.items():
        print(f"  classifier {variant:<18} accuracy {metrics['test_accuracy']:.3f}  macro-F1 {metrics['test_macro_f1']:.3f}")
    print("reports (open in a browser; the .md next to each):\n  " + "\n  ".join(reports))
    return runs
