"""The frozen reference DPO trains against: how it is obtained, and where `honelm test` finds it again.

The reference is the policy's starting model, frozen, obtained one of three ways (`choose_reference`,
before LoRA wraps the policy):

  dpo.precompute_ref=true   its log-probs of every train and validation pair are computed in one
                            no-grad pass before training and stored per pair; no reference model
                            is kept in memory while training (`PrecomputedReference`)
  lora.enabled=true         the policy with its adapters disabled (peft `disable_adapter()`): the
                            model LoRA was applied to, i.e. the starting policy, with no copy
  otherwise                 a frozen copy of the starting policy

`RUN/reference.json` records where the reference's weights are (`reference_location`), so
`honelm test` scores the test pairs against the same reference (`load_reference`). KTO shares all of
this (its batches have the same two-rows-per-unit layout); orpo and simpo have no reference
(`prepare_reference` makes none).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from honelm import runtime as rt
from honelm.adapters import adapter_info
from honelm.checkpoint import atomic_directory, checkpoint_precision, list_checkpoints
from honelm.data.preferences import EncodedPairs
from honelm.data.unpaired import EncodedExamples
from honelm.errors import HonelmError
from honelm.loop import Callback, TrainState
from honelm.models import LoadedModel, load_model
from honelm.objectives.dpo import precompute_reference
from honelm.runtime import Runtime
from honelm.stages.contract import RunContext

Encoded = EncodedPairs | EncodedExamples
"""What a reference scores: pairs, or KTO's examples with their KL rows (both two rows per unit)."""

REFERENCE_FILE = "reference.json"
"""RUN/reference.json: where a run's frozen reference model is (`reference_location`)."""


class PrecomputedReference(Callback):
    """The starting model's log-probs of every train and validation pair, in the training precision.

    A plan callback: on a fresh run, `on_start` computes them once the loop has chosen the
    precision (its probe step reads the zeros stored meanwhile), so at step 0 policy and reference
    log-probs are equal (all implicit rewards 0), which an fp32 reference against a bf16 policy
    would not give. A resumed run computes them in `choose_reference` (from the stage's
    `before_boosters`), in the checkpoint's precision, while `loaded.model` is still the starting model.
    """

    def __init__(self, ctx: RunContext, loaded: Any, train: Encoded, val: Encoded | None) -> None:
        self.ctx, self.loaded, self.train, self.val = ctx, loaded, train, val
        self.pairs = [d for d in (train, val) if d is not None and len(d)]
        for data in self.pairs:  # what fit's probe step reads before `on_start`
            data.ref_logps = torch.zeros(len(data), 2)

    def on_start(self, state: TrainState) -> None:
        if not state.resumed:
            self.precompute(state.precision)

    def precompute(self, precision: str) -> None:
        ctx, started = self.ctx, time.perf_counter()
        autocast = rt.Runtime(device=ctx.device, precision=precision).autocast
        # on a fresh run the model the loop trains (the runner's boosted record: LoRA-wrapped, adapters at
        # zero); on resume, before the boosters, the starting model as loaded
        model = (ctx.loaded or self.loaded).model
        precompute_reference(model, self.pairs, ctx.cfg.train.eval_batch_size, ctx.device, autocast)
        n_val, unit = len(self.val) if self.val else 0, self.train.unit  # pairs, or KTO's examples
        ctx.say(f"reference: log-probs of the starting model precomputed for {len(self.train)} train + "
                f"{n_val} validation {unit} in {time.perf_counter() - started:.1f}s "
                f"({precision}, the training precision); no reference model is kept")


def choose_reference(ctx: RunContext, loaded: LoadedModel, train: Encoded, val: Encoded | None,
                     precompute: bool) -> tuple[nn.Module | None, list[Callback]]:
    """Before LoRA applies: (None, [the callback]) for stored log-probs, (None, []) for the adapter-disabled
    policy, or (a frozen copy, [])."""
    if precompute:
        precomputed = PrecomputedReference(ctx, loaded, train, val)
        # resumed from a checkpoint: the starting model is still what `loaded.model` holds; the precision is the
        # checkpoint's (a resumed run with no checkpoint yet trains from step 0 and precomputes as a fresh one)
        if ctx.resume and list_checkpoints(ctx.run_dir / "checkpoints"):
            precomputed.precompute(checkpoint_precision(ctx.run_dir))
        return None, [precomputed]
    if ctx.cfg.lora.enabled:
        ctx.say("reference: the policy with its LoRA adapters disabled (the model LoRA was applied to)")
        return None, []
    reference = copy.deepcopy(loaded.model).to(ctx.device).eval().requires_grad_(False)
    ctx.say("reference: a frozen copy of the starting model (dpo.precompute_ref=true or LoRA avoid the copy)")
    return reference, []


def prepare_reference(ctx: RunContext, loaded: LoadedModel, train: Any,
                      val: Any) -> tuple[nn.Module | None, list[Callback]]:
    """Before LoRA applies, for `honelm dpo`: nothing for a reference-free loss (orpo, simpo); otherwise
    RUN/reference.json written and `choose_reference`'s answer."""
    cfg = ctx.cfg
    if cfg.dpo.reference_free:
        return None, []
    ctx.write_json(REFERENCE_FILE, reference_location(loaded, ctx.tokenizer, ctx.run_dir, cfg.lora.enabled,
                                                      ctx.runtime))
    return choose_reference(ctx, loaded, train, val, cfg.dpo.precompute_ref)


def reference_location(loaded: LoadedModel, tokenizer: Any, run_dir: Path, lora: bool, runtime: Runtime) -> dict:
    """Where `honelm test` finds the reference weights; writes RUN/reference/ when they exist on no disk."""
    if lora:  # the adapter's base (the init_from checkpoint or RUN/base/), named in best/adapter_config.json
        return {"kind": "adapter_base"}
    if loaded.source:
        return {"kind": "checkpoint", "path": loaded.source}
    target = run_dir / "reference"
    if runtime.is_main and not (target / "config.json").is_file():
        with atomic_directory(target) as tmp:
            loaded.model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    return {"kind": "checkpoint", "path": str(target.resolve())}


def load_reference(run_dir: Path) -> nn.Module:
    """The frozen reference a DPO run trained against, from RUN/reference.json."""
    path = run_dir / REFERENCE_FILE
    if not path.is_file():
        raise HonelmError(f"{run_dir}: no {REFERENCE_FILE} (where the reference model is)")
    info = json.loads(path.read_text(encoding="utf-8"))
    where = (adapter_info(run_dir / "best")["base_model_name_or_path"] if info.get("kind") == "adapter_base"
             else info.get("path"))
    if not where or not Path(where).exists():
        raise HonelmError(f"{run_dir}: the reference model {where} does not exist (moved or deleted?)")
    return load_model(where, "lm")
