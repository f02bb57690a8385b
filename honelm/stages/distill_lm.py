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

from typing import Any

from honelm.checkpoint import resolve_model_dir
from honelm.data.sections import encode_chat_split
from honelm.data.sft import SFTExamples, template_texts
from honelm.errors import ConfigError
from honelm.objectives.base import Objective
from honelm.objectives.lm_teacher import WithTeacher
from honelm.objectives.token_kd import token_objective
from honelm.stages.contract import RunContext
from honelm.stages.sft import SFT
from honelm.teacher_lm import on_policy_objective, teacher_answers, teacher_topk
from honelm.tokenizer import load_tokenizer


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


class LMDistillation(SFT):
    """`sft` on the teacher's answers (sequence) or with the teacher's top-k next-token distribution (token)."""

    name = "distill"

    def read(self, ctx: RunContext) -> None:
        super().read(ctx)
        ctx.extra["mode"] = mode = lm_mode(ctx.cfg)
        ctx.say(f"distill: {mode}-level KD from {ctx.cfg.teacher.model}")
        if mode == "sequence":
            ctx.extra["transfer"] = teacher_answers(ctx.run_dir, ctx.cfg, list(ctx.splits.train), ctx.runtime, ctx.say)

    def tokenizer_texts(self, ctx: RunContext) -> list[str]:
        docs = ctx.extra.get("transfer") or ctx.splits.train
        return template_texts([d.conversation for d in docs])

    def training_examples(self, ctx: RunContext) -> SFTExamples:
        if ctx.extra["mode"] == "sequence":
            return encode_chat_split(ctx.tokenizer, ctx.extra["transfer"], ctx.cfg.data)
        return super().training_examples(ctx)

    def training_items(self, ctx: RunContext, examples: SFTExamples, items: Any) -> tuple[Any, Objective]:
        d, student = ctx.cfg.distill, ctx.loaded.model if ctx.loaded else None
        if ctx.extra["mode"] == "sequence":
            return super().training_items(ctx, examples, items)
        cache = teacher_topk(ctx.run_dir, ctx.cfg, examples, ctx.tokenizer, student, ctx.runtime, ctx.say)
        objective: Objective = token_objective(d)
        if d.on_policy > 0:
            objective = on_policy_objective(ctx.cfg, objective, ctx.tokenizer, student, ctx.device, ctx.say)
        return WithTeacher(items, cache), objective


def check_generation(cfg: Any) -> None:
    """What a generation task needs from the config (ConfigError)."""
    if cfg.model.arch != "decoder" and not cfg.model.init_from:
        raise ConfigError("distill with data.task=generation trains a causal LM: model.arch must be decoder")
    if cfg.data.max_length < 2:
        raise ConfigError("data.max_length must be at least 2")
    if cfg.distill.on_policy > 0 and (cfg.data.packing or cfg.distill.mode == "sequence"):
        raise ConfigError("distill.on_policy samples answers to each row's prompt: it needs token-level KD "
                          "(distill.mode=token or auto) and data.packing=false")
