"""The text `honelm adapt` trains and validates on: its mode, the leak guard, the TAPT validation slice,
curated picks, and the record of it all (RUN/adapt_corpus.json).

The text decides the mode (`mode_of`; Gururangan et al. 2020, METHODS.md section 2):

* DAPT: `data.train` (a domain corpus) only, split by `data.split` exactly like `pretrain` splits
  its corpus; the train split trains, the val split validates, the test split is read only by
  `honelm test` (held-out domain loss).
* TAPT: `task.train` only. `task` has exactly the labelled-data fields of `classify`, so the same
  values give the same split; the corpus is the text of the task's TRAIN split (and its pair
  texts) plus optional unlabelled `adapt.task_extra`, never val or test text.
* DAPT+TAPT in one run: both set, both corpora train together (the paper runs them one after the
  other: chain two runs with `model.init_from` for that).
* Curated TAPT: both set and `curate.k > 0`: the task text plus the k nearest domain documents of
  every task training text (`curate`, searched by `honelm.data.curate`); the rest of the domain
  corpus is not used.

The leak guard: every candidate text (task train, extra, domain, curated) whose sha256 equals a
task validation text (or pair half), or a validation/ratio-test row of the task's split manifest,
is dropped and counted. A user-supplied task test FILE is not covered: reading it is `honelm
test`'s privilege (its bytes are only hashed by the split).

TAPT validation: a slice of the TAPT texts chosen by content hash (`adapt.val_fraction`, seeded by
task.seed), so the same text is always on the same side; the task's own val/test splits are never
used for this.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Literal

import torch

from honelm.bounds import at_least
from honelm.data.curate import embed_texts, nearest, tfidf_vectors
from honelm.data.large_corpus import CorpusPart, corpus_splits
from honelm.data.readers import Document, read_documents
from honelm.data.sources import labelled_splits
from honelm.errors import ConfigError, HonelmError


@dataclass
class CurateConfig:
    """Curated TAPT: add the nearest domain documents of every task training text."""

    k: Annotated[int, at_least(0)] = 0
    """Nearest domain documents added per task training text (needs data.train and task.train); 0 = no curation."""
    method: Literal["embedding", "tfidf"] = "embedding"
    """Similarity: cosine of the starting model's mean-pooled hidden states, or of TF-IDF word vectors."""
    max_length: Annotated[int, at_least(1)] = 128
    """Tokens per text when embedding (longer texts are truncated for the similarity only)."""
    batch_size: Annotated[int, at_least(1)] = 64
    """Texts per forward pass when embedding."""


def sha(text: str) -> str:
    """sha256 hex of a text; equals `honelm.data.splits.content_hash` of a single-text row."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def combined(hashes: Iterable[str]) -> str:
    return sha("\n".join(sorted(hashes)))


def mode_of(cfg: Any) -> str:
    """dapt | tapt | dapt+tapt | curated_tapt, from which text an adapt config names (module docstring).

    Also refuses what no corpus can be built from: no text, curation without both texts or (by
    embedding) without a starting model, task_extra without a task, a validation share outside [0, 1).
    """
    domain, task = bool(cfg.data.train), bool(cfg.task.train)
    if not domain and not task:
        raise ConfigError("nothing to adapt on: set data.train (a domain corpus, DAPT) and/or task.train "
                          "(the labelled task whose train text TAPT uses)")
    if cfg.curate.k < 0:
        raise ConfigError(f"curate.k must be >= 0, got {cfg.curate.k}")
    if cfg.curate.k > 0 and not (domain and task):
        raise ConfigError("curate.k > 0 picks domain documents near the task's texts: it needs both data.train "
                          "(the domain pool) and task.train")
    if cfg.adapt.task_guard_only and not (domain and task):
        raise ConfigError("adapt.task_guard_only=true guards a domain corpus against a task's validation/test text: "
                          "it needs both data.train (the domain corpus) and task.train (the task)")
    if cfg.adapt.task_guard_only and (cfg.adapt.task_extra or cfg.curate.k > 0):
        raise ConfigError("adapt.task_guard_only=true adds no task text, so adapt.task_extra and curate.k have "
                          "nothing to join: leave them unset")
    if cfg.adapt.task_extra and not task:
        raise ConfigError("adapt.task_extra is extra TAPT text: it needs task.train (whose val/test texts the leak "
                          "guard keeps out of it)")
    if not 0.0 <= cfg.adapt.val_fraction < 1.0:
        raise ConfigError(f"adapt.val_fraction must be in [0, 1), got {cfg.adapt.val_fraction}")
    if cfg.curate.k > 0 and cfg.curate.method == "embedding" and not cfg.model.init_from:
        raise ConfigError("curate.method=embedding compares texts with the starting model, but there is no "
                          "model.init_from (a random model's embeddings mean nothing): use curate.method=tfidf")
    if cfg.curate.k > 0:
        return "curated_tapt"
    if cfg.adapt.task_guard_only:
        return "dapt"
    return "dapt+tapt" if domain and task else ("dapt" if domain else "tapt")


def packed_rows(pack: str, kind: str, mode: str) -> bool:
    """Whether rows are packed blocks: always for a decoder; for MLM per `data.pack`, whose `auto` packs
    when the domain corpus trains (DAPT) and keeps one document per row when all text is the task's."""
    if kind == "decoder" or pack != "auto":
        return kind == "decoder" or pack == "blocks"
    return mode in ("dapt", "dapt+tapt")


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
                               "`honelm test` reads it; check extra text (adapt.task_extra, distill's data.unlabelled) "
                               "against it yourself")
    return hashes, info


