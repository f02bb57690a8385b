"""The teacher of `honelm distill` for classification and regression: loaded once, outputs cached in the run.

The teacher is any sequence classifier (a `classify` run, a checkpoint directory, `pkg:MODULE`, or
a hub id when online) with its own tokenizer and architecture; teacher and student share only the
label set. The teacher's label columns are matched to the student's labels by name (the
checkpoint's `id2label`); a teacher whose names are the transformers placeholders (LABEL_0, ...)
is matched by position when the counts agree, and said so.

Its outputs on the transfer set (and on the validation split, so the log can say how much of the
teacher the student keeps) are computed once, with the teacher's own tokenizer and max length,
and stored in RUN/teacher/ (`logits.safetensors`, `teacher.json`). A resumed run, or a search
trial that shares the cache, reads them back instead of running the teacher again; the record's
hash of the transfer rows must match, or the run refuses. The teacher runs under
`torch.random.fork_rng`, so computing or loading the cache leaves the training RNG where it was:
a resumed run is bit-identical either way.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Sequence

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from honelm.adapters import is_adapter_dir
from honelm.bounds import at_least
from honelm.checkpoint import resolve_model_dir
from honelm.data.batches import EncodedExamples, encode_examples
from honelm.data.readers import Example
from honelm.errors import ConfigError, HonelmError
from honelm.metrics import classification_scores
from honelm.models import count_parameters, load_checkpoint, load_merged, model_kind
from honelm.objectives.classify import predict
from honelm.tokenizer import load_tokenizer
from honelm.tracking import phase

TEACHER_DIR = "teacher"
LOGITS_FILE = "logits.safetensors"
RECORD_FILE = "teacher.json"


@dataclass
class TeacherConfig:
    """The model that teaches: a classifier or regressor on the same label set, or (data.task=generation) a causal LM."""

    model: str = ""
    """The teacher: a run directory (its best/), a checkpoint directory, pkg:MODULE, or a hub id (online only)."""
    tokenizer: str = ""
    """The teacher's tokenizer; empty = the teacher checkpoint's own."""
    max_length: Annotated[int, at_least(0)] = 0
    """Longest teacher input in tokens; 0 = data.max_length. Truncations are counted in the log."""
    batch_size: Annotated[int, at_least(1)] = 64
    """Texts per teacher forward pass."""
    trust_remote_code: bool = False
    """Allow a teacher checkpoint that ships its own Python code."""
    allow_pickle: bool = False
    """Load a teacher whose weights are pickle files only (pytorch_model.bin, adapter_model.bin), read with weights_only=True; by default such a teacher is refused with how to convert it."""


def require_teacher(cfg: TeacherConfig, generation: bool) -> None:
    """Before the run directory exists: a teacher is given and, when its config is on disk, it is the kind the task
    needs (a sequence classifier, or a causal LM for data.task=generation). Weights are not read."""
    if not cfg.model:
        raise ConfigError("teacher.model is empty: give the teacher (a classify or sft run, a checkpoint directory, "
                          "pkg:MODULE or a hub id)")
    path = Path(resolve_model_dir(cfg.model))
    if not (path / "config.json").is_file():
        return  # a hub id (checked when it loads) or a LoRA run's adapter directory (its base is checked then)
    architectures = json.loads((path / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    wanted = ("ForCausalLM", "LMHeadModel") if generation else ("ForSequenceClassification",)
    if architectures and not any(a.endswith(wanted) for a in architectures):
        kind = "causal LM (data.task=generation)" if generation else "sequence classifier (e.g. a classify run)"
        raise ConfigError(f"teacher.model={cfg.model}: {path} is not a {kind} (architectures {architectures})")


@dataclass
class TeacherOutputs:
    """The teacher's logits in the student's label order: on the transfer rows and the validation rows."""

    transfer: torch.Tensor
    val: torch.Tensor | None
    record: dict[str, Any]


def column_order(teacher_labels: dict[int, str], labels: dict[int, str], say: Callable[[str], None]) -> list[int]:
    """For each student label id, the teacher's output column of the same label name."""
    by_name = {str(name): int(i) for i, name in teacher_labels.items()}
    names = [labels[i] for i in range(len(labels))]
    if all(n in by_name for n in names) and len(by_name) == len(names):
        return [by_name[n] for n in names]
    placeholders = all(str(n) == f"LABEL_{i}" for i, n in teacher_labels.items())
    if placeholders and len(teacher_labels) == len(names):
        say(f"teacher: its labels are unnamed (LABEL_0..); matched to {names} by position")
        return list(range(len(names)))
    raise HonelmError(f"teacher labels {sorted(by_name)} do not match the task's labels {names} (data.label_field): "
                      "the teacher must be a classifier trained on the same label set")


