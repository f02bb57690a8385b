"""`honelm distill` with `data.task=generation`: a teacher causal LM teaches a student on a chat task.

Two ways (`distill.mode`; docs/distill.md):

* sequence (Kim & Rush 2016): the teacher answers every training prompt (the conversation up to its
  last assistant turn, through its own chat template, `sampling.*`, `distill.num_samples` answers
  each) and the student is trained as `sft` trains, on those answers. Only text passes between the
  two, so it works across tokenizers and architectures. The answers are cached in
  RUN/teacher/answers.jsonl (a prompt_completion file `honelm sft` also reads).
* token (Hinton et al. 2015; GKD, Agarwal et al. 2024): teacher and student share a vocabulary; the
  student matches the teacher's next-token distribution (its top-k cached once,
  RUN/teacher/topk.safetensors) on the reference answers' tokens: forward KL, reverse KL or
  generalized JSD (`honelm.objectives.token_kd`).

`auto` takes token when the student's tokenizer (model.tokenizer or model.init_from's) has the
teacher's vocabulary, else sequence. Validation, best/, samples and `honelm test` are `sft`'s, on
the task's own references, so a distilled student and the same student SFT'd on the references
are scored alike. The teacher runs under a forked RNG: the training random stream does not depend
on whether its outputs were computed or read back, and a resumed run is bit-identical.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from honelm.checkpoint import resolve_model_dir
from honelm.data.chat import Conversation, ensure_template, prompt_ids
from honelm.data.sections import encode_chat_split
from honelm.data.sft import ChatDocument, SFTExamples, as_document, template_texts
from honelm.errors import ConfigError, HonelmError
from honelm.generate import SamplingConfig, generate_ids
from honelm.models import load_model
from honelm.objectives.base import Objective
from honelm.objectives.lm_teacher import WithTeacher, check_shared_vocab, compute_teacher_topk, load_teacher_topk
from honelm.objectives.token_kd import TokenKD
from honelm.stages.contract import RunContext
from honelm.stages.sft import SFT
from honelm.teacher import TEACHER_DIR, fingerprint
from honelm.tokenizer import load_tokenizer

ANSWERS = "answers.jsonl"
TOPK = "topk.safetensors"


def lm_mode(cfg: Any) -> str:
    """sequence | token: distill.mode, or (auto) token when the student's given tokenizer has the teacher's vocabulary."""
    if cfg.distill.mode != "auto":
        return cfg.distill.mode
    source = cfg.model.tokenizer or cfg.model.init_from
    if not source:
        return "sequence"  # the student's tokenizer is trained on the teacher's answers: its own vocabulary
    student = load_tokenizer(resolve_model_dir(source))
    teacher = load_tokenizer(resolve_model_dir(cfg.teacher.tokenizer or cfg.teacher.model))
    return "token" if student.get_vocab() == teacher.get_vocab() else "sequence"


def prompt_of(doc: ChatDocument) -> list[dict[str, str]]:
    """The conversation up to its last assistant turn (what the teacher answers)."""
    messages = doc.conversation
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last]


class LMDistillation(SFT):
    """`sft` on the teacher's answers (sequence) or with the teacher's top-k next-token distribution (token)."""

    name = "distill"

    def read(self, ctx: RunContext) -> None:
        super().read(ctx)
        ctx.extra["mode"] = mode = lm_mode(ctx.cfg)
        ctx.say(f"distill: {mode}-level KD from {ctx.cfg.teacher.model}")
        if mode == "sequence":
            ctx.extra["transfer"] = self.teacher_answers(ctx)

    def tokenizer_texts(self, ctx: RunContext) -> list[str]:
        docs = ctx.extra.get("transfer") or ctx.splits.train
        return template_texts([d.conversation for d in docs])

    def training_examples(self, ctx: RunContext) -> SFTExamples:
        if ctx.extra["mode"] == "sequence":
            return encode_chat_split(ctx.tokenizer, ctx.extra["transfer"], ctx.cfg.data)
        return super().training_examples(ctx)

    def training_items(self, ctx: RunContext, examples: SFTExamples, items: Any) -> tuple[Any, Objective]:
        d = ctx.cfg.distill
        if ctx.extra["mode"] == "sequence":
            return super().training_items(ctx, examples, items)
        cache = self.teacher_topk(ctx, examples)
        return WithTeacher(items, cache), TokenKD(d.divergence, d.beta, d.temperature, d.alpha)

    # ---- the teacher

    def teacher(self, ctx: RunContext) -> tuple[torch.nn.Module, Any, str]:
        cfg = ctx.cfg.teacher
        path = resolve_model_dir(cfg.model)
        tokenizer = load_tokenizer(resolve_model_dir(cfg.tokenizer) if cfg.tokenizer else path)
        model = load_model(path, "lm", trust_remote_code=cfg.trust_remote_code).to(ctx.device).eval()
        return model, tokenizer, path

    def teacher_answers(self, ctx: RunContext) -> list[ChatDocument]:
        """Every training prompt answered by the teacher (cached in RUN/teacher/answers.jsonl), as conversations."""
        cfg, folder = ctx.cfg, ctx.run_dir / TEACHER_DIR
        docs = list(ctx.splits.train)
        key = _key([cfg.teacher.model, fingerprint(resolve_model_dir(cfg.teacher.model)), cfg.teacher.tokenizer,
                    json.dumps(cfg.sampling.__dict__, sort_keys=True), str(cfg.distill.num_samples),
                    *(d.text for d in docs)])
        path = folder / ANSWERS
        if ctx.runtime.is_main and not _fresh(path, key):
            with torch.random.fork_rng(devices=[]):
                rows = self.answer_all(ctx, docs)
            _write_rows(path, rows, key)
        ctx.runtime.barrier()
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        answered = [as_document(Conversation(r["prompt"] + [{"role": "assistant", "content": r["completion"]}],
                                             r["source"], r["line"])) for r in rows]
        ctx.say(f"teacher: {len(answered)} answers to {len(docs)} training prompts ({path})")
        return answered

    def answer_all(self, ctx: RunContext, docs: list[ChatDocument]) -> list[dict[str, Any]]:
        cfg = ctx.cfg
        model, tokenizer, path = self.teacher(ctx)
        ensure_template(tokenizer, ctx.say)
        prompts = [prompt_of(d) for d in docs]
        ids = [prompt_ids(tokenizer, p) for p in prompts]
        ctx.say(f"teacher: {path} answers {len(docs)} training prompts x {cfg.distill.num_samples} "
                f"(temperature {cfg.sampling.temperature}, max_new_tokens {cfg.sampling.max_new_tokens})")
        rows, blank = [], 0
        for k in range(cfg.distill.num_samples):
            sampling = SamplingConfig(**{**cfg.sampling.__dict__, "seed": cfg.sampling.seed + k})
            for d, p, out in zip(docs, prompts, generate_ids(model, tokenizer, ids, sampling,
                                                           batch_size=cfg.teacher.batch_size)):
                if not out.strip():
                    blank += 1  # an empty reply trains nothing; counted, never silently
                    continue
                rows.append({"prompt": p, "completion": out, "source": d.source, "line": d.line,
                             "seed": sampling.seed, "reference": d.conversation[-1]["content"]})
        if blank:
            ctx.say(f"teacher: {blank} empty answer(s) left out (the teacher ended at once)")
        if not rows:
            raise HonelmError(f"teacher {path} gave no non-empty answer to any training prompt")
        return rows

    def teacher_topk(self, ctx: RunContext, examples: SFTExamples) -> Any:
        """The teacher's top-k log-probs on the training examples' target tokens (RUN/teacher/topk.safetensors)."""
        cfg, path = ctx.cfg, ctx.run_dir / TEACHER_DIR / TOPK
        if ctx.runtime.is_main and not path.is_file():
            with torch.random.fork_rng(devices=[]):
                model, tokenizer, where = self.teacher(ctx)
                vocab = check_shared_vocab(tokenizer, ctx.tokenizer, model, ctx.loaded.model if ctx.loaded else None)
                ctx.say(f"teacher: {where}; top-{cfg.distill.top_k} next-token log-probs on "
                        f"{examples.n_targets} target tokens of {len(examples)} training examples")
                cache = compute_teacher_topk(model, examples, cfg.distill.top_k, vocab, cfg.teacher.batch_size)
            path.parent.mkdir(parents=True, exist_ok=True)
            cache.save(path)
        ctx.runtime.barrier()
        return load_teacher_topk(path, examples)


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


def check_generation(cfg: Any) -> None:
    """What a generation task needs from the config (ConfigError)."""
    if cfg.model.arch != "decoder" and not cfg.model.init_from:
        raise ConfigError("distill with data.task=generation trains a causal LM: model.arch must be decoder")
    if cfg.data.max_length < 2:
        raise ConfigError("data.max_length must be at least 2")
