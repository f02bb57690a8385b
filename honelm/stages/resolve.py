"""How a run's `model.*` section becomes its tokenizer and its loaded model (the runner calls these).

`resolve_tokenizer`: model.tokenizer, else the init_from checkpoint's, else one trained once on the
train split and kept in the run. `resolve_model`: init_from (an adapter merged, or carried on with
`lora.carry`) or a preset from random init, as a `LoadedModel` record of where it came from;
`init_kind` tells encoder from decoder before anything is loaded, `report_new_head` says whether
the loader had to create an LM head.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Literal

from honelm import config as C
from honelm.adapters import is_adapter_dir
from honelm.checkpoint import resolve_model_dir
from honelm.errors import ConfigError
from honelm.models import LoadedModel, build_model, count_parameters, kind_of_dir, load_checkpoint, load_for_carry
from honelm.runtime import Runtime
from honelm.tokenizer import load_tokenizer, train_tokenizer



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


def report_new_head(loaded: LoadedModel, say: Callable[[str], None]) -> None:
    """Say whether the loader had to create the LM head (e.g. a BertModel checkpoint for MLM)."""
    new, model = list(loaded.new_weights), loaded.model
    if new:
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
        tied = out is not None and out.weight is inp.weight
        say(f"model: the checkpoint has no LM head: created one ({', '.join(new)}); its output layer is "
            + ("tied to the input embeddings" if tied else "newly initialised"))


def init_kind(model_cfg: C.ModelConfig) -> str:
    """encoder | decoder of the model `model.*` will give, read from its config (no weights loaded)."""
    if not model_cfg.init_from:
        return model_cfg.arch
    return kind_of_dir(resolve_model_dir(model_cfg.init_from), model_cfg.trust_remote_code)



def _load_init_from(model_cfg: C.ModelConfig, task: str, num_labels: int | None, id2label: dict[int, str] | None,
                    carry: bool) -> LoadedModel:
    path = resolve_model_dir(model_cfg.init_from)
    if not carry:
        return load_checkpoint(path, task, num_labels=num_labels, id2label=id2label,
                               trust_remote_code=model_cfg.trust_remote_code, allow_pickle=model_cfg.allow_pickle)
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
