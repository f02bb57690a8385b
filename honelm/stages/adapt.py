"""`honelm adapt`: continued pre-training before fine-tuning (DAPT, TAPT, curated TAPT).

Gururangan et al. (2020), METHODS.md section 2. The text decides the mode: a domain corpus
(`data.train`, DAPT), the TRAIN text of a labelled task (`task.*`, classify's data fields: the same
values give the same split; TAPT), both (DAPT+TAPT in one run), or both with `curate.k > 0`
(curated TAPT); `honelm.data.adapt_corpus` owns the corpus, its leak guard and validation slice.
Encoders train masked LM with dynamic masking, decoders causal LM on packed blocks as `pretrain`
does; MLM validation masks with the fixed seed of each validation set. `honelm test` scores the
domain corpus's test split. `best/` is a plain Hugging Face model directory that `classify
model.init_from=RUN` re-heads; beside it, best/val_predictions.jsonl holds each validation row's
score record (targets, summed loss; MLM: correct predictions), every source's rows in turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

from honelm.boosters import StageConfig
from honelm.boosters.adversarial import AdversarialConfig
from honelm.boosters.lora import LoraConfig
from honelm.config import ModelConfig, RunConfig, TrainConfig, section
from honelm.data.adapt_corpus import CurateConfig, build_corpus, curate, domain_splits, mode_of, packed_rows
from honelm.data.large_corpus import CorpusPart
from honelm.data.masking import MLMRows, check_mlm_tokenizer, lm_rows
from honelm.data.packing import PackedBlocks
from honelm.data.sections import AdaptDataConfig, AdaptOptions, LabelledDataConfig
from honelm.errors import HonelmError
from honelm.models import LoadedModel, check_block_fits, kind_of_dir
from honelm.objectives.lm import CausalLM
from honelm.objectives.lm_scores import lm_scores, loss_sums
from honelm.objectives.mlm import MaskedLM
from honelm.stages.contract import ModelSpec, Plan, RunContext, Stage, best_dir
from honelm.stages.resolve import init_kind, report_new_head


def _adapt_train_defaults() -> TrainConfig:
    # RoBERTa/DSP continued pre-training: lr 1e-4 (TAPT), betas (0.9, 0.98), eps 1e-6,
    # warmup 6% then linear decay (METHODS.md 2.2).
    return TrainConfig(lr=1e-4, weight_decay=0.01, adam_beta2=0.98, adam_eps=1e-6, warmup_ratio=0.06,
                       schedule="linear", min_lr_ratio=0.0, epochs=1.0, batch_size=32)


@dataclass
class AdaptConfig(StageConfig):
    """Continued pre-training (masked LM for encoders, causal LM for decoders) on domain and/or task text."""

    verb = "adapt"

    run: RunConfig = section(RunConfig)
    data: AdaptDataConfig = section(AdaptDataConfig)
    task: LabelledDataConfig = section(LabelledDataConfig)
    adapt: AdaptOptions = section(AdaptOptions)
    curate: CurateConfig = section(CurateConfig)
    model: ModelConfig = section(ModelConfig)
    train: TrainConfig = section(_adapt_train_defaults)  # type: ignore[arg-type]
    lora: LoraConfig = section(LoraConfig)
    adversarial: AdversarialConfig = section(AdversarialConfig)


class Adapt(Stage):
    """Masked LM (encoders) or causal LM (decoders) on the adaptation corpus; test: held-out domain loss."""

    name = "adapt"
    config = AdaptConfig
    record_metrics = ("loss", "accuracy")  # accuracy: masked LM only

    def check(self, cfg: AdaptConfig) -> None:
        mode_of(cfg)  # the corpus settings and an unreadable model.init_from fail before the run directory exists
        init_kind(cfg.model)

    def splits(self, cfg: AdaptConfig, say: Callable[[str], None], leak_texts: list[str] | None = None) -> Any:
        return domain_splits(cfg, init_kind(cfg.model), say, leak_texts)  # the only test split adapt has

    def read(self, ctx: RunContext) -> None:
        """ctx.splits is the adaptation `Corpus` (train texts, validation texts per source)."""
        cfg = ctx.cfg
        ctx.extra.update(mode=mode_of(cfg), kind=init_kind(cfg.model))
        if not cfg.model.init_from:
            ctx.say("note: no model.init_from: adapting a randomly initialised preset (this is pre-training, "
                    "not adaptation)")
        ctx.splits = build_corpus(cfg, ctx.extra["mode"], ctx.say, ctx.extra["kind"])
        if ctx.splits.domain_splits is not None:
            ctx.write_json("split_manifest.json", ctx.splits.domain_splits.manifest)
        if ctx.splits.task_splits is not None:
            ctx.write_json("task_split_manifest.json", ctx.splits.task_splits.manifest)

    def tokenizer_kind(self, cfg: AdaptConfig) -> Literal["bpe", "wordpiece"]:
        return "wordpiece" if init_kind(cfg.model) == "encoder" else "bpe"

    def model_spec(self, ctx: RunContext) -> ModelSpec:
        return ModelSpec("mlm" if ctx.extra["kind"] == "encoder" else "lm")

    def before_boosters(self, ctx: RunContext, loaded: LoadedModel) -> None:
        cfg, tokenizer, model, corpus = ctx.cfg, ctx.tokenizer, loaded.model, ctx.splits
        report_new_head(loaded, ctx.say)
        check_block_fits(model, cfg.data.block_size, "data.block_size")
        if ctx.extra["kind"] == "encoder":
            check_mlm_tokenizer(tokenizer, model.get_input_embeddings().num_embeddings)
        if ctx.extra["mode"] == "curated_tapt":
            curate(corpus, cfg.curate, model, tokenizer, ctx.device, ctx.say)
        corpus.save(ctx.run_dir, ctx.resume, ctx.runtime.is_main)

    def plan(self, ctx: RunContext, loaded: Any) -> Plan:
        cfg, corpus, kind, mode = ctx.cfg, ctx.splits, ctx.extra["kind"], ctx.extra["mode"]
        train_rows = self.encode(ctx, corpus.train, "train")
        val_rows = {name: self.encode(ctx, docs, "val") for name, docs in corpus.val.items()}
        packed = packed_rows(cfg.data.pack, kind, mode)
        ctx.say(f"data ({mode}, {'masked' if kind == 'encoder' else 'causal'} LM, "
                f"{'packed blocks' if packed else 'one document per row'} of <= {cfg.data.block_size} tokens): "
                f"{len(corpus.train)} training texts -> {len(train_rows)} rows; validation: "
                + (", ".join(f"{n} {len(corpus.val[n])} texts" for n in val_rows) or "none"))
        for name, rows in (("train", train_rows), *val_rows.items()):
            if getattr(rows, "truncated", 0):
                ctx.say(f"note: {rows.truncated} {name} documents are longer than data.block_size="
                        f"{cfg.data.block_size} and were truncated (data.pack=blocks keeps all of their text)")
        stream = ctx.stream(train_rows, lengths=None if packed else train_rows.lengths)
        evaluate = self.validation(ctx, corpus.val, "rows", val_rows) if val_rows else None
        return Plan(MaskedLM() if kind == "encoder" else CausalLM(), stream, evaluate,
                    metric=cfg.train.metric or "val_loss")

    def finish(self, ctx: RunContext, plan: Plan, result: Any) -> dict[str, Any]:
        return {"mode": ctx.extra["mode"]}

    def encode(self, ctx: RunContext, rows: list[Any] | CorpusPart, split: str) -> MLMRows | PackedBlocks:
        """Documents → CLM blocks or MLM rows (a large corpus's CLM blocks from its token file); only the train
        rows mask with this process's rank."""
        cfg, kind = ctx.cfg, ctx.extra["kind"]
        if isinstance(rows, CorpusPart):
            return rows.blocks(ctx.tokenizer, cfg.data.block_size)  # type: ignore[return-value]
        return lm_rows(ctx.tokenizer, [d.text for d in rows], cfg.data.block_size, kind,
                       packed_rows(cfg.data.pack, kind, ctx.extra["mode"]), cfg.adapt.mlm_probability,
                       ctx.runtime.rank if split == "train" else 0)

    def score(self, ctx: RunContext, model: torch.nn.Module, data: dict[str, Any], split: str) -> dict[str, float]:
        """Over {source: rows}; MLM masks come from the source's split seed (the same masks every time)."""
        seeds, records = {"task": ctx.cfg.task.seed}, ctx.records(split)
        sums = {name: loss_sums(model, rows, ctx.cfg.train.eval_batch_size, seeds.get(name, ctx.cfg.data.seed),
                                ctx.device, records) for name, rows in data.items()}
        return lm_scores(sums, data, split)

    def check_testable(self, ctx: RunContext) -> None:
        if not ctx.cfg.data.train:  # the task's test text is classify's to read, never adapt's
            raise HonelmError(f"{ctx.run_dir}: this adapt run has no domain corpus (data.train), so no test split of "
                              "its own; test it downstream: `honelm classify model.init_from=RUN`, then `honelm "
                              "test` that run")

    def test(self, ctx: RunContext, rows: list[Any]) -> dict[str, Any]:
        """Held-out domain loss of best/ (fixed masks of data.seed for MLM), and how many documents."""
        kind = kind_of_dir(best_dir(ctx.run_dir), ctx.cfg.model.trust_remote_code)
        ctx.extra.update(kind=kind, mode=mode_of(ctx.cfg))
        model = self.load_best(ctx).to(ctx.device).eval()
        with torch.no_grad():
            metrics = self.score(ctx, model, {"domain": self.encode(ctx, rows, "test")}, "test")
        return {**metrics, "n_documents": len(rows)}
