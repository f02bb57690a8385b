"""The model PPO trains (a causal-LM policy with a value function) and its frozen reference.

This module owns:

* `PolicyWithValue`: one `nn.Module` whose forward returns (logits (B, T, V), values (B, T)), so
  the loop, DDP and checkpoints see a single model. The value function is either a scalar head
  on the policy's last hidden states (`shared`: one trunk, cheap) or a separate trunk with its
  own scalar head (`separate`: no interference between the two losses, twice the compute).
* `Reference`: log-probabilities of the starting policy. Without LoRA it is a frozen copy; under
  LoRA it is the policy itself with its adapters disabled (the same weights minus the update),
  which costs no memory and cannot drift.
* `disable_dropout`: PPO's ratio is exp(logπ_new − logπ_old); dropout would make it differ
  from 1 before any update (TRL disables dropout for the same reason).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Iterator

import torch
from torch import nn

from honelm.checkpoint import resolve_model_dir
from honelm.errors import ConfigError
from honelm.generate import neutral_generation_config
from honelm.loop import enable_gradient_checkpointing
from honelm.models import load_model


def disable_dropout(model: nn.Module) -> int:
    """Set every dropout probability in `model` to 0; returns how many modules were changed."""
    changed = 0
    for module in model.modules():
        if isinstance(module, nn.Dropout) and module.p > 0:
            module.p = 0.0
            changed += 1
        for name in ("attention_dropout", "dropout_p"):  # attention dropout held as a float by HF modules
            value = getattr(module, name, None)
            if isinstance(value, float) and value > 0:
                setattr(module, name, 0.0)
                changed += 1
    return changed


def hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    size = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or getattr(config, "d_model", None)
    if not isinstance(size, int):
        raise ValueError(f"cannot find the hidden size of {type(model).__name__} (config.hidden_size)")
    return size


class PolicyWithValue(nn.Module):
    """A causal LM (maybe a peft model) plus a value function over the same positions."""

    def __init__(self, policy: nn.Module, value_head: nn.Linear, value_trunk: nn.Module | None = None):
        super().__init__()
        self.policy = policy
        self.value_head = value_head
        self.value_trunk = value_trunk  # None: the head reads the policy's own last hidden states

    @classmethod
    def shared(cls, policy: nn.Module) -> "PolicyWithValue":
        """A zero-initialised scalar head on the policy's last hidden states (values start at 0)."""
        head = nn.Linear(hidden_size(policy), 1)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        return cls(policy, head)

    @classmethod
    def separate(cls, policy: nn.Module, scorer: nn.Module) -> "PolicyWithValue":
        """A value function with its own trunk: `scorer` is a sequence-classification model with one
        output (a reward model, or the policy's checkpoint re-headed); its trunk and scalar head
        are applied at every position instead of only the last."""
        prefix = getattr(scorer, "base_model_prefix", "model")
        trunk = getattr(scorer, prefix, None)
        head = getattr(scorer, "score", None)
        if trunk is None or not isinstance(head, nn.Linear) or head.out_features != 1:
            raise ValueError(f"{type(scorer).__name__}: a separate value model needs a decoder with a `score` "
                             "head of one output (…ForSequenceClassification)")
        return cls(policy, head, trunk)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        # use_cache=False: no KV cache is wanted here, and with one transformers' mask builder
        # ignores position_ids
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                  "use_cache": False}
        if self.value_trunk is None:
            out = self.policy(**inputs, output_hidden_states=True)
            hidden = out.hidden_states[-1]  # (B, T, H), after the final norm: what the LM head reads
        else:
            out = self.policy(**inputs)
            hidden = self.value_trunk(**inputs).last_hidden_state
        values = self.value_head(hidden).squeeze(-1).float()  # (B, T)
        return out.logits, values

    @torch.no_grad()
    def generate(self, **kwargs: Any) -> torch.Tensor:
        """The policy's `generate` with a neutral generation config (`honelm.generate.neutral_generation_config`):
        rollouts must sample from exactly softmax(logits / T), whatever the checkpoint saved."""
        with neutral_generation_config(self.policy):
            return self.policy.generate(**kwargs)

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        """What `train.gradient_checkpointing` calls: on for the policy (and a separate value trunk)."""
        enable_gradient_checkpointing(self.policy)
        if self.value_trunk is not None:
            enable_gradient_checkpointing(self.value_trunk)


class Reference:
    """The frozen starting policy's logits: a copy, or (LoRA) the policy with its adapters off."""

    def __init__(self, policy: nn.Module, lora: bool):
        self.lora = lora
        if lora:
            self._model = policy  # a peft model; `disable_adapter()` gives the base back exactly
        else:
            self._model = copy.deepcopy(policy).eval()
            self._model.requires_grad_(False)

    @contextlib.contextmanager
    def _active(self) -> Iterator[nn.Module]:
        if self.lora:
            with self._model.disable_adapter():  # type: ignore[operator]
                yield self._model
        else:
            yield self._model

    def frozen_models(self) -> list[nn.Module]:
        """The frozen copy, if there is one (with LoRA the base belongs to the trained policy)."""
        return [] if self.lora else [self._model]

    def to(self, device: torch.device) -> "Reference":
        if not self.lora:
            self._model.to(device)
        return self

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
               autocast: Callable[[], Any]) -> torch.Tensor:
        with self._active() as model, autocast():
            was_training = model.training
            model.eval()
            try:
                return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False).logits
            finally:
                model.train(was_training)


def value_scorer(source: str, trust_remote_code: bool = False) -> nn.Module:
    """The sequence-classification model a separate value function starts from (trunk + one-output head)."""
    if not source:
        raise ConfigError("ppo.value_model=separate needs a checkpoint to start from: set ppo.value_init "
                          "(or reward.model, or model.init_from)")
    return load_model(resolve_model_dir(source), "classify", num_labels=1, trust_remote_code=trust_remote_code)


def with_value(policy: nn.Module, value_model: str, value_init: str, trust_remote_code: bool,
               say: Callable[[str], None]) -> PolicyWithValue:
    """The policy with its value function: a head on its hidden states (shared), or a separate model
    started from `value_init` (ppo.value_init, else the reward model, else the policy's checkpoint)."""
    if value_model == "shared":
        model = PolicyWithValue.shared(policy)
        say("value: a scalar head on the policy's last hidden states (zero-initialised)")
        return model
    scorer_model = value_scorer(value_init, trust_remote_code)
    disable_dropout(scorer_model)
    model = PolicyWithValue.separate(policy, scorer_model)
    say(f"value: a separate {type(scorer_model).__name__} (trunk + score head at every position)")
    return model
