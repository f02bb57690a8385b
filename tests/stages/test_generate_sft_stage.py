"""Sequence-level distillation's round trip through the real CLI: `honelm generate` answers a task's
own SFT rows (alpaca and messages, chat=true) and plain prompts (chat=false), and its output files
are `honelm sft` input as they are."""

from __future__ import annotations

import json
import re

from tests.stages.conftest import FAST, cli, events


def test_generate_answers_sft_rows_and_sft_trains_on_the_answers(pretrained, data_dir, tmp_path, capsys):
    task = [json.loads(x) for x in (data_dir / "instructions.jsonl").read_text().splitlines()][:40]
    prompts = tmp_path / "task.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in task))
    answers = tmp_path / "teacher.jsonl"
    cli("generate", str(pretrained), f"prompts_file={prompts}", f"out={answers}", "chat=true",
        "sampling.max_new_tokens=8", "sampling.seed=3")
    err = capsys.readouterr().err
    rows = [json.loads(x) for x in answers.read_text().splitlines()]
    empty = len(task) - len(rows)
    assert len(rows) >= 30 and (empty == 0 or f"left out {empty} empty generation(s)" in err)
    assert all(r["completion"].strip() and r["sampling"]["seed"] == 3 and r["chat"] is True for r in rows)
    # the reference is the row's own reply, kept apart: an alpaca output, a conversation's last turn
    by_prompt = {json.dumps(r["prompt"]): r["reference"] for r in rows}
    first = task[0]
    asked = first["instruction"] + (f"\n\n{first['input']}" if first.get("input") else "")
    if json.dumps(asked) in by_prompt:
        assert by_prompt[json.dumps(asked)] == first["output"]
    conversations = [r for r in rows if isinstance(r["prompt"], list)]
    assert conversations and all(r["prompt"][-1]["role"] == "user" and len(r["prompt"]) == 4 for r in conversations)
    plain = tmp_path / "plain.txt"
    plain.write_text("the film was\nthe cast\nthe story felt\n")
    continued = tmp_path / "continued.jsonl"
    cli("generate", str(pretrained), f"prompts_file={plain}", f"out={continued}", "sampling.max_new_tokens=6",
        "num_samples=2")
    assert all(json.loads(x)["chat"] is False for x in continued.read_text().splitlines())

    cli("sft", f"data.train={answers},{continued}", f"model.init_from={pretrained}", "train.max_steps=6",
        "train.eval_every=3", "samples.n=0", "data.max_length=96", "train.batch_size=8", "train.lr=3e-3",
        f"run.out_dir={tmp_path}", "run.name=student", *FAST)
    run = tmp_path / "student"
    log = (run / "log.txt").read_text()
    n_rows = len(rows) + len(continued.read_text().splitlines())
    split = re.search(r"split: train (\d+), val (\d+), test (\d+)", log)
    assert split and sum(map(int, split.groups())) == n_rows  # every generated row read as a conversation
    # every train row becomes an example, or is named as dropped (a sampled reply can outgrow data.max_length: the
    # sampling stream is the device's, so which rows do is not fixed across CPU and CUDA)
    kept = re.search(rf"train: {split.group(1)} conversations → (\d+) examples", log)
    assert kept, log
    dropped = int(split.group(1)) - int(kept.group(1))
    assert dropped == 0 or f"DROPPED {dropped} whose reply starts after data.max_length" in log
    assert [e["step"] for e in events(run, "eval")] == [3, 6] and events(run, "end")[0]["reason"] == "max_steps"
