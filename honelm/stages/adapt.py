"""`honelm adapt`: continued pre-training before fine-tuning (DAPT, TAPT, curated TAPT).

Gururangan et al. (2020), METHODS.md section 2. The text decides the mode:

* DAPT: `data.train` (a domain corpus) only. It is split by `data.split` exactly like
  `pretrain` splits its corpus; the train split trains, the val split validates, the test
  split is read only by `honelm test` (held-out domain loss).
* TAPT: `task.train` only. `task` has exactly the labelled-data fields of `classify`, so the
  same values give the same split; the corpus is the text of the task's TRAIN split (and its
  pair texts) plus optional unlabelled `adapt.task_extra`, never val or test text.
* DAPT+TAPT in one run: both set, both corpora train together (the paper runs them one after
  the other: chain two runs with `model.init_from` for that).
* Curated TAPT: both set and `curate.k > 0`: the task text plus the k nearest domain
  documents of every task training text (see `honelm.data.curate`); the rest of the domain
  corpus is not used.

The leak guard: every candidate text (task train, extra, domain, curated) whose sha256 equals
a task validation text (or pair half), or a validation/ratio-test row of the task's split
manifest, is dropped and counted. A user-supplied task test FILE is not covered: reading it is
`honelm test`'s privilege (its bytes are only hashed here).

TAPT validation: a slice of the TAPT texts chosen by content hash (`adapt.val_fraction`,
seeded by task.seed), so the same text is always on the same side; the task's own val/test
splits are never used for this. MLM validation masks with a fixed seed per validation set, so
every evaluation, and every run with the same data, sees the same masks.

Encoders train masked LM with dynamic masking; decoders train causal LM on packed blocks, as
`pretrain` does. `best/` is a plain Hugging Face model directory that `classify
model.init_from=RUN` re-heads.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

import torch

from honelm import boosters
from honelm import runtime as rt
from honelm.boosters.adversarial import AdversarialConfig
from honelm.boosters.lora import LoraConfig
from honelm.checkpoint import best_writes_base, resolve_model_dir, save_pretrained_atomic
from honelm.config import ModelConfig, RunConfig, TrainConfig, section
from honelm.data.curate import embed_texts, nearest, tfidf_vectors
from honelm.data.masking import MLMRows, documents_mlm, pack_mlm
from honelm.data.packing import PackedBlocks, bits_per_byte, pack
from honelm.data.readers import Document, read_documents
from honelm.errors import ConfigError, HonelmError
from honelm.loop import BatchStream, Callback, TrainPlan, fit
from honelm.models import model_kind
from honelm.objectives.base import Objective
from honelm.objectives.lm import CausalLM
from honelm.objectives.mlm import MaskedLM
from honelm.stages import setup as S
from honelm.stages.classify import LabelledDataConfig
from honelm.stages.pretrain import TextDataConfig


@dataclass
class AdaptDataConfig(TextDataConfig):
    """The domain corpus (DAPT, and the pool curated TAPT picks from) and how text becomes rows."""

    train: str = ""
    """Domain corpus for DAPT: files, directories or globs (comma-separated); empty = no domain text (TAPT only)."""
    block_size: int = 256
    """Longest row in tokens: packed blocks are this long; in documents mode longer documents are truncated (counted)."""
    pack: Literal["auto", "blocks", "documents"] = "auto"
    """Masked LM rows: blocks = documents packed as [CLS] d1 [SEP] d2 [SEP]... (RoBERTa FULL-SENTENCES); documents = one per row, truncated (the DSP reference's TAPT --line_by_line); auto = documents when all training text comes from the task (TAPT, curated TAPT), blocks when the domain corpus trains (DAPT). Decoders always pack."""


@dataclass
class AdaptOptions:
    """Task-text options and masking."""

    task_extra: str = ""
    """Extra unlabelled task text (files/globs, comma-separated; read like data.train with task.text_field): added to TAPT after the leak guard."""
    val_fraction: float = 0.1
    """Share of the TAPT texts (task train + task_extra), chosen by content hash, held out to validate; 0 = none."""
    mlm_probability: float = 0.15
    """Share of real tokens selected for masked LM (of those 80% -> mask, 10% -> random token, 10% kept)."""


@dataclass
class CurateConfig:
    """Curated TAPT: add the nearest domain documents of every task training text."""

    k: int = 0
    """Nearest domain documents added per task training text (needs data.train and task.train); 0 = no curation."""
    method: Literal["embedding", "tfidf"] = "embedding"
    """Similarity: cosine of the starting model's mean-pooled hidden states, or of TF-IDF word vectors."""
    max_length: int = 128
    """Tokens per text when embedding (longer texts are truncated for the similarity only)."""
    batch_size: int = 64
    """Texts per forward pass when embedding."""


def _adapt_train_defaults() -> TrainConfig:
    # RoBERTa/DSP continued pre-training: lr 1e-4 (TAPT), betas (0.9, 0.98), eps 1e-6,
    # warmup 6% then linear decay (METHODS.md 2.2).
    return TrainConfig(lr=1e-4, weight_decay=0.01, adam_beta2=0.98, adam_eps=1e-6, warmup_ratio=0.06,
                       schedule="linear", min_lr_ratio=0.0, epochs=1.0, batch_size=32)


@dataclass
class AdaptConfig:
    """Continued pre-training (masked LM for encoders, causal LM for decoders) on domain and/or task text."""

    run: RunConfig = section(RunConfig)
    data: AdaptDataConfig = section(AdaptDataConfig)
    task: LabelledDataConfig = section(LabelledDataConfig)
    adapt: AdaptOptions = section(AdaptOptions)
    curate: CurateConfig = section(CurateConfig)
    model: ModelConfig = section(ModelConfig)
    train: TrainConfig = section(_adapt_train_defaults)  # type: ignore[arg-type]
    lora: LoraConfig = section(LoraConfig)
    adversarial: AdversarialConfig = section(AdversarialConfig)

    def validate(self) -> None:
        if self.adversarial.method == "plae":
            raise ConfigError("adversarial.method=plae works with classify only: it retrains on labelled adversarial "
                              "embeddings (for language modelling use fgm, pgd, freelb, smart, r3f, vat or neftune)")


# ----------------------------------------------------------------------------------------------
# the corpus


def sha(text: str) -> str:
    """sha256 hex of a text; equals `honelm.data.splits.content_hash` of a single-text row."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def combined(hashes: Iterable[str]) -> str:
    return sha("\n".join(sorted(hashes)))


def mode_of(cfg: AdaptConfig) -> str:
    """dapt | tapt | dapt+tapt | curated_tapt, from which text is configured (module docstring)."""
    domain, task = bool(cfg.data.train), bool(cfg.task.train)
    if not domain and not task:
        raise ConfigError("nothing to adapt on: set data.train (a domain corpus, DAPT) and/or task.train "
                          "(the labelled task whose train text TAPT uses)")
    if cfg.curate.k < 0:
        raise ConfigError(f"curate.k must be >= 0, got {cfg.curate.k}")
    if cfg.curate.k > 0 and not (domain and task):
        raise ConfigError("curate.k > 0 picks domain documents near the task's texts: it needs both data.train "
                          "(the domain pool) and task.train")
    if cfg.adapt.task_extra and not task:
        raise ConfigError("adapt.task_extra is extra TAPT text: it needs task.train (whose val/test texts the leak "
                          "guard keeps out of it)")
    if not 0.0 <= cfg.adapt.val_fraction < 1.0:
        raise ConfigError(f"adapt.val_fraction must be in [0, 1), got {cfg.adapt.val_fraction}")
    if cfg.curate.k > 0:
        return "curated_tapt"
    return "dapt+tapt" if domain and task else ("dapt" if domain else "tapt")


def leak_guard(task_splits: Any) -> tuple[set[str], dict[str, Any]]:
    """Hashes no adaptation text may have: every task val text and pair half, val/ratio-test rows.

    Val rows are read from `splits.val` (training may read val); test rows only through the
    manifest's `example_hashes`, which exist for a ratio split. A user test file's rows are
    never parsed outside `honelm test`, so they are not covered (recorded in `covers`).
    """
    hashes: set[str] = set()
    for e in task_splits.val:
        hashes.add(sha(e.text))
        if getattr(e, "text_pair", None):
            hashes.add(sha(e.text_pair))
    example_hashes = task_splits.manifest.get("example_hashes", {})
    hashes.update(example_hashes.get("val", []))
    test_rows = example_hashes.get("test")
    hashes.update(test_rows or [])
    covers = ["val"] + (["test"] if test_rows is not None else [])
    info = {"hashes": len(hashes), "covers": covers}
    if test_rows is None:
        info["not_covered"] = (f"test rows of the user test file {task_splits.manifest.get('test_source')}: only "
                               "`honelm test` reads it; check task_extra against it yourself")
    return hashes, info


def _in_val_slice(text_hash: str, seed: int, fraction: float) -> bool:
    """A fixed pseudo-random choice per (seed, content): the same text is always on the same side."""
    if fraction <= 0:
        return False
    u = int(hashlib.sha256(f"{seed}\0{text_hash}".encode()).hexdigest()[:16], 16) / 16**16
    return u < fraction


@dataclass
class Corpus:
    """The adaptation text: what trains, what validates (per source), and its record."""

    train: list[Document] = field(default_factory=list)
    val: dict[str, list[Document]] = field(default_factory=dict)
    queries: list[Document] = field(default_factory=list)  # task train texts that curated TAPT searches from
    pool: list[Document] = field(default_factory=list)  # domain documents curated TAPT picks from
    domain_splits: Any = None
    task_splits: Any = None
    record: dict[str, Any] = field(default_factory=dict)


def _guarded(docs: list[Document], guard: set[str], seen: set[str] | None = None) -> tuple[list[Document], int, int]:
    """Drop leak-guarded texts (and, with `seen`, exact repeats); return (kept, leaked, repeats)."""
    kept, leaked, repeats = [], 0, 0
    for d in docs:
        h = sha(d.text)
        if h in guard:
            leaked += 1
        elif seen is not None and h in seen:
            repeats += 1
        else:
            if seen is not None:
                seen.add(h)
            kept.append(d)
    return kept, leaked, repeats


def build_corpus(cfg: AdaptConfig, mode: str, say: Callable[[str], None]) -> Corpus:
    """Read, split and guard the text (curated picks are added later: they need the model)."""
    corpus = Corpus()
    guard: set[str] = set()
    record: dict[str, Any] = {"mode": mode, "sources": {}}
    if cfg.task.train:
        say("task split (the same settings give classify the same split):")
        corpus.task_splits = S.labelled_splits(cfg.task, say)
        guard, record["leak_guard"] = leak_guard(corpus.task_splits)
        m = corpus.task_splits.manifest
        record["task_split"] = {k: m.get(k) for k in ("seed", "ratios", "counts", "hashes", "test_source")}
        seen: set[str] = set()
        task_docs = [Document(t, e.source, e.line) for e in corpus.task_splits.train
                     for t in (e.text, getattr(e, "text_pair", None)) if t]
        sources = [("task_train", task_docs)]
        if cfg.adapt.task_extra:
            sources.append(("task_extra", read_documents(cfg.adapt.task_extra.split(","), unit=cfg.data.unit,
                                                         text_field=cfg.task.text_field)))
        train_part: list[Document] = []
        val_part: list[Document] = []
        for name, docs in sources:
            kept, leaked, repeats = _guarded(docs, guard, seen)
            to_val = [d for d in kept if _in_val_slice(sha(d.text), cfg.task.seed, cfg.adapt.val_fraction)]
            val_ids = {id(d) for d in to_val}
            to_train = [d for d in kept if id(d) not in val_ids]
            train_part += to_train
            val_part += to_val
            if name == "task_train":
                corpus.queries = to_train
            record["sources"][name] = {"texts": len(docs), "excluded_as_task_val_test": leaked,
                                       "exact_repeats_dropped": repeats, "train": len(to_train), "val": len(to_val),
                                       "train_hashes": sorted(sha(d.text) for d in to_train),
                                       "val_hashes": sorted(sha(d.text) for d in to_val)}
            if leaked:
                say(f"leak guard: {leaked} {name} text(s) equal a task validation/test text and were excluded")
        corpus.train += train_part
        if val_part:
            corpus.val["task"] = val_part
    if cfg.data.train:
        say("domain corpus split:")
        corpus.domain_splits = S.text_splits(cfg.data, say)
        kept, leaked, _ = _guarded(list(corpus.domain_splits.train), guard)
        val_kept, val_leaked, _ = _guarded(list(corpus.domain_splits.val), guard)
        if leaked + val_leaked:
            say(f"leak guard: {leaked + val_leaked} domain document(s) equal a task validation/test text "
                "and were excluded")
        entry = {"documents": len(corpus.domain_splits.train), "excluded_as_task_val_test": leaked + val_leaked,
                 "train_sha256": combined(sha(d.text) for d in kept),
                 "note": "per-document hashes: split_manifest.json example_hashes"}
        if mode == "curated_tapt":
            corpus.pool = kept
            entry["role"] = "pool for curated picks"
        else:
            corpus.train += kept
            if val_kept:
                corpus.val["domain"] = val_kept
            entry.update(role="trains", train=len(kept), val=len(val_kept))
        record["sources"]["domain"] = entry
    corpus.record = record
    return corpus


def curate(corpus: Corpus, cfg: CurateConfig, model: torch.nn.Module, tokenizer: Any, device: torch.device,
           say: Callable[[str], None]) -> list[dict[str, Any]]:
    """Add the k nearest pool documents of every task training text to corpus.train; return the picks."""
    queries, pool = [d.text for d in corpus.queries], [d.text for d in corpus.pool]
    if not queries or not pool:
        raise HonelmError("curated TAPT needs task training texts and domain documents; one of them is empty")
    say(f"curate: {cfg.k} nearest of {len(pool)} domain documents for each of {len(queries)} task texts ({cfg.method})")
    start = time.perf_counter()
    if cfg.method == "tfidf":
        q, p = tfidf_vectors(queries, pool)
    else:
        model.to(device)
        q = embed_texts(model, tokenizer, queries, cfg.max_length, cfg.batch_size, device)
        p = embed_texts(model, tokenizer, pool, cfg.max_length, cfg.batch_size, device)
    idx, sims = nearest(q, p, cfg.k)
    picks, chosen, unrelated = [], set(), 0
    for qi, (row, sim_row) in enumerate(zip(idx.tolist(), sims.tolist())):
        found = []
        for j, s in zip(row, sim_row):
            if s <= 0:  # nothing in common (tf-idf: no shared word): not a neighbour
                unrelated += 1
                continue
            found.append({"source": corpus.pool[j].source, "line": corpus.pool[j].line, "similarity": round(s, 6)})
            chosen.add(j)
        picks.append({"task_text_sha256": sha(queries[qi]), "picks": found})
    added = [corpus.pool[j] for j in sorted(chosen)]
    seen = {sha(d.text) for d in corpus.train} | {sha(d.text) for docs in corpus.val.values() for d in docs}
    added, _, repeats = _guarded(added, set(), seen)
    corpus.train += added
    corpus.record["sources"]["curated"] = {"k": cfg.k, "method": cfg.method, "picked": len(chosen), "added": len(added),
                                           "already_in_corpus": repeats, "unrelated_skipped": unrelated,
                                           "hashes": sorted(sha(d.text) for d in added)}
    say(f"curate: {len(chosen)} distinct domain documents picked, {len(added)} added to the TAPT corpus "
        f"({time.perf_counter() - start:.0f} s)")
    return picks


# ----------------------------------------------------------------------------------------------
# model, rows, metrics


def init_kind(model_cfg: ModelConfig) -> str:
    """encoder | decoder of the model `model.*` will give, read from its config (no weights loaded)."""
    if not model_cfg.init_from:
        return model_cfg.arch
    return kind_of_dir(resolve_model_dir(model_cfg.init_from), model_cfg.trust_remote_code)


def kind_of_dir(path: str | Path, trust_remote_code: bool = False) -> str:
    """encoder | decoder of a model directory, hub id, or LoRA adapter directory (its base decides)."""
    from transformers import AutoConfig

    source: str | Path = path
    local = Path(path)
    if local.is_dir() and not (local / "config.json").is_file() and (local / "adapter_config.json").is_file():
        from honelm.boosters.lora import adapter_info

        source = adapter_info(path)["base_model_name_or_path"]
    try:
        config = AutoConfig.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    except Exception as err:  # hub/IO errors come in many types; all mean "could not get it"
        raise HonelmError(f"could not read the model config of {path}: {err}") from err
    return model_kind(config)


def report_new_head(model: torch.nn.Module, say: Callable[[str], None]) -> list[str]:
    """Say whether load_model had to create the LM head (e.g. a BertModel checkpoint for MLM)."""
    new = list(getattr(model, "honelm_new_weights", []) or [])
    if not new:
        return new
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    tied = out is not None and out.weight is inp.weight
    say(f"model: the checkpoint has no LM head: created one ({', '.join(new)}); "
        + ("its output layer is tied to the input embeddings" if tied else "its output layer is newly initialised"))
    return new


def make_rows(kind: str, tokenizer: Any, texts: list[str], cfg: AdaptConfig, packed: bool, rank: int = 0
              ) -> MLMRows | PackedBlocks:
    if kind == "decoder":
        return pack(tokenizer, texts, cfg.data.block_size)
    build = pack_mlm if packed else documents_mlm
    rows = build(tokenizer, texts, cfg.data.block_size, cfg.adapt.mlm_probability)
    rows.rank = rank
    return rows


def pack_blocks(cfg: AdaptConfig, mode: str) -> bool:
    if cfg.data.pack != "auto":
        return cfg.data.pack == "blocks"
    return mode in ("dapt", "dapt+tapt")


def loss_sums(model: torch.nn.Module, rows: MLMRows | PackedBlocks, batch_size: int, seed: int,
              device: torch.device) -> tuple[float, int, float]:
    """(summed NLL, units, correct) over every row: MLM with the fixed mask of `seed`, or CLM."""
    if isinstance(rows, MLMRows):
        objective: Objective = MaskedLM()
        batches: Iterable[dict] = rows.fixed_batches(batch_size, seed)
    else:
        objective = CausalLM()
        batches = (rows.collate(list(range(s, min(s + batch_size, len(rows)))))
                   for s in range(0, len(rows), batch_size))
    nll, units, correct = 0.0, 0, 0.0
    for batch in batches:
        loss = objective(model, {k: v.to(device) for k, v in batch.items()})
        nll += float(loss.value)
        units += int(loss.units)
        correct += float(loss.metrics.get("accuracy", 0.0))
    return nll, units, correct


def lm_scores(sums: dict[str, tuple[float, int, float]], rows: dict[str, Any], prefix: str) -> dict[str, float]:
    """loss (nats per target token), perplexity, and MLM accuracy or CLM bits-per-byte, overall and per source."""
    def one(nll: float, units: int, correct: float, blocks: list[Any], name: str) -> dict[str, float]:
        mean = nll / max(units, 1)
        out = {f"{name}_loss": mean, f"{name}_ppl": math.exp(min(mean, 50.0))}
        if isinstance(blocks[0], MLMRows):
            out[f"{name}_accuracy"] = correct / max(units, 1)
        else:
            out[f"{name}_bpb"] = bits_per_byte(nll, sum(b.n_bytes for b in blocks))
        return out

    total = [sum(s[i] for s in sums.values()) for i in range(3)]
    metrics = one(total[0], int(total[1]), total[2], list(rows.values()), prefix)
    if len(sums) > 1:
        for name, (nll, units, correct) in sums.items():
            metrics.update(one(nll, units, correct, [rows[name]], f"{prefix}_{name}"))
    return metrics


def val_seed(cfg: AdaptConfig, source: str) -> int:
    """The fixed mask seed of a validation set: its split seed, so run.seed never changes val numbers."""
    return cfg.task.seed if source == "task" else cfg.data.seed


# ----------------------------------------------------------------------------------------------
# run


def _check_resume(run_dir: Path, record: dict[str, Any]) -> None:
    path = run_dir / "adapt_corpus.json"
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old.get("train", {}).get("sha256") != record["train"]["sha256"]:
            raise HonelmError(f"{run_dir}: the adaptation corpus differs from the one this run started with "
                              "(data files, split settings or curated picks changed); start a new run")


def run(cfg: AdaptConfig, resume: str | None = None, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    runtime = rt.setup(cfg.train.threads)
    rt.seed_everything(cfg.run.seed)
    mode = mode_of(cfg)
    kind = init_kind(cfg.model)
    if mode == "curated_tapt" and cfg.curate.method == "embedding" and not cfg.model.init_from:
        raise ConfigError("curate.method=embedding compares texts with the starting model, but there is no "
                          "model.init_from (a random model's embeddings mean nothing): use curate.method=tfidf")
    run_dir = S.run_directory("adapt", cfg, runtime, resume)
    tracker = S.tracker_for(run_dir, runtime, cfg)
    say = tracker.say
    if not cfg.model.init_from:
        say("note: no model.init_from: adapting a randomly initialised preset (this is pre-training, not adaptation)")
    corpus = build_corpus(cfg, mode, say)
    if corpus.domain_splits is not None:
        S.write_json(run_dir / "split_manifest.json", corpus.domain_splits.manifest, runtime)
    if corpus.task_splits is not None:
        S.write_json(run_dir / "task_split_manifest.json", corpus.task_splits.manifest, runtime)
    # a tokenizer trained here is trained once (main process) and reloaded on --resume: WordPiece
    # training is not deterministic, and other ids would make the resumed run see other data
    tokenizer = S.resolve_tokenizer(cfg.model, run_dir, lambda: [d.text for d in corpus.train],
                                    "wordpiece" if kind == "encoder" else "bpe", say, runtime, resume is not None)
    task = "mlm" if kind == "encoder" else "lm"
    model = S.resolve_model(cfg.model, task, tokenizer, cfg.run.seed, say,
                            carry=boosters.carries_adapter(cfg, "adapt"))
    report_new_head(model, say)
    S.check_block_fits(model, cfg.data.block_size, "data.block_size")
    if kind == "encoder" and (tokenizer.mask_token_id is None or tokenizer.cls_token_id is None):
        raise ConfigError("masked LM needs a tokenizer with mask, CLS and SEP tokens (a WordPiece/BERT-style "
                          "tokenizer); this one has none: use the checkpoint's own tokenizer")
    if kind == "encoder" and len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary only "
                          f"{model.get_input_embeddings().num_embeddings}: use the checkpoint's own tokenizer")

    picks = curate(corpus, cfg.curate, model, tokenizer, runtime.device, say) if mode == "curated_tapt" else None
    if not corpus.train:
        raise HonelmError("the adaptation corpus is empty after the leak guard and the validation slice")
    corpus.record["train"] = {"texts": len(corpus.train), "sha256": combined(sha(d.text) for d in corpus.train)}
    corpus.record["val"] = {name: {"texts": len(docs), "sha256": combined(sha(d.text) for d in docs)}
                            for name, docs in corpus.val.items()}
    if resume:
        _check_resume(run_dir, corpus.record)
    S.write_json(run_dir / "adapt_corpus.json", corpus.record, runtime)
    if picks is not None and runtime.is_main:
        with open(run_dir / "curated.jsonl", "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in picks)

    model = boosters.apply(model, cfg, task, say)
    packed = kind == "decoder" or pack_blocks(cfg, mode)
    train_rows = make_rows(kind, tokenizer, [d.text for d in corpus.train], cfg, packed, runtime.rank)
    val_rows = {name: make_rows(kind, tokenizer, [d.text for d in docs], cfg, packed)
                for name, docs in corpus.val.items()}
    layout = "packed blocks" if packed else "one document per row"
    objective_name = "masked" if kind == "encoder" else "causal"
    say(f"data ({mode}, {objective_name} LM, {layout} of <= {cfg.data.block_size} tokens): "
        f"{len(corpus.train)} training texts -> {len(train_rows)} rows; validation: "
        + (", ".join(f"{n} {len(corpus.val[n])} texts" for n in val_rows) or "none"))
    for name, rows in (("train", train_rows), *val_rows.items()):
        cut = getattr(rows, "truncated", 0)
        if cut:
            say(f"note: {cut} {name} documents are longer than data.block_size={cfg.data.block_size} "
                "and were truncated (data.pack=blocks keeps all of their text)")
    lengths = None if packed else train_rows.lengths  # type: ignore[union-attr]
    stream = BatchStream(len(train_rows), train_rows.collate, cfg.train.batch_size, cfg.train.grad_accum, cfg.run.seed,
                         runtime.world_size, runtime.rank, lengths=lengths)

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        sums = {name: loss_sums(m, rows, cfg.train.eval_batch_size, val_seed(cfg, name), runtime.device)
                for name, rows in val_rows.items()}
        return lm_scores(sums, val_rows, "val")

    objective = boosters.objective(MaskedLM() if kind == "encoder" else CausalLM(), cfg, tokenizer, say)
    plan = TrainPlan(objective, stream, evaluate if val_rows else None,
                     lambda m, info: save_pretrained_atomic(m, tokenizer, run_dir / "best", info),
                     cfg.train.metric or "val_loss",
                     best_writes_base=functools.partial(best_writes_base, model, run_dir))
    result = fit(model, plan, cfg.train, runtime, run_dir, tracker=tracker, resume=resume is not None,
                 callbacks=callbacks)
    tracker.close()
    return {"run_dir": str(run_dir), "mode": mode, "steps": result.steps, "reason": result.reason,
            "best_step": result.best_step, "stop_requested": result.stop_requested, **result.last_eval}


def evaluate_test(run_dir: Path, cfg: AdaptConfig, test_docs: list[Any]) -> dict[str, float]:
    """Held-out domain loss of the best model on the domain corpus's test split (only honelm.protocol.test calls it)."""
    from honelm.models import load_model
    from honelm.tokenizer import load_tokenizer

    device = rt.setup().device
    best = run_dir / "best"
    if not ((best / "config.json").is_file() or (best / "adapter_config.json").is_file()):  # LoRA: an adapter dir
        raise HonelmError(f"{run_dir}: no best/ model to test")
    tokenizer = load_tokenizer(best)
    kind = kind_of_dir(best, cfg.model.trust_remote_code)
    model = load_model(best, "mlm" if kind == "encoder" else "lm").to(device).eval()
    packed = kind == "decoder" or pack_blocks(cfg, mode_of(cfg))
    rows = make_rows(kind, tokenizer, [d.text for d in test_docs], cfg, packed)
    with torch.no_grad():
        sums = {"domain": loss_sums(model, rows, cfg.train.eval_batch_size, cfg.data.seed, device)}
    out: dict[str, Any] = lm_scores(sums, {"domain": rows}, "test")
    out["n_documents"] = len(test_docs)
    return out