def load_teacher(path: str, cfg: TeacherConfig) -> torch.nn.Module:
    """The teacher classifier with its own head and labels (a LoRA run's adapter merged into its base)."""
    if is_adapter_dir(path) and not (Path(path) / "config.json").is_file():
        # the adapter's own task and labels
        return load_merged(path, trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle).model
    config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    id2label = {int(k): v for k, v in (getattr(config, "id2label", None) or {}).items()}
    architectures = getattr(config, "architectures", None) or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise HonelmError(f"teacher.model={cfg.model}: {path} is not a sequence classifier (architectures "
                          f"{architectures}); distil from a classifier, e.g. a classify run")
    loaded = load_checkpoint(path, "classify", num_labels=len(id2label) or 1, id2label=id2label or None,
                             trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)
    if loaded.new_weights:
        raise HonelmError(f"teacher.model={cfg.model}: its classification head is not in the checkpoint (newly "
                          f"initialised: {', '.join(loaded.new_weights[:4])})")
    return loaded.model


def fingerprint(path: str) -> str:
    """sha256 of the teacher's config.json and the names and sizes of its weight files (cheap, no weights read)."""
    root = Path(path)
    digest = hashlib.sha256()
    if not root.is_dir():
        digest.update(path.encode())
        return digest.hexdigest()
    for item in sorted(root.iterdir()):
        if item.name == "config.json" or item.name == "adapter_config.json":
            digest.update(item.read_bytes())
        elif item.suffix in (".safetensors", ".bin"):
            digest.update(f"{item.name}:{item.stat().st_size}".encode())
    return digest.hexdigest()


def rows_hash(rows: Sequence[Example]) -> str:
    digest = hashlib.sha256()
    for e in rows:
        digest.update(json.dumps([e.text, e.text_pair]).encode())
    return digest.hexdigest()


def compute(cfg: TeacherConfig, transfer: Sequence[Example], val: Sequence[Example], labels: dict[int, str] | None,
            max_length: int, device: torch.device, say: Callable[[str], None]) -> TeacherOutputs:
    """Load the teacher and run it over the transfer and validation rows (its own tokenizer); labels None = regression."""
    path = resolve_model_dir(cfg.model)
    model = load_teacher(path, cfg).to(device).eval()
    tokenizer = load_tokenizer(resolve_model_dir(cfg.tokenizer) if cfg.tokenizer else path)
    n_out = int(model.config.num_labels)
    if labels is None and n_out != 1:
        raise HonelmError(f"teacher.model={cfg.model} has {n_out} outputs: a regression task needs a one-output teacher")
    order = column_order(dict(model.config.id2label), labels, say) if labels is not None else [0]
    length = cfg.max_length or max_length
    _, params = count_parameters(model)
    say(f"teacher: {type(model).__name__} from {path}; {params / 1e6:.2f}M parameters; soft-labelling "
        f"{len(transfer)} transfer and {len(val)} validation texts (max_length {length})")
    started = time.perf_counter()
    is_decoder = model_kind(model) == "decoder"
    out = []
    with torch.no_grad():
        for rows in (transfer, val):
            if not rows:
                out.append(None)
                continue
            enc = encode_examples(tokenizer, [Example(e.text, e.text_pair, 0.0, e.source, e.line) for e in rows],
                                  None, length, is_decoder)
            if enc.truncated:
                say(f"teacher: {enc.truncated} of {len(enc)} texts are longer than {length} tokens and were truncated")
            out.append(_predict_in_parts(model, enc, cfg.batch_size, device, say)[:, order].float())
    record = {"model": cfg.model, "path": str(path), "fingerprint": fingerprint(str(path)), "parameters": params,
              "label_columns": order, "max_length": length, "time_s": round(time.perf_counter() - started, 2)}
    return TeacherOutputs(out[0], out[1], record)


def _predict_in_parts(model: torch.nn.Module, enc: Any, batch_size: int, device: torch.device,
                      say: Callable[[str], None], part: int = 8192) -> torch.Tensor:
    """`predict` over the rows a part at a time, with a progress line after each part (soft-labelling a large
    transfer set takes minutes)."""
    started, logits = time.perf_counter(), []
    for start in range(0, len(enc), part):
        idx = list(range(start, min(start + part, len(enc))))
        chunk = EncodedExamples([enc.ids[i] for i in idx], [enc.type_ids[i] for i in idx] if enc.type_ids else None,
                                enc.labels[idx], enc.pad_id, 0)
        logits.append(predict(model, chunk, batch_size, device))
        if len(enc) > part:
            done = idx[-1] + 1
            rate = done / max(time.perf_counter() - started, 1e-9)
            say(f"teacher: {done:,} of {len(enc):,} texts ({rate:,.0f}/s, about {(len(enc) - done) / rate:,.0f} s left)")
    return torch.cat(logits)


