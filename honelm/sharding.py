"""Fully sharded data parallelism (`train.distributed=fsdp`): PyTorch FSDP2 around honelm's own loop.

With several processes, DDP (the default) keeps a whole copy of the weights, gradients and AdamW
state on every process. FSDP (Zhao et al. 2023, "PyTorch FSDP: Experiences on Scaling Fully
Sharded Data Parallel"; ZeRO-3 in Rajbhandari et al. 2020) keeps 1/world of each on each process
and all-gathers a block's weights just before they are used, so a model whose training state does
not fit one device can still train. honelm calls `torch.distributed.fsdp.fully_shard` (FSDP2)
directly rather than through accelerate's FSDP plugin: the plugin wants `Accelerator.prepare` to
own the model, optimizer and loop, while honelm keeps its one loop (exact accumulation by loss
units, its checkpoints and manifests, exact resume). accelerate still starts the processes
(`accelerate launch`) and joins the process group (`honelm.runtime.setup`).

What this module owns:

- `shard(model, runtime, precision)`: each repeated block (every child of an `nn.ModuleList`: a
  transformer's layers) becomes one FSDP unit, then the root takes the rest (embeddings, the
  head, final norm); parameters become DTensors sharded on dim 0 over a 1-D device mesh of all
  processes (NCCL on GPU, gloo on CPU). On a GPU training in bf16 the mixed-precision policy
  all-gathers and computes in bf16 and reduce-scatters gradients in fp32; on CPU parameters stay
  fp32 (autocast decides the compute dtype there, as under DDP), so a CPU FSDP run computes what
  a DDP run computes.
- `gradient_sync(model, sync)`: FSDP's `no_sync` (gradients kept unreduced while a step's
  micro-batches accumulate).
- `gathered(model, runtime)`: the full weights on rank 0, as plain parameters of the same model
  object, for saving `best/` with the usual Hugging Face / PEFT code.

Sharded training checkpoints (torch.distributed.checkpoint) are written and read by
`honelm.checkpoint`.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from honelm import runtime as rt
from honelm.errors import ConfigError


def wanted(distributed: str, runtime: rt.Runtime) -> bool:
    """Whether this run shards: `train.distributed=fsdp` with several processes (one process has nothing to
    shard across, and trains as it always does)."""
    return distributed == "fsdp" and runtime.distributed


def refuse_unsupported(stream: Any, compile_model: bool) -> None:
    """ConfigError for what FSDP would get wrong here, or has never been run with, rather than train silently.

    A stream that runs the model itself (PPO's and GRPO's rollouts: it offers `probe_batch`) samples
    a different number of tokens on each process; every sharded forward is a collective, so the
    processes would wait on one another forever. torch.compile has not been run with FSDP in
    honelm; it is refused until it is tested.
    """
    if getattr(stream, "probe_batch", None) is not None:
        raise ConfigError("train.distributed=fsdp: this stage samples from the model while it trains (a rollout "
                          "stream), which FSDP cannot do in step on every process; use train.distributed=ddp")
    if compile_model:
        raise ConfigError("train.distributed=fsdp: train.compile=true has not been tested with FSDP in honelm; "
                          "set train.compile=false or use train.distributed=ddp")


def mixed_precision(runtime: rt.Runtime, precision: str) -> MixedPrecisionPolicy:
    """bf16 all-gathers and compute with fp32 gradient reduction on a GPU training in bf16; fp32 otherwise.

    `precision` is `train.precision`; on a GPU `choose_precision` decides it without a probe, so a
    fresh run and its resume take the same policy. On CPU the policy stays fp32: gloo's bf16
    collectives are not what a CPU run is short of, and autocast gives the bf16 compute there.
    """
    if runtime.device.type != "cuda":
        return MixedPrecisionPolicy()
    chosen, _ = rt.choose_precision(precision, runtime.device, None)
    if chosen != "bf16":
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: the children of every `nn.ModuleList` (a transformer's layers)."""
    found: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            found.extend(child for child in module if any(p.numel() for p in child.parameters()))
    return found


def shard(model: nn.Module, runtime: rt.Runtime, precision: str) -> str:
    """Shard `model` in place across all processes (every rank calls this); returns a line for the log."""
    mesh = init_device_mesh(runtime.device.type, (runtime.world_size,))
    policy = mixed_precision(runtime, precision)
    units = blocks(model)
    for block in units:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    # The root keeps its parameters gathered from forward to backward (FSDP's default for the root, said here
    # because the objectives rely on it): they switch the output layer off and apply its weight to the final
    # hidden states outside the model's forward (honelm.objectives.logprobs.final_hidden).
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    # That switched-off head returns the final hidden states, a view, and FSDP warns about in-place ops on a view
    # output; the objectives only read it (out of place), so the warning would only alarm.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor", category=UserWarning)
    dtype = "bf16 compute, fp32 gradient reduction" if policy.param_dtype == torch.bfloat16 else "fp32 parameters"
    return (f"FSDP: parameters, gradients and optimizer state sharded over {runtime.world_size} processes "
            f"({len(units)} blocks + the rest as one unit; {dtype})")


def is_sharded(model: nn.Module) -> bool:
    """Whether `shard` (or any FSDP2 `fully_shard`) was applied to `model`."""
    return isinstance(model, FSDPModule)


def gradient_sync(model: nn.Module, sync: bool) -> None:
    """Reduce-scatter gradients in this backward (`sync`) or keep accumulating them unreduced (FSDP's no_sync).

    `model` may be the sharded module under torch.compile, which forwards the attribute."""
    model.set_requires_gradient_sync(sync)  # type: ignore[operator]


def local(value: torch.Tensor) -> torch.Tensor:
    """A DTensor result (the gradient norm `clip_grad_norm_` returns over sharded gradients) as a plain tensor."""
    return value.full_tensor() if isinstance(value, DTensor) else value


@contextlib.contextmanager
def gathered(model: nn.Module, runtime: rt.Runtime) -> Iterator[bool]:
    """Every rank enters (the gather is a collective); inside, rank 0's `model` holds the full fp32 weights as plain
    parameters on the CPU, so saving it with `save_pretrained` (Hugging Face or PEFT) writes a normal model
    directory. Yields whether this rank holds them (rank 0); the sharded parameters are back on exit.

    FSDP's state-dict hook re-registers the sharded parameters only while a unit is not sharded; after
    the gather every unit is, so the hook leaves the swapped-in parameters alone. Parameters shared by
    several modules (tied embeddings) get one full parameter, so ties survive the save.
    """
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not runtime.is_main:
        yield False
        return
    swapped: dict[int, nn.Parameter] = {}  # id(sharded parameter) → its full copy
    for name, p in model.named_parameters():
        swapped[id(p)] = nn.Parameter(full[name], requires_grad=p.requires_grad)
    put_back: list[tuple[nn.Module, str, nn.Parameter]] = []
    for module in model.modules():
        for key, p in list(module._parameters.items()):
            if p is not None and id(p) in swapped:
                put_back.append((module, key, p))
                module._parameters[key] = swapped[id(p)]
    try:
        yield True
    finally:
        for module, key, p in put_back:
            module._parameters[key] = p
