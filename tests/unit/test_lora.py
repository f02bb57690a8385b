"""LoRA on peft: identity at init, only adapters and heads train, merged ≡ unmerged, scaling applied once,
adapter directories that plain peft loads, a merged export that plain transformers loads, target
resolution errors, rsLoRA/DoRA, parameter counts in the log, and resume ≡ uninterrupted."""

from __future__ import annotations

import copy
import json
import re
import shutil

import pytest
import torch
import torch.nn.functional as F

from honelm import runtime as rt
from honelm.adapters import mutates_base
from honelm.boosters.lora import LoraConfig, apply_lora, parameter_counts
from honelm.checkpoint import base_state_dict, save_pretrained_atomic
from honelm.config import TrainConfig
from honelm.errors import ConfigError
from honelm.loop import BatchStream, TrainPlan, fit
from honelm.models import LoadedModel, build_model, load_checkpoint, load_model
from honelm.objectives.lm import CausalLM
from honelm.optim import make_optimizer

VOCAB = 120


def decoder_lm(seed: int = 0):
    return build_model("decoder", "test", VOCAB, task="lm", seed=seed, pad_token_id=0, eos_token_id=1)


def encoder_classifier(seed: int = 0, vocab: int = VOCAB):
    return build_model("encoder", "test", vocab, task="classify", num_labels=3, seed=seed,
                       id2label={0: "a", 1: "b", 2: "c"})


def batch(seed: int = 0, rows: int = 4, length: int = 9) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 40, (rows, length), generator=g)  # within the small tokenizer's vocabulary too
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # some padding
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask,
            "labels": torch.randint(0, 3, (rows,), generator=g)}


def outputs(model, b) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


