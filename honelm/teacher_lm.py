"""The teacher causal LM of `honelm distill` (data.task=generation): its answers and its next-token top-k, cached.

* `teacher_answers` (sequence-level KD, Kim & Rush 2016): the teacher answers every training prompt
  (the conversation up to its last assistant turn, through the teacher's own chat template,
  `sampling.*`, `distill.num_samples` answers each, seeds sampling.seed, seed+1, ...). The answers
  are RUN/teacher/answers.jsonl, prompt_completion rows `honelm sft` reads as they are (with
  `source`, `line`, `seed` and the task's `reference` as extra fields), and answers.key the hash of
  what they depend on (teacher, prompts, sampling); answers made for other settings are refused.
  Empty answers are left out and counted.
* `teacher_topk` (token-level KD): the teacher's top-k log-probs at the target tokens of the
  training examples (`honelm.objectives.lm_teacher`), RUN/teacher/topk.safetensors, fingerprinted
  by the examples.

Both run on the main process under a forked RNG (the training random stream does not depend on
whether the cache was computed or read back); the other processes wait and read the files.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import torch

from honelm.checkpoint import resolve_model_dir
from honelm.data.chat import Conversation, Messages, ensure_template, prompt_ids
from honelm.data.sft import ChatDocument, SFTExamples, as_document
from honelm.errors import HonelmError
from honelm.generate import SamplingConfig, generate_ids
from honelm.models import load_model
from honelm.objectives.lm_teacher import TeacherTopK, check_shared_vocab, compute_teacher_topk, load_teacher_topk
from honelm.objectives.on_policy import OnPolicyKD
from honelm.objectives.token_kd import TokenKD
from honelm.teacher import TEACHER_DIR, fingerprint
from honelm.tokenizer import load_tokenizer

ANSWERS = "answers.jsonl"
TOPK = "topk.safetensors"
Say = Callable[[str], None]


def load_teacher_lm(cfg: Any, device: torch.device) -> tuple[torch.nn.Module, Any, str]:
    """(model, tokenizer, resolved path) of `teacher.*`, the model in eval mode on `device`."""
    path = resolve_model_dir(cfg.model)
    tokenizer = load_tokenizer(resolve_model_dir(cfg.tokenizer) if cfg.tokenizer else path)
    model = load_model(path, "lm", trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)
    model = model.to(device).eval()
    return model, tokenizer, path


def prompt_of(doc: ChatDocument) -> Messages:
    """The conversation up to its last assistant turn (what the teacher answers)."""
    messages = doc.conversation
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last]


def teacher_answers(run_dir: Path, cfg: Any, docs: list[ChatDocument], runtime: Any, say: Say) -> list[ChatDocument]:
    """Every training prompt answered by the teacher (computed once, then read from RUN/teacher/), as conversations."""
    path = run_dir / TEACHER_DIR / ANSWERS
    key = _key([cfg.teacher.model, fingerprint(resolve_model_dir(cfg.teacher.model)), cfg.teacher.tokenizer,
                json.dumps(cfg.sampling.__dict__, sort_keys=True), str(cfg.distill.num_samples),
                *(d.text for d in docs)])
    if runtime.is_main and not _fresh(path, key):
        with torch.random.fork_rng(devices=[]):
            rows = answer_all(cfg, docs, runtime.device, say)
        _write_rows(path, rows, key)
    runtime.barrier()
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    answered = [as_document(Conversation(r["prompt"] + [{"role": "assistant", "content": r["completion"]}],
                                         r["source"], r["line"])) for r in rows]
    say(f"teacher: {len(answered)} answers to {len(docs)} training prompts ({path})")
    return answered


def answer_all(cfg: Any, docs: list[ChatDocument], device: torch.device, say: Say) -> list[dict[str, Any]]:
    """The teacher's answers as prompt_completion rows (empty answers left out, counted)."""
    model, tokenizer, path = load_teacher_lm(cfg.teacher, device)
    ensure_template(tokenizer, say)
    prompts = [prompt_of(d) for d in docs]
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    say(f"teacher: {path} answers {len(docs)} training prompts x {cfg.distill.num_samples} "
        f"(temperature {cfg.sampling.temperature}, max_new_tokens {cfg.sampling.max_new_tokens})")
    rows, blank = [], 0
    for k in range(cfg.distill.num_samples):
        sampling = SamplingConfig(**{**cfg.sampling.__dict__, "seed": cfg.sampling.seed + k})
        outputs = generate_ids(model, tokenizer, ids, sampling, batch_size=cfg.teacher.batch_size)
        for d, p, out in zip(docs, prompts, outputs):
            if not out.strip():
                blank += 1  # an empty reply trains nothing; counted, never silently
                continue
            rows.append({"prompt": p, "completion": out, "source": d.source, "line": d.line, "seed": sampling.seed,
                         "reference": d.conversation[-1]["content"]})
    if blank:
        say(f"teacher: {blank} empty answer(s) left out (the teacher ended at once)")
    if not rows:
        raise HonelmError(f"teacher {path} gave no non-empty answer to any training prompt")
    return rows


