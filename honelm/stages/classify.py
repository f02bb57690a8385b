"""`honelm classify`: sequence classification (single texts or pairs) and regression.

Works on an encoder or a decoder, from a preset, a `pretrain`/`adapt` run, or any checkpoint.
Validation reports loss, accuracy and macro-F1 (MSE and Pearson for regression); the best
validation checkpoint is kept and early stopping watches validation only. The run writes
`labels.json` (label id → name) and, beside the best model, `best/val_predictions.jsonl`: the
per-example predictions of the evaluation that made it best (format: honelm.predictions).
"""

from __future__ import annotations

from dataclasses import dataclass
import time
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch

from honelm import boosters
from honelm import metrics as M
from honelm import runtime as rt
from honelm.boosters.adversarial import AdversarialConfig
from honelm.boosters.lora import LoraConfig
from honelm.checkpoint import best_writes_base, list_checkpoints, save_pretrained_atomic
from honelm.config import ModelConfig, RunConfig, TrainConfig, section
from honelm.data.batches import EncodedExamples, encode_examples
from honelm.errors import HonelmError
from honelm.loop import BatchStream, Callback, TrainPlan, fit
from honelm.models import model_kind
from honelm.objectives.classify import Classify
from honelm import predictions as P
from honelm.stages import setup as S


@dataclass
class LabelledDataConfig(S.SplitDataConfig):
    """Labelled examples: which fields hold the text, the optional second text, and the label."""

    text_field: str = "text"
    """Field (column) holding the text."""
    pair_field: str = ""
    """Field holding a second text for pair tasks (entailment, similarity); empty = single texts."""
    label_field: str = "label"
    """Field holding the label (class name or integer; a number for regression)."""
    task: Literal["classification", "regression"] = "classification"
    """classification (one label per example) or regression (one real-valued output)."""
    max_length: int = 128
    """Longest input in tokens; longer inputs are truncated and the count is logged."""


def _classify_train_defaults() -> TrainConfig:
    return TrainConfig(lr=5e-5, weight_decay=0.01, adam_beta2=0.999, warmup_ratio=0.06, schedule="linear",
                       min_lr_ratio=0.0, epochs=3.0, batch_size=32, eval_every=100, patience=5)


@dataclass
class ClassifyConfig:
    """Fine-tune a sequence classifier or regressor."""

    run: RunConfig = section(RunConfig)
    data: LabelledDataConfig = section(LabelledDataConfig)
    model: ModelConfig = section(ModelConfig)
    train: TrainConfig = section(_classify_train_defaults)  # type: ignore[arg-type]
    lora: LoraConfig = section(LoraConfig)
    adversarial: AdversarialConfig = section(AdversarialConfig)


def label_maps(train: list[Any], task: str) -> tuple[dict | None, dict[int, str] | None]:
    """label → id over the TRAIN labels, sorted (numbers numerically, names alphabetically)."""
    if task == "regression":
        return None, None
    labels = sorted({e.label for e in train}, key=lambda x: (isinstance(x, str), x))
    label2id = {label: i for i, label in enumerate(labels)}
    return label2id, {i: str(label) for label, i in label2id.items()}


def predict(model: torch.nn.Module, data: EncodedExamples, batch_size: int, device: torch.device) -> torch.Tensor:
    """Logits (N, C) in the order of `data`, computed in length-sorted batches."""
    order = sorted(range(len(data)), key=lambda i: data.lengths[i])
    out: list[torch.Tensor] = [torch.empty(0)] * len(data)
    objective = Classify()
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in data.collate(idx).items()}
        logits = objective.logits(model, batch).cpu()
        for row, i in enumerate(idx):
            out[i] = logits[row]
    return torch.stack(out) if out else torch.empty(0, 1)


def scores(logits: torch.Tensor, labels: torch.Tensor, regression: bool, n_labels: int, prefix: str) -> dict[str, float]:
    if regression:
        pred = logits.squeeze(-1)
        return {f"{prefix}_loss": M.mse(pred, labels), f"{prefix}_mse": M.mse(pred, labels),
                f"{prefix}_pearson": M.pearson(pred, labels)}
    pred = logits.argmax(-1)
    loss = float(torch.nn.functional.cross_entropy(logits, labels))
    return {f"{prefix}_loss": loss, f"{prefix}_accuracy": M.accuracy(pred, labels),
            f"{prefix}_macro_f1": M.macro_f1(pred, labels, list(range(n_labels)))}