def _in_val_slice(text_hash: str, seed: int, fraction: float) -> bool:
    """A fixed pseudo-random choice per (seed, content): the same text is always on the same side."""
    if fraction <= 0:
        return False
    u = int(hashlib.sha256(f"{seed}\0{text_hash}".encode()).hexdigest()[:16], 16) / 16**16
    return u < fraction


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


@dataclass
class Corpus:
    """The adaptation text: what trains, what validates (per source), and its record.

    Filled in this order: `add_task` (sets the leak guard), `add_domain`, `curate` (curated TAPT
    only: it needs the model), `save` (the train/val hashes the record and a resume check use).
    """

    mode: str
    train: list[Document] = field(default_factory=list)
    val: dict[str, list[Document]] = field(default_factory=dict)
    queries: list[Document] = field(default_factory=list)  # task train texts that curated TAPT searches from
    pool: list[Document] = field(default_factory=list)  # domain documents curated TAPT picks from
    domain_splits: Any = None
    task_splits: Any = None
    guard: set[str] = field(default_factory=set)
    picks: list[dict[str, Any]] | None = None  # curated TAPT: the neighbours of every task text (`curate`)
    record: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.record = self.record or {"mode": self.mode, "sources": {}}

    def add_task(self, splits: Any, extra: list[Document] | None, seed: int, val_fraction: float,
                 say: Callable[[str], None], guard_only: bool = False) -> None:
        """The task's train texts (and pair texts) plus `extra`, guarded, minus the validation slice.

        `guard_only` (adapt.task_guard_only): the task sets the leak guard and adds no text (DAPT).
        """
        self.task_splits = splits
        self.guard, self.record["leak_guard"] = leak_guard(splits)
        m = splits.manifest
        self.record["task_split"] = {k: m.get(k) for k in ("seed", "ratios", "counts", "hashes", "test_source")}
        if guard_only:
            self.record["task_split"]["role"] = "leak guard only (adapt.task_guard_only): no task text trains"
            return
        seen: set[str] = set()
        task_docs = [Document(t, e.source, e.line) for e in splits.train
                     for t in (e.text, getattr(e, "text_pair", None)) if t]
        sources = [("task_train", task_docs)] + ([("task_extra", extra)] if extra is not None else [])
        val_part: list[Document] = []
        for name, docs in sources:
            kept, leaked, repeats = _guarded(docs, self.guard, seen)
            to_val = [d for d in kept if _in_val_slice(sha(d.text), seed, val_fraction)]
            val_ids = {id(d) for d in to_val}
            to_train = [d for d in kept if id(d) not in val_ids]
            self.train += to_train
            val_part += to_val
            if name == "task_train":
                self.queries = to_train
            self.record["sources"][name] = {
                "texts": len(docs), "excluded_as_task_val_test": leaked, "exact_repeats_dropped": repeats,
                "train": len(to_train), "val": len(to_val), "train_hashes": sorted(sha(d.text) for d in to_train),
                "val_hashes": sorted(sha(d.text) for d in to_val)}
            if leaked:
                say(f"leak guard: {leaked} {name} text(s) equal a task validation/test text and were excluded")
        if val_part:
            self.val["task"] = val_part

    def add_domain(self, splits: Any, say: Callable[[str], None]) -> None:
        """The domain corpus's train/val documents, guarded: they train, or (curated TAPT) are the pool."""
        self.domain_splits = splits
        if isinstance(splits.train, CorpusPart):  # streamed (data.memmap): DAPT alone, so no guard applies
            self.train, hashes = splits.train, splits.manifest["hashes"]  # type: ignore[assignment]
            if len(splits.val):
                self.val["domain"] = splits.val
            self.record["sources"]["domain"] = {
                "documents": len(splits.train), "excluded_as_task_val_test": 0, "train_sha256": hashes["train"],
                "note": "streamed from a memory-mapped token file (data.memmap)", "role": "trains",
                "train": len(splits.train), "val": len(splits.val)}
            return
        kept, leaked, _ = _guarded(list(splits.train), self.guard)
        val_kept, val_leaked, _ = _guarded(list(splits.val), self.guard)
        if leaked + val_leaked:
            say(f"leak guard: {leaked + val_leaked} domain document(s) equal a task validation/test text "
                "and were excluded")
        entry = {"documents": len(splits.train), "excluded_as_task_val_test": leaked + val_leaked,
                 "train_sha256": combined(sha(d.text) for d in kept),
                 "note": "per-document hashes: split_manifest.json example_hashes"}
        if self.mode == "curated_tapt":
            self.pool = kept
            entry["role"] = "pool for curated picks"
        else:
            self.train += kept
            if val_kept:
                self.val["domain"] = val_kept
            entry.update(role="trains", train=len(kept), val=len(val_kept))
        self.record["sources"]["domain"] = entry

    def save(self, run_dir: Path, resume: bool, main: bool = True) -> None:
        """Seal the corpus and write its record as RUN/adapt_corpus.json (curated picks as RUN/curated.jsonl).

        An empty corpus is refused; a resumed run must find the corpus it started with.
        """
        if not self.train:
            raise HonelmError("the adaptation corpus is empty after the leak guard and the validation slice")
        self.record["train"] = {"texts": len(self.train), "sha256": _combined(self.train, self.domain_splits, "train")}
        self.record["val"] = {name: {"texts": len(docs), "sha256": _combined(docs, self.domain_splits, "val")}
                              for name, docs in self.val.items()}
        if resume:
            check_resume(run_dir, self.record)
        if not main:
            return
        (run_dir / "adapt_corpus.json").write_text(json.dumps(self.record, indent=2, ensure_ascii=False, default=str),
                                                   encoding="utf-8")
        if self.picks is not None:
            lines = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in self.picks)
            (run_dir / "curated.jsonl").write_text(lines, encoding="utf-8")