def teacher_topk(run_dir: Path, cfg: Any, examples: SFTExamples, student_tokenizer: Any,
                 student: torch.nn.Module | None, runtime: Any, say: Say) -> TeacherTopK:
    """The teacher's top-k log-probs on the examples' target tokens (RUN/teacher/topk.safetensors)."""
    path = run_dir / TEACHER_DIR / TOPK
    if runtime.is_main and not path.is_file():
        with torch.random.fork_rng(devices=[]):
            model, tokenizer, where = load_teacher_lm(cfg.teacher, runtime.device)
            vocab = check_shared_vocab(tokenizer, student_tokenizer, model, student)
            say(f"teacher: {where}; top-{cfg.distill.top_k} next-token log-probs on {examples.n_targets} target "
                f"tokens of {len(examples)} training examples")
            cache = compute_teacher_topk(model, examples, cfg.distill.top_k, vocab, cfg.teacher.batch_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        cache.save(path)
    runtime.barrier()
    return load_teacher_topk(path, examples)


def on_policy_objective(cfg: Any, inner: TokenKD, student_tokenizer: Any, student: torch.nn.Module | None,
                        device: torch.device, say: Say) -> OnPolicyKD:
    """GKD's mix: the teacher, kept in memory, scores the student's own answers on distill.on_policy of the batches."""
    teacher, tokenizer, _ = load_teacher_lm(cfg.teacher, device)
    vocab = check_shared_vocab(tokenizer, student_tokenizer, teacher, student)
    say(f"distill: on-policy on {cfg.distill.on_policy:.0%} of the batches: the student answers their prompts "
        f"(temperature {cfg.sampling.temperature}, max_new_tokens {cfg.sampling.max_new_tokens}), the teacher scores")
    return OnPolicyKD(inner, teacher, student_tokenizer, cfg.sampling, cfg.distill.top_k, vocab, cfg.distill.on_policy,
                      cfg.run.seed, cfg.teacher.batch_size)


def _key(parts: list[str]) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _fresh(path: Path, key: str) -> bool:
    """Whether `path` holds answers made for `key` (its .key file); answers for other settings are an error."""
    if not path.is_file():
        return False
    if path.with_suffix(".key").read_text(encoding="utf-8").strip() != key:
        raise HonelmError(f"{path}: these teacher answers were made for another teacher, prompts or sampling "
                          "settings; start a new run")
    return True


def _write_rows(path: Path, rows: list[dict[str, Any]], key: str) -> None:
    """answers.jsonl (prompt_completion rows `honelm sft` reads as they are) and its key; the rows file last."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".key").write_text(key + "\n", encoding="utf-8")
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for r in rows:
            handle.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)