def cache_key(cfg: TeacherConfig, transfer: Sequence[Example], val: Sequence[Example], max_length: int) -> str:
    """What the teacher's outputs depend on: the teacher (path, fingerprint, tokenizer, length) and the rows."""
    path = resolve_model_dir(cfg.model)
    parts = [str(path), fingerprint(str(path)), cfg.tokenizer, str(cfg.max_length or max_length),
             rows_hash(transfer), rows_hash(val)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def cached(run_dir: Path, cfg: TeacherConfig, transfer: Sequence[Example], val: Sequence[Example],
           labels: dict[int, str] | None, max_length: int, runtime: Any, say: Callable[[str], None]) -> TeacherOutputs:
    """The teacher's outputs: RUN/teacher/ when there, else a sibling run's (same key), else computed and stored.

    A finished cache is also kept in `<runs dir>/teacher_cache/<key>/`, so sibling runs (the trials of a
    search, a second distill into the same run.out_dir) run the teacher once. The main process computes; the
    others wait and read the file, so every rank trains on the same numbers.
    """
    folder = run_dir / TEACHER_DIR
    key = cache_key(cfg, transfer, val, max_length)
    shared = run_dir.parent / "teacher_cache" / key[:32]
    if runtime.is_main and not (folder / LOGITS_FILE).is_file():
        if (shared / LOGITS_FILE).is_file():
            say(f"teacher: reusing the outputs cached by an earlier run with the same teacher and texts ({shared})")
            outputs = _load(shared, key, say)
        else:
            with torch.random.fork_rng(devices=[]), phase(say, "teacher: soft-labelling the transfer and validation texts"):
                outputs = compute(cfg, transfer, val, labels, max_length, runtime.device, say)
            _store(shared, outputs, key)
        _store(folder, outputs, key)
    runtime.barrier()
    return _load(folder, key, say)


def _store(folder: Path, outputs: TeacherOutputs, key: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"transfer": outputs.transfer.contiguous()}
    if outputs.val is not None:
        tensors["val"] = outputs.val.contiguous()
    (folder / RECORD_FILE).write_text(json.dumps({**outputs.record, "key": key}, indent=2), encoding="utf-8")
    tmp = folder / (LOGITS_FILE + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(folder / LOGITS_FILE)  # the logits file last: its presence means the cache is complete


def _load(folder: Path, key: str, say: Callable[[str], None]) -> TeacherOutputs:
    record = json.loads((folder / RECORD_FILE).read_text(encoding="utf-8"))
    if record.get("key") != key:
        raise HonelmError(f"{folder}: the cached teacher outputs were computed for another teacher or other texts "
                          "(teacher, data, augmentation or split settings changed); start a new run")
    tensors = load_file(str(folder / LOGITS_FILE))
    say(f"teacher: outputs read from {folder} ({tensors['transfer'].shape[0]} transfer rows)")
    return TeacherOutputs(tensors["transfer"], tensors.get("val"), record)


def mask_text(cfg: TeacherConfig, augment: Any, say: Callable[[str], None]) -> str:
    """The word augmentation masks with ("" when it masks nothing): augment.mask when given, else the teacher
    tokenizer's mask token, else its unknown token, else "[MASK]" as plain text (said in the log)."""
    if augment.copies == 0 or augment.p_mask == 0:
        return ""
    if augment.mask:
        return augment.mask
    tokenizer = load_tokenizer(resolve_model_dir(cfg.tokenizer or cfg.model))
    token = tokenizer.mask_token or tokenizer.unk_token
    if not token:
        say("augment: the teacher's tokenizer has neither a mask nor an unknown token; masked words become "
            "'[MASK]' as plain text (set augment.mask to choose)")
    return str(token or "[MASK]")


def validation_scores(logits: torch.Tensor, labels: torch.Tensor, regression: bool,
                      say: Callable[[str], None]) -> dict[str, float]:
    """The teacher's `teacher_val_*` scores on the validation split (from its cached logits), said in the log."""
    scores = classification_scores(logits, labels, regression, logits.shape[1], "teacher_val")
    say("teacher on validation: " + ", ".join(f"{k}={v:.4f}" for k, v in scores.items()))
    return scores
