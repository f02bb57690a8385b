"""Steps every stage shares: the run directory, data splits, tokenizer and model resolution.

A stage module keeps to its own logic (which objective, which batches, which metrics); this
module owns how a run directory is created and resumed, how `data.*` becomes train/val splits
(never test: only `honelm test` reads that, through `honelm.protocol.testset`), and how
`model.*` becomes a tokenizer and a model.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from honelm import __version__
from honelm import config as C
from honelm.adapters import is_adapter_dir
from honelm.checkpoint import list_checkpoints, resolve_model_dir
from honelm.data.readers import read_documents, read_examples
from honelm.data.splits import make_splits, parse_ratios
from honelm.errors import ConfigError, HonelmError
from honelm.models import LoadedModel, build_model, count_parameters, load_checkpoint, load_for_carry
from honelm.runtime import Runtime
from honelm.tokenizer import load_tokenizer, train_tokenizer
from honelm.tracking import Tracker


@dataclass
class SplitDataConfig:
    """Where the data comes from and how it is split into train / validation / test."""

    train: str = ""
    """Training data: a file, directory or glob (comma-separated for several)."""
    val: str = ""
    """Validation data file; empty = split off the training data by data.split."""
    test: str = ""
    """Test data file, read only by `honelm test`; empty = split off the training data."""
    split: str = "8:1:1"
    """train:val:test ratios for what is split off (8:1:1 default; 6:2:2 accepted)."""
    seed: int = 0
    """Split seed, separate from run.seed so training seeds never change the split."""
    dedup: bool = False
    """Remove from train the exact and near duplicates of validation/test texts (always reported)."""
    near_dup_threshold: float = 0.8
    """Jaccard similarity of word 3-gram shingles at or above which two texts count as near duplicates (one changed word in 20 gives about 0.7)."""


# ----------------------------------------------------------------------------------------------
# run directory


def _broadcast_str(runtime: Runtime, value: str) -> str:
    if not runtime.distributed:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _any_checkpoint(run_dir: Path) -> bool:
    """Training checkpoints in the run, or in a sub-run it keeps (plae's teacher in RUN/plae_teacher/)."""
    if list_checkpoints(run_dir / "checkpoints"):
        return True
    return any(list_checkpoints(sub / "checkpoints") for sub in run_dir.iterdir() if sub.is_dir())


def run_directory(stage: str, cfg: Any, runtime: Runtime, resume: str | None) -> Path:
    """Create (or, with resume, reopen) the run directory and point `latest` at it.

    An existing non-empty directory is refused, except with `run.overwrite=true` on a honelm run
    without checkpoints: its old files are removed first, so the new run's logs are not mixed
    with the old one's. A directory that is not a honelm run (no run.json) is never removed.
    """
    if resume:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            raise HonelmError(f"{resume}: not a run directory (no config.yaml)")
        if not _any_checkpoint(run_dir):
            raise HonelmError(f"{resume}: nothing to resume (no checkpoint under {run_dir / 'checkpoints'})")
        return run_dir
    out = Path(cfg.run.out_dir or f"runs/{stage}")
    name = _broadcast_str(runtime, cfg.run.name or time.strftime("%Y%m%d-%H%M%S"))
    run_dir = out / name
    if runtime.is_main:
        if run_dir.exists() and any(run_dir.iterdir()):
            if _any_checkpoint(run_dir):
                raise HonelmError(f"{run_dir} already holds a run: resume it with `honelm {stage} --resume {run_dir}` "
                                  "or choose another run.name")
            if not cfg.run.overwrite:
                raise HonelmError(f"{run_dir} exists and is not empty; set run.overwrite=true or another run.name")
            if not (run_dir / "run.json").is_file():
                raise HonelmError(f"{run_dir} is not a honelm run directory (no run.json): run.overwrite does not "
                                  "remove other files; choose another run.name")
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        C.dump(cfg, run_dir / "config.yaml", header=f"# honelm {stage} --config {run_dir / 'config.yaml'}")
        info = {"stage": stage, "honelm_version": __version__, "argv": sys.argv, "started": time.time(),
                "world_size": runtime.world_size}
        (run_dir / "run.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
        link = out / "latest"
        tmp = out / f".latest-{os.getpid()}"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(name, tmp)
        os.replace(tmp, link)
    runtime.barrier()
    return run_dir


def stage_of(run_dir: Path) -> str:
    try:
        return json.loads((run_dir / "run.json").read_text(encoding="utf-8"))["stage"]
    except (OSError, KeyError, ValueError):
        raise HonelmError(f"{run_dir}: not a honelm run directory (no run.json)") from None


def load_run_config(run_dir: Path, cls: type) -> Any:
    return C.build(cls, run_dir / "config.yaml")


def tracker_for(run_dir: Path, runtime: Runtime, cfg: Any, total_steps: int = 0) -> Tracker:
    train = getattr(cfg, "train", None)
    return Tracker(run_dir, enabled=runtime.is_main, tensorboard=bool(train and train.tensorboard),
                   total_steps=total_steps, progress=bool(train is None or train.progress))


def write_json(path: Path, payload: Any, runtime: Runtime | None = None) -> None:
    if runtime is None or runtime.is_main:
        path.write_text(json.dumps(payload, indent=2, ensure_ascii=False, default=str), encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# tokenizer and model


def resolve_tokenizer(model_cfg: C.ModelConfig, run_dir: Path | None, train_texts: Callable[[], list[str]],
                      kind: Literal["bpe", "wordpiece"], say: Callable[[str], None], runtime: Runtime | None = None,
                      resume: bool = False) -> Any:
    """model.tokenizer, else the init_from checkpoint's, else one trained now on the train split.

    A tokenizer trained on the fly is saved in RUN/tokenizer and that copy is what a resumed run
    and the other processes of a distributed run load: tokenizer training is not guaranteed to
    give the same ids twice (WordPiece ties), so it must happen exactly once per run.
    """
    if model_cfg.tokenizer:
        return load_tokenizer(resolve_model_dir(model_cfg.tokenizer))
    if model_cfg.init_from:
        return load_tokenizer(resolve_model_dir(model_cfg.init_from))
    saved = run_dir / "tokenizer" if run_dir is not None else None
    if resume and saved is not None and (saved / "tokenizer.json").is_file():
        say(f"tokenizer: {saved} (trained when this run started)")
        return load_tokenizer(saved)
    tokenizer = None
    if runtime is None or runtime.is_main:
        say(f"no model.tokenizer given: training a {kind} tokenizer (vocab {model_cfg.vocab_size}) on the train split")
        tokenizer = train_tokenizer(train_texts(), kind=kind, vocab_size=model_cfg.vocab_size)
        if saved is not None:
            tokenizer.save_pretrained(saved)
    if runtime is not None and runtime.distributed:
        runtime.barrier()
        if not runtime.is_main:
            return load_tokenizer(saved)
    return tokenizer


def resolve_model(model_cfg: C.ModelConfig, task: str, tokenizer: Any, seed: int, say: Callable[[str], None],
                  num_labels: int | None = None, id2label: dict[int, str] | None = None,
                  carry: bool = False) -> LoadedModel:
    """Load init_from (re-headed for the task when needed) or build the preset from random init.

    A LoRA run as init_from is merged into its base, unless `carry` (`lora.carry`, see
    `honelm.boosters.carries_adapter`): then its base is loaded and the adapter, recorded in the
    returned record's `carry`, is attached again by `honelm.boosters.apply`.
    """
    if carry and not model_cfg.init_from:
        raise ConfigError("lora.carry=true continues the adapter of a LoRA run: set model.init_from to that run")
    if model_cfg.init_from:
        loaded = _load_init_from(model_cfg, task, num_labels, id2label, carry)
        new = loaded.new_weights
        if new:
            shown = ", ".join(new[:6]) + (f" and {len(new) - 6} more" if len(new) > 6 else "")
            say(f"newly initialised weights (not in the checkpoint): {shown}")
    else:
        loaded = _build_preset(model_cfg, task, tokenizer, seed, num_labels, id2label)
    _, total = count_parameters(loaded.model)
    say(f"model: {type(loaded.model).__name__} {loaded.origin}; {total / 1e6:.2f}M parameters")
    return loaded


def _load_init_from(model_cfg: C.ModelConfig, task: str, num_labels: int | None, id2label: dict[int, str] | None,
                    carry: bool) -> LoadedModel:
    path = resolve_model_dir(model_cfg.init_from)
    if not carry:
        return load_checkpoint(path, task, num_labels=num_labels, id2label=id2label,
                               trust_remote_code=model_cfg.trust_remote_code)
    if not is_adapter_dir(path):
        raise ConfigError(f"lora.carry=true: model.init_from={model_cfg.init_from} holds no LoRA adapter "
                          f"({path} has no adapter_config.json); set lora.carry=false to add a fresh adapter")
    return load_for_carry(path, task, num_labels=num_labels, id2label=id2label,
                          trust_remote_code=model_cfg.trust_remote_code)


def _build_preset(model_cfg: C.ModelConfig, task: str, tokenizer: Any, seed: int, num_labels: int | None,
                  id2label: dict[int, str] | None) -> LoadedModel:
    dropout = model_cfg.dropout
    extra = ({"attention_dropout": dropout} if model_cfg.arch == "decoder"
             else {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout})
    model = build_model(model_cfg.arch, model_cfg.size, vocab_size=len(tokenizer), task=task,
                        num_labels=num_labels, seed=seed, max_positions=model_cfg.max_positions,
                        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, **extra)
    if id2label is not None:
        model.config.id2label = dict(id2label)
        model.config.label2id = {v: k for k, v in id2label.items()}
    return LoadedModel.built(model, origin=f"{model_cfg.arch} preset '{model_cfg.size}', random init")


def check_block_fits(model: torch.nn.Module, length: int, what: str) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and length > limit:
        raise ConfigError(f"{what}={length} is longer than the model's max_position_embeddings={limit}")


# ----------------------------------------------------------------------------------------------
# data


def text_splits(data: Any, say: Callable[[str], None], leak_texts: list[str] | None = None) -> Any:
    """Documents for language modelling, split by data.split (or the given val/test files)."""
    if not data.train:
        raise ConfigError("data.train is empty: give a text file, directory or glob")
    docs = read_documents(data.train.split(","), unit=data.unit, text_field=data.text_field)
    val = read_documents(data.val.split(","), unit=data.unit, text_field=data.text_field) if data.val else None
    load_test = (lambda: read_documents(data.test.split(","), unit=data.unit, text_field=data.text_field)) \
        if data.test else None
    splits = make_splits(docs, ratios=parse_ratios(data.split), seed=data.seed, stratify=False, val=val,
                         load_test=load_test, test_path=data.test.split(",") if data.test else None, dedup=data.dedup,
                         near_dup_threshold=data.near_dup_threshold, test_texts_for_leak_check=leak_texts)
    _say_split(splits.manifest, say)
    return splits


def labelled_splits(data: Any, say: Callable[[str], None], leak_texts: list[str] | None = None) -> Any:
    """Labelled examples, split stratified by label (classification) by data.split.

    `leak_texts` (the texts of a user-supplied test file) is passed only by `honelm test`, which
    has already opened that file: training never reads it, so its duplicates are found then.
    """
    if not data.train:
        raise ConfigError("data.train is empty: give a labelled JSONL/JSON/CSV/TSV/Parquet file")
    fields = dict(text_field=data.text_field, pair_field=data.pair_field or None, label_field=data.label_field,
                  task=data.task)
    examples = read_examples(data.train, **fields)
    val = read_examples(data.val, **fields) if data.val else None
    load_test = (lambda: read_examples(data.test, **fields)) if data.test else None
    splits = make_splits(examples, ratios=parse_ratios(data.split), seed=data.seed,
                         stratify=data.task == "classification", val=val, load_test=load_test,
                         test_path=data.test or None, dedup=data.dedup, near_dup_threshold=data.near_dup_threshold,
                         test_texts_for_leak_check=leak_texts)
    _say_split(splits.manifest, say)
    return splits


def _say_split(manifest: dict, say: Callable[[str], None]) -> None:
    counts = manifest.get("counts", {})
    dup = manifest.get("duplicates", {})
    exact = dup.get("exact", {}).get("count", 0)
    near = dup.get("near", {}).get("count", 0)
    removed = manifest.get("dedup", {}).get("removed_from_train", 0)
    say(f"split: train {counts.get('train')}, val {counts.get('val')}, test {counts.get('test')}; "
        f"across splits {exact} exact and {near} near duplicates" + (f", {removed} removed from train" if removed else
                                                                     " (data.dedup=true removes them from train)" if exact + near else ""))