def train_steps(model, steps: int = 3, lr: float = 1e-2) -> None:
    """A few AdamW steps on a classification (or next-token) loss through honelm's optimizer."""
    opt = make_optimizer(model, TrainConfig(lr=lr, weight_decay=0.01))
    model.train()
    for s in range(steps):
        b = batch(seed=s)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        if logits.dim() == 3:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), b["input_ids"][:, 1:].reshape(-1))
        else:
            loss = F.cross_entropy(logits, b["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def lora(**kw) -> LoraConfig:
    return LoraConfig(enabled=True, **{"r": 4, "alpha": 8, "dropout": 0.0, **kw})


def quiet(_: str) -> None:
    pass


@pytest.mark.parametrize("task, kw", [
    ("lm", {}), ("classify", {}), ("lm", {"init": "gaussian"}), ("classify", {"dora": True}),
    ("lm", {"rslora": True, "dropout": 0.1}),
])
def test_identical_to_base_before_the_first_step(task, kw):
    model = decoder_lm() if task == "lm" else encoder_classifier()
    b = batch()
    ref = outputs(model, b)
    wrapped = apply_lora(LoadedModel.built(model), lora(**kw), task, quiet).model
    assert torch.equal(outputs(wrapped, b), ref)  # bit-exact: B = 0 (or B·A = 0) adds exact zeros


@pytest.mark.parametrize("init", ["orthogonal", "pissa", "olora"])
def test_decomposing_inits_keep_the_function_up_to_rounding(init):
    model = encoder_classifier()
    b = batch()
    ref = outputs(model, b)
    wrapped = apply_lora(LoadedModel.built(model), lora(init=init), "classify", quiet).model
    # orthogonal: B0·A0 = 0 only in exact arithmetic; pissa/olora: W_res + s·B0·A0 = W0 up to rounding (SVD / QR)
    torch.testing.assert_close(outputs(wrapped, b), ref, rtol=1e-4, atol=1e-5)
    assert mutates_base(init) == (init != "orthogonal")  # a rewritten base must be saved with the run


def test_only_adapters_and_head_change():
    model = encoder_classifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = apply_lora(LoadedModel.built(model), lora(), "classify", quiet).model
    trainable = {n: p.detach().clone() for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or ".modules_to_save." in n for n in trainable)
    assert any("classifier.modules_to_save" in n for n in trainable)
    optimizer = make_optimizer(wrapped, TrainConfig())
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == parameter_counts(wrapped)[0]
    train_steps(wrapped)
    base = base_state_dict(wrapped)
    assert base.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(base[k], v), f"frozen base weight {k} changed"
    for n, p in wrapped.named_parameters():
        if n in trainable:
            assert not torch.equal(p, trainable[n]), f"{n} did not train"


@pytest.mark.parametrize("rslora", [False, True])
def test_merged_equals_unmerged_and_scaling_is_applied_once(rslora):
    wrapped = apply_lora(LoadedModel.built(decoder_lm()), lora(rslora=rslora), "lm", quiet).model
    train_steps(wrapped)
    b = batch()
    unmerged = outputs(wrapped, b)
    layer = wrapped.base_model.model.model.layers[0].self_attn.q_proj
    w0, a, bm = (layer.base_layer.weight.detach().clone(), layer.lora_A["default"].weight.detach(),
                 layer.lora_B["default"].weight.detach())
    merged = copy.deepcopy(wrapped).merge_and_unload()
    scaling = 8 / (2.0 if rslora else 4)  # alpha / sqrt(r) or alpha / r, with r=4, alpha=8: worked by hand
    torch.testing.assert_close(merged.model.layers[0].self_attn.q_proj.weight, w0 + scaling * bm @ a)
    torch.testing.assert_close(outputs(merged, b), unmerged, rtol=1e-5, atol=1e-5)


def test_target_matching_nothing_lists_the_linear_modules():
    with pytest.raises(ConfigError, match=r"q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"):
        apply_lora(LoadedModel.built(decoder_lm()), lora(target_modules="query"), "lm", quiet).model
    with pytest.raises(ConfigError, match=r"'vproj' names no .*q_proj"):  # one typo in a list is caught too
        apply_lora(LoadedModel.built(decoder_lm()), lora(target_modules="q_proj,vproj"), "lm", quiet).model
    with pytest.raises(ConfigError, match=r"regex .* matches no .*query, key, value, dense"):
        apply_lora(LoadedModel.built(encoder_classifier()), lora(target_modules=r"re:.*q_proj"), "classify",
                   quiet).model
    with pytest.raises(ConfigError, match="invalid regex"):
        apply_lora(LoadedModel.built(decoder_lm()), lora(target_modules="re:(q"), "lm", quiet).model


@pytest.mark.parametrize("spec", [r"re:.*\.(q|v)_proj", "q_proj, v_proj", "self_attn.q_proj,self_attn.v_proj"])
def test_regex_and_list_targets(spec):
    wrapped = apply_lora(LoadedModel.built(decoder_lm()), lora(target_modules=spec), "lm", quiet).model
    adapted = sorted(n for n, m in wrapped.named_modules() if hasattr(m, "lora_A"))
    assert adapted == [f"base_model.model.model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qv"]


def test_embeddings_target_adapts_the_input_embedding_and_merges_exactly():
    """`all-linear,embeddings`: the token embedding gets a LoRA lookup (identity at init, trains, merges to the
    same outputs); refused where the embedding is tied to an LM's output layer (a merge would change that too)."""
    classifier = build_model("decoder", "test", VOCAB, task="classify", num_labels=2, seed=0, pad_token_id=0)
    loaded = apply_lora(LoadedModel.built(classifier), lora(target_modules="all-linear,embeddings"), "classify", quiet)
    wrapped = loaded.model
    emb = wrapped.base_model.model.model.embed_tokens
    assert hasattr(emb, "lora_embedding_A") and hasattr(wrapped.base_model.model.model.layers[0].self_attn.q_proj,
                                                         "lora_A")
    b = batch()
    before = wrapped(input_ids=b["input_ids"]).logits
    torch.testing.assert_close(before, classifier(input_ids=b["input_ids"]).logits)  # B = 0: the base model
    with torch.no_grad():
        emb.lora_embedding_A["default"].normal_()  # peft starts an embedding adapter with A = 0 (B random)
    changed = wrapped(input_ids=b["input_ids"]).logits
    assert not torch.allclose(changed, before)
    merged = wrapped.merge_and_unload()
    torch.testing.assert_close(merged(input_ids=b["input_ids"]).logits, changed, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="tied to its output layer"):
        apply_lora(LoadedModel.built(decoder_lm()), lora(target_modules="all-linear,embeddings"), "lm", quiet)


def test_all_linear_skips_the_output_layer_and_heads():
    classifier = build_model("decoder", "test", VOCAB, task="classify", num_labels=2, seed=0, pad_token_id=0)
    wrapped = apply_lora(LoadedModel.built(classifier), lora(target_modules="all-linear"), "classify", quiet).model
    adapted = {n.rsplit(".", 1)[-1] for n, m in wrapped.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    lm = apply_lora(LoadedModel.built(decoder_lm()), lora(target_modules="all-linear"), "lm", quiet).model
    assert not hasattr(lm.base_model.model.lm_head, "lora_A")  # tied to the embedding: not a target


def test_auto_targets_adapt_a_decoder_classifiers_embeddings_and_otherwise_linears_only():
    classifier = build_model("decoder", "test", VOCAB, task="classify", num_labels=2, seed=0, pad_token_id=0)
    wrapped = apply_lora(LoadedModel.built(classifier), lora(), "classify", quiet).model  # the default: auto
    adapted = {n.rsplit(".", 1)[-1] for n, m in wrapped.named_modules() if hasattr(m, "lora_A") or hasattr(m, "lora_embedding_A")}
    assert adapted == {"embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    encoder = apply_lora(LoadedModel.built(encoder_classifier()), lora(), "classify", quiet).model
    assert not any(len(getattr(m, "lora_embedding_A", ())) for m in encoder.modules())  # an encoder: all-linear
    assert sum(len(getattr(m, "lora_A", ())) > 0 for m in encoder.modules()) >= 6
    lm = apply_lora(LoadedModel.built(decoder_lm()), lora(), "lm", quiet).model  # tied: the embedding is left alone
    assert not any(len(getattr(m, "lora_embedding_A", ())) for m in lm.modules())
    assert sum(len(getattr(m, "lora_A", ())) > 0 for m in lm.modules()) >= 7


def test_weights_the_loader_initialised_train_fully(tmp_path):
    build_model("encoder", "test", VOCAB, task="mlm", seed=0).save_pretrained(tmp_path / "mlm")
    loaded = load_checkpoint(tmp_path / "mlm", "classify", num_labels=2)  # BertForMaskedLM has no pooler: it is new
    assert "bert.pooler.dense.weight" in loaded.new_weights and loaded.source is None
    lines: list[str] = []
    adapted = apply_lora(loaded, lora(), "classify", lines.append)
    wrapped = adapted.model
    assert "trained fully: classifier, bert.pooler;" in lines[0]
    assert wrapped.base_model.model.bert.pooler.modules_to_save["default"].dense.weight.requires_grad
    assert not any("pooler" in t for t in wrapped.peft_config["default"].target_modules)
    assert adapted.base_pending  # no directory holds a random pooler and head: the run saves its base


def test_a_new_mlm_head_trains_but_its_tied_decoder_stays_tied(tmp_path):
    build_model("encoder", "test", VOCAB, task="base", seed=0).save_pretrained(tmp_path / "bare")
    loaded = load_checkpoint(tmp_path / "bare", "mlm")  # a bare encoder: the whole MLM head is new, its decoder tied
    lines: list[str] = []
    wrapped = apply_lora(loaded, lora(), "mlm", lines.append).model
    inner = wrapped.base_model.model
    assert "trained fully: cls.predictions.transform;" in lines[0]
    assert inner.cls.predictions.decoder.weight is inner.bert.embeddings.word_embeddings.weight
    assert not inner.cls.predictions.decoder.weight.requires_grad  # not vocab x hidden trained weights
    assert "stay at their init" in lines[1] and "cls.predictions.bias" in lines[1]


@pytest.mark.parametrize("variant", ["rslora", "dora"])
def test_rslora_and_dora_build_and_train(variant):
    wrapped = apply_lora(LoadedModel.built(encoder_classifier()), lora(**{variant: True}), "classify", quiet).model
    layer = wrapped.base_model.model.bert.encoder.layer[0].attention.self.query
    if variant == "rslora":
        assert layer.scaling["default"] == pytest.approx(8 / 2.0)
    else:
        assert "default" in layer.lora_magnitude_vector
    watched = {n: p.detach().clone() for n, p in wrapped.named_parameters() if p.requires_grad}
    train_steps(wrapped, steps=2)
    assert all(torch.isfinite(p).all() for p in wrapped.parameters())
    changed = [n for n, p in wrapped.named_parameters() if n in watched and not torch.equal(p, watched[n])]
    assert any("lora_B" in n for n in changed)
    if variant == "dora":
        assert any("lora_magnitude_vector" in n for n in changed)


def test_trainable_and_total_counts_are_logged():
    lines: list[str] = []
    model = encoder_classifier()
    base_total = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for p in [*model.classifier.parameters(), *model.bert.pooler.parameters()])
    wrapped = apply_lora(LoadedModel.built(model), lora(), "classify", lines.append).model
    (line,) = lines
    found = re.search(r"([\d,]+) trainable of ([\d,]+) parameters \(([\d.]+)%\)", line)
    assert found, line
    trainable, total = (int(found.group(i).replace(",", "")) for i in (1, 2))
    lora_params = sum(p.numel() for n, p in wrapped.named_parameters() if "lora_" in n)
    assert trainable == lora_params + head == sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    assert total == base_total + lora_params
    assert float(found.group(3)) == pytest.approx(100 * trainable / total, abs=0.01)
    assert "trained fully: classifier, bert.pooler" in line and "r=4" in line


def test_the_pooler_trains_fully_as_part_of_the_head_unless_told_otherwise():
    """`lora.train_pooler` (default true): BERT's pooler is a head (a full copy trains; no adapter on it);
    false: it is adapted like any Linear and its weights stay frozen."""
    for train_pooler in (True, False):
        wrapped = apply_lora(LoadedModel.built(encoder_classifier()), lora(train_pooler=train_pooler), "classify",
                             quiet).model
        names = {n for n, p in wrapped.named_parameters() if p.requires_grad}
        as_head = {n for n in names if ".pooler.modules_to_save." in n}
        adapted = {n for n in names if ".pooler.dense.lora_" in n}
        assert (bool(as_head), bool(adapted)) == (train_pooler, not train_pooler), names
        assert ("bert.pooler" in wrapped.peft_config["default"].modules_to_save) == train_pooler
        before = {n: p.detach().clone() for n, p in wrapped.named_parameters()}
        train_steps(wrapped)
        moved = {n for n, p in wrapped.named_parameters() if not torch.equal(p, before[n])}
        assert any(".pooler." in n for n in moved) and moved <= names


@pytest.mark.parametrize("init, message", [("eva", "data"), ("false", "not the base"), ("loftq", "quantises"),
                                           ("bogus", "choose one of")])
def test_unsupported_inits_fail_clearly(init, message):
    with pytest.raises(ConfigError, match=message):
        apply_lora(LoadedModel.built(decoder_lm()), lora(init=init), "lm", quiet).model
    with pytest.raises(ConfigError, match="even"):
        apply_lora(LoadedModel.built(decoder_lm()), lora(init="orthogonal", r=3), "lm", quiet).model


# ------------------------------------------------------------------------------------------------
# adapter directories


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A trained LoRA encoder classifier saved as a run's best/ (adapter + tokenizer), and its logits."""
    from honelm.tokenizer import train_tokenizer

    run = tmp_path_factory.mktemp("lora") / "run"
    tokenizer = train_tokenizer(["the film was good", "a bad film", "good acting", "bad music"] * 5, kind="wordpiece",
                                vocab_size=60, min_frequency=1)
    model = encoder_classifier(vocab=len(tokenizer))
    adapted = apply_lora(LoadedModel.built(model), lora(dora=True), "classify", quiet)
    wrapped = adapted.model
    train_steps(wrapped)
    save_pretrained_atomic(wrapped, tokenizer, run / "best", {"step": 3}, base_pending=adapted.base_pending)
    texts = ["the film was good", "bad music", "good"]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    wrapped.eval()
    with torch.no_grad():
        logits = wrapped(**enc).logits
    return run, enc, logits


def test_best_is_a_standard_peft_directory_that_plain_peft_loads(lora_run):
    from peft import AutoPeftModelForSequenceClassification, PeftModel
    from transformers import AutoModelForSequenceClassification

    run, enc, logits = lora_run
    best = run / "best"
    assert (best / "adapter_model.safetensors").is_file() and not (best / "model.safetensors").exists()
    config = json.loads((best / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((run / "base").resolve())  # random init: base saved once
    assert "classifier" in config["modules_to_save"] and config["use_dora"] is True
    assert "bert.pooler" in config["modules_to_save"]  # lora.train_pooler: the merged export below carries it too
    base = AutoModelForSequenceClassification.from_pretrained(config["base_model_name_or_path"])
    with torch.no_grad():
        plain = PeftModel.from_pretrained(base, best).eval()(**enc).logits
        auto = AutoPeftModelForSequenceClassification.from_pretrained(best).eval()(**enc).logits
    torch.testing.assert_close(plain, logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(auto, logits, rtol=0, atol=1e-6)


def test_merged_export_loads_in_plain_transformers_with_the_same_predictions(lora_run, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from honelm.stages.export import export

    run, enc, logits = lora_run
    out = export(run, merge=True, out=tmp_path / "merged", say=quiet)
    assert not (out / "adapter_config.json").exists() and (out / "model.safetensors").is_file()
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        merged = model(**tok(["the film was good", "bad music", "good"], padding=True, return_tensors="pt")).logits
    assert model.config.id2label == {0: "a", 1: "b", 2: "c"}
    assert torch.equal(merged.argmax(-1), logits.argmax(-1))
    torch.testing.assert_close(merged, logits, rtol=1e-5, atol=1e-5)
    # without --merge: the adapter directory itself; an existing destination is refused
    copied = export(run, merge=False, out=tmp_path / "adapter", say=quiet)
    assert (copied / "adapter_config.json").is_file() and (copied / "tokenizer.json").is_file()
    from honelm.errors import HonelmError

    with pytest.raises(HonelmError, match="not empty"):
        export(run, merge=True, out=tmp_path / "adapter", say=quiet)


def test_export_of_a_run_without_lora_copies_best(tmp_path):
    from honelm.stages.export import export

    save_pretrained_atomic(encoder_classifier(), None, tmp_path / "run" / "best", {"step": 1})
    lines: list[str] = []
    out = export(tmp_path / "run", merge=True, say=lines.append)
    assert out == tmp_path / "run" / "export" and (out / "model.safetensors").is_file() and (out / "best.json").is_file()
    assert "nothing to merge" in lines[0]


def test_load_model_merges_and_reheads_an_adapter(lora_run):
    run, enc, logits = lora_run
    merged_record = load_checkpoint(run / "best", "classify", num_labels=3, id2label={0: "x", 1: "y", 2: "z"})
    merged = merged_record.model
    with torch.no_grad():
        torch.testing.assert_close(merged(**enc).logits, logits, rtol=1e-5, atol=1e-5)
    assert merged.config.id2label == {0: "x", 1: "y", 2: "z"} and merged_record.source is None
    reheaded_record = load_checkpoint(run / "best", "classify", num_labels=2)  # chaining into a task with other labels
    reheaded = reheaded_record.model
    assert reheaded.classifier.weight.shape[0] == 2 and "classifier.weight" in reheaded_record.new_weights
    torch.testing.assert_close(reheaded.bert.encoder.layer[0].attention.self.query.weight,
                               merged.bert.encoder.layer[0].attention.self.query.weight)


@pytest.mark.parametrize("init", ["default", "pissa"])
def test_adapter_points_at_the_weights_it_was_trained_on(tmp_path, init):
    decoder_lm().save_pretrained(tmp_path / "src")
    adapted = apply_lora(load_checkpoint(tmp_path / "src", "lm"), lora(init=init), "lm", quiet)
    wrapped = adapted.model
    train_steps(wrapped, steps=2)
    b = batch()
    expected = outputs(wrapped, b)
    save_pretrained_atomic(wrapped, None, tmp_path / "run" / "best", base_pending=adapted.base_pending)
    base = json.loads((tmp_path / "run" / "best" / "adapter_config.json").read_text())["base_model_name_or_path"]
    if init == "default":  # the frozen base is init_from itself: no copy
        assert base == str((tmp_path / "src").resolve()) and not (tmp_path / "run" / "base").exists()
    else:  # pissa rewrote the base: the run keeps its own
        assert base == str((tmp_path / "run" / "base").resolve())
    torch.testing.assert_close(outputs(load_model(tmp_path / "run" / "best", "lm"), b), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# resume


def _fit(tmp_path, name: str, resume: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(2, VOCAB, (int(torch.randint(4, 10, (1,), generator=g)),), generator=g) for _ in range(16)]

    def collate(idx: list[int]) -> dict[str, torch.Tensor]:
        width = max(len(rows[i]) for i in idx)
        ids = torch.zeros(len(idx), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(idx):
            ids[r, : len(rows[i])], mask[r, : len(rows[i])] = rows[i], 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    cfg = TrainConfig(lr=1e-2, batch_size=4, max_steps=6, eval_every=3, save_every=3, log_every=2, precision="fp32",
                      progress=False, tensorboard=False, warmup_steps=1, keep_checkpoints=10)
    torch.manual_seed(seed)  # what seed_everything does before a stage builds its model
    # dropout: RNG must resume too
    model = apply_lora(LoadedModel.built(decoder_lm(seed=seed)), lora(dropout=0.1), "lm", quiet).model
    val = collate(list(range(4)))
    run = tmp_path / name
    torch.manual_seed(0)
    plan = TrainPlan(CausalLM(), BatchStream(len(rows), collate, 4, 1, seed=0),
                     lambda m: {"val_loss": float(CausalLM()(m, val).value)},
                     lambda m, info: save_pretrained_atomic(m, None, run / "best", info, base_pending=True),  # random init
                     "val_loss")
    fit(model, plan, cfg, rt.Runtime(device=torch.device("cpu")), run, resume=resume)
    return model


def test_resume_with_lora_is_bit_identical(tmp_path):
    full = _fit(tmp_path, "full")
    _fit(tmp_path, "cut")
    for c in (tmp_path / "cut" / "checkpoints").iterdir():  # as if killed after step 3's checkpoint
        if not c.name.endswith("00000003"):
            shutil.rmtree(c)
    torch.manual_seed(123)
    resumed = _fit(tmp_path, "cut", resume=True, seed=99)  # another base: the checkpoint restores it
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), n
    assert (tmp_path / "cut" / "best" / "adapter_config.json").is_file() and (tmp_path / "cut" / "base").is_dir()


# ------------------------------------------------------------------------------------------------
# lora.carry: keep training an adapter in the next stage


def _mlm_adapter_run(tmp_path, **kw):
    """An encoder MLM checkpoint with a LoRA adapter trained on it (as `honelm adapt` with LoRA leaves it)."""
    from transformers import AutoModelForMaskedLM

    build_model("encoder", "test", VOCAB, task="mlm", seed=0).save_pretrained(tmp_path / "mlm")
    adapted = apply_lora(load_checkpoint(tmp_path / "mlm", "mlm"), lora(**kw), "mlm", quiet)
    wrapped = adapted.model
    train_steps(wrapped)
    save_pretrained_atomic(wrapped, None, tmp_path / "run" / "best", {"step": 3}, base_pending=adapted.base_pending)
    assert AutoModelForMaskedLM.from_pretrained(tmp_path / "mlm")  # the base the adapter points at
    return tmp_path / "run" / "best", wrapped


def test_carry_continues_the_same_adapter_on_its_base_for_a_new_task(tmp_path):
    from peft.utils import get_peft_model_state_dict

    from honelm.models import load_for_carry, load_merged

    best, trained = _mlm_adapter_run(tmp_path)
    model = load_for_carry(best, "classify", num_labels=3, id2label={0: "a", 1: "b", 2: "c"})
    lines: list[str] = []
    carried = apply_lora(model, lora(carry=True), "classify", lines.append).model
    assert lines[0].startswith(f"lora: carried on the adapter of {best}: 24 adapter tensors;")
    # the MLM head's adapter has no module to go to in a classifier, and the line says so
    assert lines[0].endswith("left behind (no such module of that shape in this model): "
                             "cls.predictions.transform.dense.lora_A.weight, cls.predictions.transform.dense.lora_B.weight")
    before = get_peft_model_state_dict(trained)
    after = get_peft_model_state_dict(carried)
    lora_keys = [k for k in before if "lora_" in k and ".cls." not in k]
    assert lora_keys and all(torch.equal(before[k], after[k]) for k in lora_keys)  # the adapter's own weights
    assert carried.base_model.model.classifier.modules_to_save["default"].weight.requires_grad  # the new head trains
    for name, p in carried.named_parameters():  # the base stays frozen: only adapter and head tensors train
        assert p.requires_grad == ("lora_" in name or "modules_to_save" in name), name
    # the carried trunk computes what the merged adapter computes (the new head aside)
    merged = load_merged(best, "mlm").model
    b = batch()
    carried.eval()
    with torch.no_grad():
        mine = carried.base_model.model.bert(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        theirs = merged.bert(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    # and it keeps training: the adapter moves away from where it started
    train_steps(carried, steps=2)
    moved = get_peft_model_state_dict(carried)
    assert any(not torch.equal(moved[k], before[k]) for k in lora_keys)


def _cue_batch(seed: int, rows: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens whose second token (3 or 4) is the label: a task the trunk below learns in 30 steps."""
    g = torch.Generator().manual_seed(seed)
    ids, labels = torch.randint(5, 100, (rows, 12), generator=g), torch.randint(0, 2, (rows,), generator=g)
    ids[:, 1] = torch.where(labels == 1, 3, 4)
    return ids, labels


def _cue_loss(model, steps: int, first: int, lr: float) -> float:
    """Train `steps` AdamW steps on cue batches from seed `first`; the loss on 256 fresh examples after."""
    opt = make_optimizer(model, TrainConfig(lr=lr, weight_decay=0.01))
    model.train()
    for s in range(steps):
        ids, labels = _cue_batch(first + s)
        F.cross_entropy(model(input_ids=ids).logits, labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    ids, labels = _cue_batch(999, rows=256)
    with torch.no_grad():
        return float(F.cross_entropy(model(input_ids=ids).logits, labels))


def test_a_pooler_with_tiny_outputs_holds_a_fresh_head_back_unless_it_trains_as_part_of_the_head():
    """Why `lora.train_pooler` is on (docs/lora.md, "The pooler is part of the head"): a trunk that already knows
    the task, a fresh classifier, and a pretrained pooler whose outputs are tiny (all-MiniLM-L6-v2's stay within
    ±0.27: it was never trained for the checkpoint's sentence task). With the pooler adapted like any Linear, LoRA's
    rank-4 update and the head must first scale those outputs up; with the pooler trained as part of the head,
    the same 20 steps at lr 1e-3 get the loss well down."""
    losses = {}
    for train_pooler in (True, False):
        # no dropout: with it, these few steps at lr 1e-2 vary from process to process (one run in a few even left
        # the trained pooler at chance); without it the losses below are the same on 1 and 2 threads
        model = build_model("encoder", "test", VOCAB, task="classify", num_labels=3, seed=0,
                            id2label={0: "a", 1: "b", 2: "c"}, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)
        _cue_loss(model, 30, 0, 1e-2)  # the "pretrained" trunk: full fine-tuning on the task
        torch.manual_seed(1)
        model.classifier.reset_parameters()  # a fresh head
        with torch.no_grad():  # a pooler with tiny outputs
            model.bert.pooler.dense.weight.mul_(0.01)
            model.bert.pooler.dense.bias.zero_()
        wrapped = apply_lora(LoadedModel.built(model), lora(train_pooler=train_pooler), "classify", quiet).model
        losses[train_pooler] = _cue_loss(wrapped, 20, 100, 1e-3)
    assert losses[True] < 0.5 * losses[False], losses  # measured: 0.29 against 0.71 (ln 2 = 0.69: chance)


def test_carry_keeps_an_adapted_pooler_adapted_and_a_head_pooler_a_head(tmp_path):
    """A classifier adapter trained with `lora.train_pooler=false` holds LoRA weights for the pooler: carried into
    a stage with the default, the pooler stays adapted (its tensors load) rather than becoming a fresh head.
    One trained with the default carries the pooler as a head, and peft's folded suffix targets (`dense`) put no
    adapter inside it."""
    from peft.utils import get_peft_model_state_dict

    from honelm.models import load_for_carry

    labels = {"num_labels": 3, "id2label": {0: "a", 1: "b", 2: "c"}}
    for train_pooler in (False, True):
        where = tmp_path / str(train_pooler)
        encoder_classifier().save_pretrained(where / "base")
        adapted = apply_lora(load_checkpoint(where / "base", "classify", **labels), lora(train_pooler=train_pooler),
                             "classify", quiet)
        train_steps(adapted.model)
        save_pretrained_atomic(adapted.model, None, where / "best", {"step": 3}, base_pending=adapted.base_pending)
        config = json.loads((where / "best" / "adapter_config.json").read_text())
        config["target_modules"] = ["dense", "key", "query", "value"]  # how peft folds 20+ names (MiniLM's 36)
        (where / "best" / "adapter_config.json").write_text(json.dumps(config))
        carried = apply_lora(load_for_carry(where / "best", "classify", **labels), lora(carry=True), "classify",
                             quiet).model
        state = get_peft_model_state_dict(carried)
        if train_pooler:
            assert not any(".pooler." in k and "lora_" in k for k in state)
            assert "bert.pooler" in carried.peft_config["default"].modules_to_save
        else:
            saved = get_peft_model_state_dict(adapted.model)
            keys = [k for k in saved if ".pooler.dense.lora_" in k]
            assert keys and all(torch.equal(saved[k], state[k]) for k in keys)
            assert "bert.pooler" not in (carried.peft_config["default"].modules_to_save or [])


def test_carry_refuses_a_section_that_contradicts_the_adapter(tmp_path):
    from honelm.models import load_for_carry

    best, _ = _mlm_adapter_run(tmp_path)
    with pytest.raises(ConfigError, match=r"lora.r=8 but the adapter has 4.*lora.carry=false"):
        apply_lora(load_for_carry(best, "mlm"), lora(carry=True, r=8), "mlm", quiet).model
    with pytest.raises(ConfigError, match=r"lora.dora=True but the adapter has False"):
        apply_lora(load_for_carry(best, "mlm"), lora(carry=True, dora=True), "mlm", quiet).model
    with pytest.raises(ConfigError, match=r"lora.init=pissa would be overwritten"):
        apply_lora(load_for_carry(best, "mlm"), lora(carry=True, init="pissa"), "mlm", quiet).model


def test_carry_needs_lora_and_an_adapter_and_is_refused_where_the_reference_would_change(tmp_path):
    from honelm import boosters, registry

    def stage_cfg(stage: str, **lora: bool) -> object:  # the stage's own config: the check reads its capabilities
        return registry.config_class(stage)(lora=LoraConfig(**lora))

    assert not boosters.carries_adapter(stage_cfg("classify", enabled=True))
    assert boosters.carries_adapter(stage_cfg("sft", enabled=True, carry=True))
    with pytest.raises(ConfigError, match="needs lora.enabled=true"):
        boosters.check(stage_cfg("classify", carry=True))
    for stage in ("dpo", "ppo"):
        with pytest.raises(ConfigError, match=f"not available for {stage}"):
            boosters.check(stage_cfg(stage, enabled=True, carry=True))


def test_an_init_that_rewrites_the_base_is_refused_where_the_reference_is_the_adapter_disabled_policy():
    """The one stage x booster check: pissa/olora rewrite the base, so dpo's and ppo's adapter-disabled
    reference would not be the starting policy; stages without such a reference accept them."""
    from honelm import boosters, registry

    for stage in ("dpo", "ppo"):
        for init in ("pissa", "olora"):
            with pytest.raises(ConfigError, match=f"{stage} with lora.init={init}: that init rewrites the base"):
                boosters.check(registry.config_class(stage)(lora=LoraConfig(enabled=True, init=init)))
    for stage in ("sft", "classify"):
        boosters.check(registry.config_class(stage)(lora=LoraConfig(enabled=True, init="pissa")))