def run(cfg: ClassifyConfig, resume: str | None = None, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    runtime = rt.setup(cfg.train.threads)
    rt.seed_everything(cfg.run.seed)
    run_dir = S.run_directory("classify", cfg, runtime, resume)
    tracker = S.tracker_for(run_dir, runtime, cfg)
    regression = cfg.data.task == "regression"
    splits = S.labelled_splits(cfg.data, tracker.say)
    S.write_json(run_dir / "split_manifest.json", splits.manifest, runtime)
    label2id, id2label = label_maps(splits.train, cfg.data.task)
    if runtime.is_main:
        P.write_labels(run_dir, id2label)
    kind = "bpe" if cfg.model.arch == "decoder" else "wordpiece"
    tokenizer = S.resolve_tokenizer(cfg.model, run_dir,
                                    lambda: [e.text for e in splits.train] + [e.text_pair for e in splits.train if e.text_pair],
                                    kind, tracker.say, runtime, resume is not None)
    loaded = S.resolve_model(cfg.model, "classify", tokenizer, cfg.run.seed, tracker.say,
                             num_labels=1 if regression else len(label2id), id2label=id2label,
                             carry=boosters.carries_adapter(cfg, "classify"))
    loaded = boosters.apply(loaded, cfg, "classify", tracker.say)
    model = loaded.model
    S.check_block_fits(model, cfg.data.max_length, "data.max_length")
    is_decoder = model_kind(model) == "decoder"
    train = encode_examples(tokenizer, splits.train, label2id, cfg.data.max_length, is_decoder)
    val = encode_examples(tokenizer, splits.val, label2id, cfg.data.max_length, is_decoder) if splits.val else None
    for name, enc in (("train", train), ("validation", val)):
        if enc is not None and enc.truncated:
            tracker.say(f"note: {enc.truncated} of {len(enc)} {name} examples are longer than data.max_length="
                        f"{cfg.data.max_length} and were truncated")
    n_labels = 1 if regression else len(label2id)  # type: ignore[arg-type]

    # gold as read from the data (regression labels without a float32 round trip), in split order
    val_gold = [float(e.label) for e in splits.val] if regression else val.labels.tolist() if val is not None else []
    last_val_logits: list[torch.Tensor | None] = [None]

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        logits = predict(m, val, cfg.train.eval_batch_size, runtime.device)
        # fit() calls save_best right after the evaluation that set a new best, so keeping the last
        # logits gives best/ its validation predictions without a second pass over val
        last_val_logits[0] = logits
        return scores(logits, val.labels, regression, n_labels, "val")

    def save_best(m: torch.nn.Module, info: dict[str, Any], out_dir: Path) -> None:
        logits = last_val_logits[0]
        files = ({P.VAL_FILE: P.dumps_records(P.prediction_records(logits, val_gold, regression))}
                 if logits is not None and info.get("metric") is not None else None)  # no eval, no val predictions
        # `loaded` is read when called: the teacher's record for plae's teacher run, then the student's
        save_pretrained_atomic(m, tokenizer, out_dir / "best", info, files=files, base_pending=loaded.base_pending)

    def train_model(model: torch.nn.Module, objective: Any, out_dir: Path, tracker: Any, resume: bool,
                    callbacks: Sequence[Callback] = ()) -> Any:
        stream = BatchStream(len(train), train.collate, cfg.train.batch_size, cfg.train.grad_accum, cfg.run.seed,
                             runtime.world_size, runtime.rank, lengths=train.lengths)
        last_val_logits[0] = None  # plae: the student must not inherit the teacher's last evaluation
        plan = TrainPlan(objective, stream, evaluate if val is not None else None,
                         lambda m, info: save_best(m, info, out_dir), cfg.train.metric or objective.default_metric,
                         best_writes_base=lambda: best_writes_base(model, loaded.base_pending, out_dir))
        return fit(model, plan, cfg.train, runtime, out_dir, tracker=tracker, resume=resume, callbacks=callbacks)

    inner = Classify(regression=regression)
    stored = None
    if cfg.adversarial.method == "plae" and cfg.adversarial.resolved().active:
        stored = plae_stage(cfg, run_dir, runtime, tracker, model, inner, tokenizer, train, train_model,
                            n_labels, id2label)
        if stored is None:
            tracker.close()
            return {"run_dir": str(run_dir), "steps": 0, "reason": "interrupted", "best_step": 0}
        rt.seed_everything(cfg.run.seed)  # the student starts exactly where the teacher did
        student = S.resolve_model(cfg.model, "classify", tokenizer, cfg.run.seed, tracker.say, num_labels=n_labels,
                                  id2label=id2label, carry=boosters.carries_adapter(cfg, "classify"))
        loaded = boosters.apply(student, cfg, "classify", tracker.say)
        model = loaded.model
    objective = boosters.objective(inner, cfg, tokenizer, tracker.say, stored=stored)
    # plae: a run resumed during its teacher stage may have no checkpoint of its own yet; the callbacks
    # (a search's pruner) observe this run only, never the teacher's
    result = train_model(model, objective, run_dir, tracker,
                         resume is not None and bool(list_checkpoints(run_dir / "checkpoints")), callbacks)
    tracker.close()
    return {"run_dir": str(run_dir), "steps": result.steps, "reason": result.reason, "best_step": result.best_step,
            "stop_requested": result.stop_requested, **result.last_eval}


def plae_stage(cfg: ClassifyConfig, run_dir: Path, runtime: rt.Runtime, tracker: Any, model: torch.nn.Module,
               inner: Classify, tokenizer: Any, train: EncodedExamples, train_model: Callable[..., Any],
               n_labels: int, id2label: dict[int, str] | None
               ) -> Callable[[dict[str, Any], torch.Tensor], torch.Tensor] | None:
    """plae's teacher run and generation (honelm.boosters.plae); returns the student's lookup (None if interrupted).

    Both are kept under RUN/plae_teacher/, so `--resume` continues an interrupted teacher and
    never regenerates stored embeddings.
    """
    from honelm.boosters import plae
    from honelm.models import load_model

    adv = cfg.adversarial.resolved()
    teacher_dir = run_dir / plae.TEACHER_DIR
    deltas_path = teacher_dir / plae.DELTAS_FILE
    if not deltas_path.is_file():
        (teacher_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        started = any((teacher_dir / "checkpoints").iterdir())
        tracker.say(f"plae 1/3: teacher fine-tuning ({adv.teacher}) in {teacher_dir}")
        teacher_tracker = S.tracker_for(teacher_dir, runtime, cfg)
        teacher_cfg = ClassifyConfig(adversarial=plae.teacher_config(adv))
        result = train_model(model, boosters.objective(inner, teacher_cfg, tokenizer, teacher_tracker.say),
                             teacher_dir, teacher_tracker, started)
        teacher_tracker.close()
        if result.reason == "interrupted":
            return None  # the teacher's checkpoint is saved; `--resume` continues it
        if result.stop_requested:  # the teacher finished as the stop came: `--resume` goes on with generation
            return None
        teacher = load_model(teacher_dir / "best", "classify", num_labels=n_labels, id2label=id2label).to(runtime.device)
        tracker.say(f"plae 2/3: {adv.copies} adversarial embedding(s) per training example by PGD against the "
                    f"teacher (epsilon={adv.epsilon}, steps={adv.steps}, step_size={adv.step_size}, norm={adv.norm})")
        tracker.start_progress(len(train) * adv.copies)
        done = [0]

        def advance(n: int) -> None:
            done[0] += n
            tracker.progress(done[0], "generating adversarial embeddings")

        started_at = time.perf_counter()
        deltas = plae.generate(teacher, inner, adv, list(tokenizer.all_special_ids or []), len(train), train.collate,
                               cfg.train.eval_batch_size, runtime.device, runtime.autocast, advance)
        tracker.stop_progress()
        if runtime.is_main:
            plae.save(deltas, deltas_path)
            S.write_json(teacher_dir / "plae.json", {"teacher_train_time_s": round(result.train_time_s, 2),
                                                     "generation_time_s": round(time.perf_counter() - started_at, 2),
                                                     "copies": adv.copies, "stored": len(deltas)})
        runtime.barrier()
        del teacher
    deltas = plae.load(deltas_path)
    size = sum(t.numel() * t.element_size() for t in deltas.values())
    tracker.say(f"plae 3/3: a fresh student from the same start trains on clean + stored adversarial embeddings "
                f"({len(deltas)} stored, {size / 2**20:.1f} MiB; weight {adv.weight})")
    return plae.stored_lookup(deltas, adv.copies)


def evaluate_test(run_dir: Path, cfg: ClassifyConfig, test_examples: list[Any], train_examples: list[Any]) -> dict[str, Any]:
    """Test metrics of the run's best model (called only by honelm.protocol.test)."""
    from honelm.data.readers import check_labels_seen
    from honelm.models import load_model
    from honelm.tokenizer import load_tokenizer

    regression = cfg.data.task == "regression"
    if not regression:
        check_labels_seen(train_examples, test_examples, "test")
    label2id, id2label = label_maps(train_examples, cfg.data.task)
    device = rt.setup().device
    best = run_dir / "best"
    if not ((best / "config.json").is_file() or (best / "adapter_config.json").is_file()):  # LoRA: an adapter dir
        raise HonelmError(f"{run_dir}: no best/ model to test")
    tokenizer = load_tokenizer(best)
    model = load_model(best, "classify", num_labels=1 if regression else len(label2id),  # type: ignore[arg-type]
                       id2label=id2label).to(device).eval()
    data = encode_examples(tokenizer, test_examples, label2id, cfg.data.max_length, model_kind(model) == "decoder")
    with torch.no_grad():
        logits = predict(model, data, cfg.train.eval_batch_size, device)
    n_labels = 1 if regression else len(label2id)  # type: ignore[arg-type]
    out: dict[str, Any] = scores(logits, data.labels, regression, n_labels, "test")
    out["n_examples"] = len(data)
    # per-example records (honelm.predictions) and the label names; honelm.protocol.test
    # pops both and writes test_predictions.jsonl and labels.json
    gold = [float(e.label) for e in test_examples] if regression else data.labels.tolist()
    out["predictions"] = P.prediction_records(logits, gold, regression)
    out["id2label"] = id2label
    return out