def _combined(docs: Any, splits: Any, name: str) -> str:
    """`combined` of the documents' hashes; a streamed split's equal hash from its manifest (no text re-read)."""
    return splits.manifest["hashes"][name] if isinstance(docs, CorpusPart) else combined(sha(d.text) for d in docs)


def domain_splits(cfg: Any, kind: str, say: Callable[[str], None], leak_texts: list[str] | None = None) -> Any:
    """The domain corpus's split: streamed (data.memmap, `corpus_splits`) only when a decoder adapts on it alone;
    task text (leak guard, mixing) and masked LM rows need it in memory."""
    blocked = ("task text or masked-LM adaptation (adapt streams the domain corpus only for a decoder adapting on it "
               "alone: task text needs the leak guard, masked LM its rows in memory)"
               if cfg.task.train or kind != "decoder" else "")
    return corpus_splits(cfg.data, say, leak_texts, blocked)


def build_corpus(cfg: Any, mode: str, say: Callable[[str], None], kind: str = "decoder") -> Corpus:
    """Read, split and guard the text of an adapt config (curated picks are added later: they need the model).

    The labelled task and the domain corpus are split by `labelled_splits` and `text_splits`, as
    classify and pretrain split them, so the same settings give the same splits.
    """
    corpus = Corpus(mode)
    if cfg.task.train:
        say("task split (the same settings give classify the same split):")
        splits = labelled_splits(cfg.task, say, section="task")
        extra = (read_documents(cfg.adapt.task_extra.split(","), unit=cfg.data.unit, text_field=cfg.task.text_field)
                 if cfg.adapt.task_extra else None)
        corpus.add_task(splits, extra, cfg.task.seed, cfg.adapt.val_fraction, say, cfg.adapt.task_guard_only)
    if cfg.data.train:
        say("domain corpus split:")
        corpus.add_domain(domain_splits(cfg, kind, say), say)
    return corpus


def curate(corpus: Corpus, cfg: CurateConfig, model: torch.nn.Module, tokenizer: Any, device: torch.device,
           say: Callable[[str], None]) -> list[dict[str, Any]]:
    """Add the k nearest pool documents of every task training text to corpus.train; keep and return the picks."""
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
    corpus.picks = picks
    return picks


def check_resume(run_dir: Path, record: dict[str, Any]) -> None:
    """Refuse to resume a run whose sealed corpus differs from the one RUN/adapt_corpus.json recorded."""
    path = run_dir / "adapt_corpus.json"
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old.get("train", {}).get("sha256") != record["train"]["sha256"]:
            raise HonelmError(f"{run_dir}: the adaptation corpus differs from the one this run started with "
                              "(data files, split settings or curated picks changed); start a new run")
