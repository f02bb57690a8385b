"""`honelm demo`: the whole foundation path, offline, on data honelm generates itself.

1. generate a small synthetic review language: an unlabelled corpus and a labelled sentiment set
   whose labels depend on word order (negation, contrast), so a bag of words is not enough;
2. train a byte-level BPE tokenizer; 3. pre-train a tiny Llama-style decoder;
4. fine-tune a classifier from the pre-trained model and, for comparison, from random init;
5. test both once; 6. write the reports.

Every step runs through the real CLI (`honelm.cli.main`), exactly as a user would type it.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

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


def generate_data(out: Path, n_corpus: int = 6000, n_labelled: int = 1200, seed: int = 0) -> tuple[Path, Path]:
    """Write corpus.txt (unlabelled, one document per line) and reviews.jsonl (text, label)."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus.txt"
    corpus.write_text("\n".join(review(rng, rng.random() < 0.5) for _ in range(n_corpus)) + "\n", encoding="utf-8")
    labelled = out / "reviews.jsonl"
    with open(labelled, "w", encoding="utf-8") as handle:
        for _ in range(n_labelled):
            positive = rng.random() < 0.5
            handle.write(json.dumps({"text": review(rng, positive), "label": "positive" if positive else "negative"}) + "\n")
    return corpus, labelled


def main(argv: list[str] | None = None) -> dict:
    from honelm.cli import main as cli

    p = argparse.ArgumentParser(prog="honelm demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo-runs", help="directory for the generated data and all runs")
    p.add_argument("--steps", type=int, default=400, help="pre-training steps")
    args = p.parse_args(argv)
    out = Path(args.out)
    t0 = time.time()
    corpus, labelled = generate_data(out / "data")
    stamp = time.strftime("%Y%m%d-%H%M%S")

    def step(*words: str) -> None:
        print(f"\n$ honelm {' '.join(words)}", flush=True)
        if cli(list(words)) != 0:
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
    step("report", f"{out}/pretrain/{stamp}")
    step("generate", f"{out}/pretrain/{stamp}", "prompt=the film was", "sampling.max_new_tokens=16",
         "sampling.temperature=0.8", "num_samples=2")
    print(f"\ndemo finished in {time.time() - t0:.0f} s; test accuracy (read once per run):")
    for variant, metrics in runs.items():
        print(f"  classifier {variant:<16} accuracy {metrics['test_accuracy']:.3f}  macro-F1 {metrics['test_macro_f1']:.3f}")
    print(f"reports: {out}/classify/{stamp}-*/report.md and {out}/pretrain/{stamp}/report.md")
    return runs
