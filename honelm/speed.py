"""Training speed-ups that change no number: the one context `fit()` enters around training.

`TrainingSpeed` bundles three tricks, each exact (the same losses and weights bit for bit) and
each measured to pay (docs/benchmarks.md):

1. Frozen Linear weights in bf16 under bf16 autocast (`train.bf16_frozen`, `FrozenBf16`; below).
2. LoRA branches under bf16 autocast take their input in the dtype it arrives in
   (`autocast_inputs`): peft's bf16 → fp32 → bf16 round trip in front of every plain LoRA
   branch is skipped.
3. Freed heap pages handed back to the operating system around every validation
   (`runtime.release_freed_memory`), which allocates in other sizes than training.

The rest of this docstring is about the first.

Under bf16 autocast every `nn.Linear` call casts its weight and bias to bf16 before the matmul.
For a trainable weight autocast caches that cast once per step; for a frozen one (a LoRA base,
any layer with `requires_grad=False`) it casts afresh at every call and the backward pass keeps
the cast copy alive. So a frozen fp32 Linear weight costs its fp32 storage, a bf16 copy per step
and the time to make it, while the model only ever computes with the bf16 values. Storing the
weight in bf16 from the start gives exactly the same computation (the cast of a bf16 tensor to
bf16 is the tensor itself, and it is the same round-to-nearest-even value autocast would have
made), for half the memory and none of the casting. The same holds for a whole frozen model that
runs beside the trained one: the objective's (DPO's reference copy: `Objective.frozen_models()`)
and those the data stream runs (PPO's sampler: a reference copy and a reward model, passed as
`TrainPlan.frozen_models`).

The fp32 values are not thrown away: before the cast they are written to a file in the run
directory (`.frozen-fp32.rank<R>.bin`, raw fp32, one per process) and put back, bit for bit, when
training ends (normally, on an error or on Ctrl-C), before anything saves the model, and around
every save made during training. So checkpoints, `RUN/base/`, merged exports and everything that
uses the model after `fit()` see the original fp32 weights.

What is left alone, because autocast would not have produced the same numbers from a bf16
tensor: parameters shared with a module that is not a plain `nn.Linear` (a head tied to the
input embeddings: the embedding lookup is not autocast, so its output dtype would change),
`nn.Linear` subclasses (their forward may be different), the base layers of DoRA adapters (DoRA
computes the base weight's column norms itself), and trainable or non-fp32 weights. If casting
would change the `dtype` a transformers model reports (it reads its first parameter, and some
models build attention masks in that dtype) nothing is cast.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from honelm import runtime as rt

SPILL_NAME = ".frozen-fp32.rank{rank}.bin"


def _dora_base_layers(model: nn.Module) -> set[int]:
    """ids of the base layers that peft wraps with DoRA (their weight enters a norm, not just a matmul)."""
    out = set()
    for module in model.modules():
        use_dora = getattr(module, "use_dora", None)
        base = getattr(module, "base_layer", None)
        if isinstance(use_dora, dict) and any(use_dora.values()) and isinstance(base, nn.Module):
            out.add(id(base))
    return out


def eligible(model: nn.Module) -> dict[str, nn.Parameter]:
    """Frozen fp32 parameters that only plain `nn.Linear` modules hold (name → parameter, each once)."""
    holders: dict[int, list[nn.Module]] = {}
    names: dict[int, str] = {}
    params: dict[int, nn.Parameter] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for p_name, p in module.named_parameters(recurse=False):
            holders.setdefault(id(p), []).append(module)
            names.setdefault(id(p), f"{mod_name}.{p_name}" if mod_name else p_name)
            params[id(p)] = p
    dora = _dora_base_layers(model)
    out = {}
    for key, p in params.items():
        if p.requires_grad or p.dtype != torch.float32 or p.device.type not in ("cpu", "cuda"):
            continue
        if all(type(m) is nn.Linear and id(m) not in dora for m in holders[key]):
            out[names[key]] = p
    return out


def _reported_dtypes(model: nn.Module) -> list[torch.dtype]:
    """The `dtype` every transformers model inside `model` reports (its first floating parameter's)."""
    found = []
    for module in model.modules():
        if hasattr(module, "config") and hasattr(module, "get_input_embeddings"):
            try:
                found.append(module.dtype)
            except (AttributeError, StopIteration):
                pass
    return found


class FrozenBf16:
    """Context manager: frozen Linear weights in bf16 inside, the exact fp32 weights outside.

    `with FrozenBf16(model, path) as frozen:` spills and casts on entry (nothing when no weight is
    eligible: `frozen.count == 0`), restores and deletes the spill file on exit; `extra` models (run
    beside the trained one and never trained: DPO's frozen reference, PPO's reference copy and
    reward model) are treated the same way;
    `with frozen.restored():` puts the fp32 weights back for a while (to save the model).
    """

    def __init__(self, model: nn.Module, spill: Path, enabled: bool = True, extra: Sequence[nn.Module] = ()) -> None:
        # `extra`: frozen models that run beside the trained one; scanned with it as one tree
        self.model = nn.ModuleList([model, *extra]) if extra else model
        self.trained = model  # what saves write: `restored()` brings back its weights only
        self.spill, self.enabled = Path(spill), enabled
        self.params: dict[str, nn.Parameter] = {}
        self.offsets: dict[str, int] = {}  # byte offset of each parameter in the spill file
        self.count, self.bytes_fp32 = 0, 0
        self.skipped = ""  # why nothing was cast, when something could have been

    def __enter__(self) -> "FrozenBf16":
        params = eligible(self.model) if self.enabled else {}
        if not params:
            return self
        before = _reported_dtypes(self.model)
        self.spill.parent.mkdir(parents=True, exist_ok=True)
        # Raw fp32 bytes, one tensor after another, streamed (a serialiser that builds the whole file in
        # memory first would cost the very fp32 copy this saves); offsets stay in memory.
        self.offsets = {}
        offset = 0
        try:
            with open(self.spill, "wb") as f:
                for name, p in params.items():
                    p.detach().to("cpu").contiguous().numpy().tofile(f)
                    self.offsets[name] = offset
                    offset += p.numel() * 4
        except BaseException:  # a full disk, Ctrl-C: nothing is cast yet; leave no partial file behind
            self.spill.unlink(missing_ok=True)
            raise
        self.params = params
        self._cast()
        if _reported_dtypes(self.model) != before:
            self._restore()
            self.params = {}
            self.spill.unlink(missing_ok=True)
            self.skipped = "the model would report a different dtype"
            return self
        self.count = len(params)
        self.bytes_fp32 = sum(p.numel() * 4 for p in params.values())
        return self

    def __exit__(self, *exc: object) -> None:
        if self.params:
            self._restore()
            self.params = {}
            self.spill.unlink(missing_ok=True)

    def _cast(self, params: dict[str, nn.Parameter] | None = None) -> None:
        for p in (self.params if params is None else params).values():
            p.data = p.data.to(torch.bfloat16)

    def _restore(self, params: dict[str, nn.Parameter] | None = None) -> None:
        for name, p in (self.params if params is None else params).items():
            values = np.fromfile(self.spill, dtype=np.float32, count=p.numel(), offset=self.offsets[name])
            p.data = torch.from_numpy(values).view(p.shape).to(p.device)

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        """The trained model's exact fp32 weights for the duration (a save); bf16 again afterwards.

        `extra` models stay in bf16: nothing saves them during training, so reading them back from
        the spill file at every checkpoint would be work for nothing.
        """
        own = {id(p) for p in self.trained.parameters()}
        params = {name: p for name, p in self.params.items() if id(p) in own}
        if not params:
            yield
            return
        self._restore(params)
        try:
            yield
        finally:
            self._cast(params)

    def describe(self) -> str:
        if self.skipped:
            return f"frozen weights: kept in fp32 ({self.skipped})"
        return (f"frozen weights: {self.count} Linear weights ({self.bytes_fp32 / 2**20:,.1f} MiB in fp32) held in bf16 "
                f"while training (autocast computes with bf16 anyway; fp32 restored afterwards from {self.spill.name})")


# ----------------------------------------------------------------------------------------------
# LoRA branches under autocast


def _plain_lora_linears(model: nn.Module) -> list[nn.Module]:
    """peft LoRA `Linear` layers (exactly, not quantised subclasses) whose every adapter is vanilla
    LoRA with no dropout: their branch is lora_B(lora_A(x)) * scaling and nothing else reads x."""
    return [m for m in model.modules()
            if type(m) is LoraLinear  # exactly: not its quantised subclasses
            and hasattr(m, "cast_input_dtype_enabled") and not m.lora_variant
            and all(isinstance(d, nn.Identity) for d in m.lora_dropout.values())]


@contextlib.contextmanager
def autocast_inputs(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Inside: LoRA branches take their input in the dtype it arrives in; yields how many layers.

    peft casts the input of every LoRA branch to the adapter's dtype (fp32) before `lora_A`. Under
    bf16 autocast an input that is already bf16 (the attention output entering `o_proj`, the
    SwiGLU product entering `down_proj`) is then copied to fp32 and autocast copies it back to bf16
    for the matmul: two casts forward, two more backward, and the bf16 copy kept for the backward
    pass where the original would have done. The round trip bf16 → fp32 → bf16 is exact, so the
    branch computes the same numbers without it: lora_A's matmul gets the same bf16 input (autocast
    casts A to bf16 as before), and the input's gradient is the same bf16 tensor. That holds only
    for a branch that does nothing else with x, hence plain LoRA without dropout (dropout would
    compute its mask and scaling in the other dtype) and without a variant (DoRA reads x itself).

    Only for use under autocast: outside it a bf16 input would meet fp32 adapter weights. The flags
    are put back on exit, so the model behaves as peft's default afterwards. (peft's own
    `peft.helpers.disable_input_dtype_casting` sets the same flag on every tuner layer, dropout and
    DoRA ones included, where the numbers would change; hence this filtered version.)
    """
    layers = _plain_lora_linears(model) if enabled else []
    before = [m.cast_input_dtype_enabled for m in layers]
    for m in layers:
        m.cast_input_dtype_enabled = False
    try:
        yield len(layers)
    finally:
        for m, flag in zip(layers, before):
            m.cast_input_dtype_enabled = flag


# ----------------------------------------------------------------------------------------------
# the context fit() enters


def _distinct(models: Sequence[nn.Module]) -> list[nn.Module]:
    """Each model once, in order (an objective and a sampler may name the same one)."""
    seen: set[int] = set()
    return [m for m in models if not (id(m) in seen or seen.add(id(m)))]


class TrainingSpeed:
    """Context manager for a whole training run: every trick of this module, on where it applies.

    `with TrainingSpeed(model, spill, bf16=..., bf16_frozen=..., extra=...) as speed:` holds the
    eligible frozen weights (of `model` and of the `extra` models that run beside it) in bf16 and
    lets plain LoRA branches skip their input cast, both only under bf16 autocast; on exit
    (normally, on an error, on Ctrl-C) everything is as before. Inside,
    `speed.exact_weights()` brings `model`'s fp32 weights back for a save and
    `speed.evaluation()` wraps a validation.
    """

    def __init__(self, model: nn.Module, spill: Path, bf16: bool, bf16_frozen: bool,
                 extra: Sequence[nn.Module] = ()) -> None:
        self.model, self.bf16 = model, bf16
        self.frozen = FrozenBf16(model, spill, enabled=bf16 and bf16_frozen, extra=_distinct(extra))
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "TrainingSpeed":
        with contextlib.ExitStack() as stack:  # a failure entering the second leaves the first undone
            stack.enter_context(self.frozen)
            # looked up at call time: tests and benchmarks/lora_memory.py replace it to measure peft's default
            stack.enter_context(autocast_inputs(self.model, enabled=self.bf16))
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.__exit__(*exc)

    def exact_weights(self) -> contextlib.AbstractContextManager:
        """The trained model's exact fp32 weights for the duration (a checkpoint, a save of its base)."""
        return self.frozen.restored()

    @contextlib.contextmanager
    def evaluation(self) -> Iterator[None]:
        """Around a validation: freed heap pages handed back before and after it.

        Validation allocates in other sizes than training (a larger batch, no autograd graph); freed
        training blocks glibc keeps resident would not fit them and the heap would grow on top, and
        the same again the other way after. Handing the free pages back at both ends keeps the
        process's resident peak near what is live (milliseconds: no garbage collection here, the
        tensors of a step or a validation are freed by reference counting).
        """
        rt.release_freed_memory(collect=False)
        yield
        rt.release_freed_memory(collect=False)

    def describe(self) -> str:
        """The log line about held weights, or "" when there is nothing to say."""
        return self.frozen.describe() if self.frozen.count or self.frozen.skipped else ""
