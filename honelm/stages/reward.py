"""`honelm reward`: a Bradley-Terry reward model on preference pairs (InstructGPT's RM; TRL's RewardTrainer).

The model is a sequence classifier with one output (`AutoModelForSequenceClassification`,
num_labels=1) whose score is read at the last non-pad token: batches are right-padded with the
tokenizer's pad id, and the model's `pad_token_id` is set to it. Each batch is [chosen; rejected]
in one forward; the loss and metrics are `honelm.objectives.reward`. Validation reports loss,
accuracy (strict), margin and the reward distribution; the best validation checkpoint is kept.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from honelm import boosters
from honelm import runtime as rt
from honelm.boosters.lora import LoraConfig
from honelm.checkpoint import best_writes_base, save_pretrained_atomic
from honelm.config import ModelConfig, RunConfig, TrainConfig, section
from honelm.data.preferences import EncodedPairs
from honelm.errors import ConfigError, HonelmError
from honelm.loop import BatchStream, Callback, TrainPlan, fit
from honelm.objectives.reward import RewardModel, bradley_terry, reward_stats
from honelm.stages import preference as P
from honelm.stages import setup as S


@dataclass
class RewardDataConfig(P.PreferenceDataConfig):
    """Preference pairs for the reward model, and where a per-pair margin comes from."""

    margin_field: str = "margin"
    """Field holding a per-pair margin m (loss -log σ(r_c - r_r - m)); used when the data has it (then every row needs it); empty = ignore it."""


@dataclass
class RewardObjectiveConfig:
    """The Bradley-Terry objective."""

    center_coef: float = 0.0
    """Reward centring: add coef · mean((r_c + r_r)²) to pull the mean reward to 0 (TRL's center_rewards_coefficient, e.g. 0.01); 0 = off."""
    disable_dropout: bool = True
    """Turn off every dropout of the model (TRL's disable_dropout): with dropout, chosen and rejected are scored through noise."""

    def validate(self) -> None:
        if self.center_coef < 0:
            raise ConfigError(f"reward.center_coef must be >= 0, got {self.center_coef}")


def _reward_train_defaults() -> TrainConfig:
    # TRL RewardConfig: lr 1e-4, no weight decay; InstructGPT: one epoch, cosine decay to 10%
    return TrainConfig(lr=1e-4, weight_decay=0.0, adam_beta2=0.999, warmup_ratio=0.03, epochs=1.0, batch_size=8,
                       eval_every=50, eval_batch_size=16)


@dataclass
class RewardConfig:
    """Train a reward model on preference pairs."""

    run: RunConfig = section(RunConfig)
    data: RewardDataConfig = section(RewardDataConfig)
    model: ModelConfig = section(ModelConfig)
    train: TrainConfig = section(_reward_train_defaults)  # type: ignore[arg-type]
    lora: LoraConfig = section(LoraConfig)
    reward: RewardObjectiveConfig = section(RewardObjectiveConfig)


def score_pairs(model: torch.nn.Module, data: EncodedPairs, batch_size: int, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_c, r_r), each (N,) on CPU in pair order, in length-sorted batches."""
    order = sorted(range(len(data)), key=lambda i: data.lengths[i])
    chosen, rejected = torch.empty(len(data)), torch.empty(len(data))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in data.collate(idx).items()}
        r_c, r_r = RewardModel.scores(model, batch)
        chosen[idx], rejected[idx] = r_c.cpu(), r_r.cpu()
    return chosen, rejected


def evaluate_pairs(model: torch.nn.Module, data: EncodedPairs, batch_size: int, device: torch.device, prefix: str,
                   center_coef: float = 0.0) -> dict[str, float]:
    """Loss (the training objective's mean), accuracy, margin and reward mean/std/min/max over `data`."""
    r_c, r_r = score_pairs(model, data, batch_size, device)
    loss = float(bradley_terry(r_c, r_r, data.margins, center_coef).double().mean())
    return {f"{prefix}_loss": loss, **reward_stats(r_c, r_r, prefix)}


def load_reward_model(path: Path | str) -> torch.nn.Module:
    """A reward run's best/ (or any one-output classifier directory, LoRA adapters merged) for scoring."""
    from honelm.models import load_model

    return load_model(path, "classify", num_labels=1, id2label={0: "reward"})


def run(cfg: RewardConfig, resume: str | None = None, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    runtime = rt.setup(cfg.train.threads)
    rt.seed_everything(cfg.run.seed)
    run_dir = S.run_directory("reward", cfg, runtime, resume)
    tracker = S.tracker_for(run_dir, runtime, cfg)
    splits, tokenizer = P.prepare(cfg, run_dir, runtime, tracker, resume is not None)
    model = S.resolve_model(cfg.model, "classify", tokenizer, cfg.run.seed, tracker.say, num_labels=1,
                            id2label={0: "reward"}, carry=boosters.carries_adapter(cfg, "reward"))
    # the head reads the last token that is not the pad id: batches are padded with the tokenizer's
    model.config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        tracker.say("note: the tokenizer pads with its EOS token, which also ends every turn: the reward is read at "
                    "the last token before the final EOS")
    if cfg.reward.disable_dropout:
        n = P.disable_dropout(model)
        if n:
            tracker.say(f"dropout: turned off in {n} places (reward.disable_dropout=true)")
    model = boosters.apply(model, cfg, "classify", tracker.say)
    S.check_block_fits(model, cfg.data.max_length, "data.max_length")
    train = P.encode_split(tokenizer, splits.train, cfg.data, "train", tracker.say)
    val = P.encode_split(tokenizer, splits.val, cfg.data, "validation", tracker.say) if splits.val else None
    if not len(train):
        raise HonelmError("no training pair is left after truncation: raise data.max_length")
    if train.margins is not None:
        tracker.say(f"margin: from field '{cfg.data.margin_field}' (loss -log σ(r_c - r_r - margin))")
    tracker.say(f"data: {len(train)} train pairs, {len(val) if val else 0} validation pairs")
    stream = BatchStream(len(train), train.collate, cfg.train.batch_size, cfg.train.grad_accum, cfg.run.seed,
                         runtime.world_size, runtime.rank, lengths=train.lengths)
    evaluate = ((lambda m: evaluate_pairs(m, val, cfg.train.eval_batch_size, runtime.device, "val",
                                          cfg.reward.center_coef)) if val is not None and len(val) else None)
    objective = RewardModel(center_coef=cfg.reward.center_coef)
    plan = TrainPlan(objective, stream, evaluate,
                     lambda m, info: save_pretrained_atomic(m, tokenizer, run_dir / "best", info),
                     cfg.train.metric or objective.default_metric,
                     best_writes_base=functools.partial(best_writes_base, model, run_dir))
    result = fit(model, plan, cfg.train, runtime, run_dir, tracker=tracker, resume=resume is not None,
                 callbacks=callbacks)
    tracker.close()
    return {"run_dir": str(run_dir), "steps": result.steps, "reason": result.reason, "best_step": result.best_step,
            "stop_requested": result.stop_requested, **result.last_eval}


def evaluate_test(run_dir: Path, cfg: RewardConfig, test_rows: list[Any], train_rows: list[Any]) -> dict[str, Any]:
    """Test metrics of the run's best model (called only by honelm.protocol.test)."""
    from honelm.tokenizer import load_tokenizer

    device = rt.setup().device
    best = run_dir / "best"
    if not ((best / "config.json").is_file() or (best / "adapter_config.json").is_file()):
        raise HonelmError(f"{run_dir}: no best/ model to test")
    tokenizer = load_tokenizer(best)
    model = load_reward_model(best).to(device).eval()
    model.config.pad_token_id = tokenizer.pad_token_id
    data = P.encode_split(tokenizer, test_rows, cfg.data, "test", print)
    if not len(data):
        raise HonelmError(f"{run_dir}: no test pair is left after truncation at data.max_length={cfg.data.max_length}")
    with torch.no_grad():
        r_c, r_r = score_pairs(model, data, cfg.train.eval_batch_size, device)
    loss = float(bradley_terry(r_c, r_r, data.margins, cfg.reward.center_coef).double().mean())
    out: dict[str, Any] = {"test_loss": loss, **reward_stats(r_c, r_r, "test"), "n_pairs": len(data),
                           "n_dropped": len(data.dropped)}
    out["predictions"] = [[float(a), float(b)] for a, b in zip(r_c, r_r)]
    return out
