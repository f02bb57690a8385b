"""Tests for honelm.models: presets, seeded builds, save/load round trips, re-heading, FLOPs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaModel,
)

from honelm.errors import ConfigError, HonelmError
from honelm.models import (
    PRESETS,
    SIZES,
    build_config,
    build_model,
    count_parameters,
    flops_per_token,
    load_checkpoint,
    load_model,
    model_kind,
)

VOCAB = 120
PAD, EOS = 1, 0


def _ids(vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (2, 7), generator=g)


def test_presets_cover_all_sizes() -> None:
    for arch in ("decoder", "encoder"):
        assert tuple(PRESETS[arch]) == SIZES
        for size, kw in PRESETS[arch].items():
            head_dim = kw["hidden_size"] // kw["num_attention_heads"]
            assert kw["hidden_size"] % kw["num_attention_heads"] == 0, (arch, size)
            assert head_dim % 8 == 0, (arch, size)


@pytest.mark.parametrize("size", ["test", "tiny"])
@pytest.mark.parametrize("arch", ["decoder", "encoder"])
def test_presets_build_and_run(arch: str, size: str) -> None:
    model = build_model(arch, size, VOCAB, seed=0, pad_token_id=PAD, eos_token_id=EOS)
    assert isinstance(model, LlamaForCausalLM if arch == "decoder" else BertForMaskedLM)
    assert model.config.hidden_size == PRESETS[arch][size]["hidden_size"]
    assert model.config._attn_implementation == "sdpa"
    model.eval()
    with torch.no_grad():
        out = model(input_ids=_ids())
    assert out.logits.shape == (2, 7, VOCAB)
    assert torch.isfinite(out.logits).all()
    trainable, total = count_parameters(model)
    assert trainable == total > 0
    print(f"{arch}/{size} vocab={VOCAB}: {total:,} params")


def test_tiny_decoder_param_range() -> None:
    with torch.device("meta"):
        model = build_model("decoder", "tiny", 8000)
    _, total = count_parameters(model)
    print(f"decoder/tiny vocab=8000: {total:,} params")
    assert 1_000_000 <= total <= 2_000_000


def test_small_decoder_is_about_30m_params() -> None:
    # Meta device: shapes only, nothing allocated or initialized.
    with torch.device("meta"):
        model = build_model("decoder", "small", 32000)
    _, total = count_parameters(model)
    print(f"decoder/small vocab=32000: {total:,} params")
    assert 25_000_000 <= total <= 35_000_000


def test_decoder_config_is_llama_style() -> None:
    cfg = build_config("decoder", "test", VOCAB, max_positions=256, pad_token_id=PAD, bos_token_id=EOS,
                       eos_token_id=EOS)
    assert isinstance(cfg, LlamaConfig)
    assert cfg.tie_word_embeddings is True
    assert cfg.attention_bias is False and cfg.mlp_bias is False
    assert cfg.attention_dropout == 0.0
    assert cfg.hidden_act == "silu"
    assert cfg.max_position_embeddings == 256
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (PAD, EOS, EOS)
    assert cfg.rope_parameters["rope_type"] == "default"
    enc = build_config("encoder", "test", VOCAB)
    assert isinstance(enc, BertConfig)
    assert enc.pad_token_id == 0


def test_tied_embeddings_for_decoder() -> None:
    model = build_model("decoder", "test", VOCAB, seed=0)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert not any(b is not None for m in model.modules() if isinstance(m, torch.nn.Linear) for b in [m.bias])


def test_overrides_and_unknown_keys() -> None:
    cfg = build_config("decoder", "test", VOCAB, num_hidden_layers=3, rope_theta=500000.0)
    assert cfg.num_hidden_layers == 3
    assert cfg.rope_parameters["rope_theta"] == 500000.0
    with pytest.raises(ConfigError, match="not_a_field"):
        build_config("decoder", "test", VOCAB, not_a_field=1)
    with pytest.raises(ConfigError, match="hidden_dropout_prob"):
        build_config("decoder", "test", VOCAB, hidden_dropout_prob=0.1)  # a BERT key, not Llama


def test_unknown_size_and_arch_name_valid_choices() -> None:
    with pytest.raises(ConfigError, match="test, tiny, small, base"):
        build_config("decoder", "huge", VOCAB)
    with pytest.raises(ConfigError, match="decoder, encoder"):
        build_config("seq2seq", "test", VOCAB)
    with pytest.raises(ConfigError, match="classify"):
        build_model("decoder", "test", VOCAB, task="generate")


def test_seeded_build_is_deterministic_and_keeps_global_rng() -> None:
    torch.manual_seed(1234)
    expected_next = torch.rand(3)
    torch.manual_seed(1234)
    a = build_model("decoder", "test", VOCAB, seed=7)
    after = torch.rand(3)
    assert torch.equal(after, expected_next), "build_model(seed=...) consumed the global RNG"
    b = build_model("decoder", "test", VOCAB, seed=7)
    c = build_model("decoder", "test", VOCAB, seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.embed_tokens.weight"], sc["model.embed_tokens.weight"])


@pytest.mark.parametrize(
    "arch,task,cls",
    [
        ("decoder", "lm", LlamaForCausalLM),
        ("decoder", "base", LlamaModel),
        ("decoder", "classify", LlamaForSequenceClassification),
        ("encoder", "lm", BertForMaskedLM),
        ("encoder", "mlm", BertForMaskedLM),
        ("encoder", "base", BertModel),
        ("encoder", "classify", BertForSequenceClassification),
    ],
)
def test_task_classes(arch: str, task: str, cls: type) -> None:
    labels = 3 if task == "classify" else None
    model = build_model(arch, "test", VOCAB, task=task, num_labels=labels, seed=0, pad_token_id=PAD)
    assert type(model) is cls
    if task == "classify":
        assert model.config.num_labels == 3
        assert model.config.problem_type is None


def test_decoder_mlm_is_config_error() -> None:
    with pytest.raises(ConfigError, match="encoder"):
        build_model("decoder", "test", VOCAB, task="mlm")


def test_decoder_classify_without_pad_is_config_error() -> None:
    with pytest.raises(ConfigError, match="pad_token_id"):
        build_model("decoder", "test", VOCAB, task="classify", num_labels=2)
    with pytest.raises(ConfigError, match="num_labels"):
        build_model("encoder", "test", VOCAB, task="classify")


@pytest.mark.parametrize("arch", ["decoder", "encoder"])
def test_regression_sets_problem_type(arch: str) -> None:
    model = build_model(arch, "test", VOCAB, task="classify", num_labels=1, seed=0, pad_token_id=PAD)
    assert model.config.problem_type == "regression"
    assert model.config.num_labels == 1
    out = model(input_ids=_ids(), labels=torch.tensor([0.5, -1.0]))
    assert out.logits.shape == (2, 1) and torch.isfinite(out.loss)


@pytest.mark.parametrize("arch,task", [("decoder", "lm"), ("encoder", "mlm"), ("decoder", "classify"),
                                       ("encoder", "classify")])
def test_save_load_round_trip_identical_logits(tmp_path: Path, arch: str, task: str) -> None:
    labels = 3 if task == "classify" else None
    model = build_model(arch, "test", VOCAB, task=task, num_labels=labels, seed=3, pad_token_id=PAD,
                        eos_token_id=EOS).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    record = load_checkpoint(tmp_path, task, num_labels=labels)
    loaded = record.model
    assert type(loaded) is type(model)
    assert record.new_weights == []
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    if arch == "decoder" and task == "lm":
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_classify_from_lm_checkpoint_new_head_same_trunk(tmp_path: Path) -> None:
    lm = build_model("decoder", "test", VOCAB, seed=5, pad_token_id=PAD, eos_token_id=EOS)
    lm.save_pretrained(tmp_path)
    record = load_checkpoint(tmp_path, "classify", id2label={0: "neg", 1: "neu", 2: "pos"})
    clf = record.model
    assert isinstance(clf, LlamaForSequenceClassification)
    assert clf.config.num_labels == 3
    assert clf.config.label2id == {"neg": 0, "neu": 1, "pos": 2}
    assert clf.score.weight.shape == (3, lm.config.hidden_size)
    assert record.new_weights == ["score.weight"]
    trunk_lm, trunk_clf = lm.model.state_dict(), clf.model.state_dict()
    assert trunk_lm.keys() == trunk_clf.keys()
    assert all(torch.equal(trunk_lm[k], trunk_clf[k]) for k in trunk_lm)
    with torch.no_grad():
        assert clf(input_ids=_ids()).logits.shape == (2, 3)


def test_reheading_classifier_with_other_label_count(tmp_path: Path) -> None:
    two = build_model("encoder", "test", VOCAB, task="classify", num_labels=2, seed=0)
    two.save_pretrained(tmp_path)
    record = load_checkpoint(tmp_path, "classify", num_labels=1)
    reg = record.model
    assert reg.config.problem_type == "regression"
    assert reg.classifier.weight.shape == (1, two.config.hidden_size)
    assert set(record.new_weights) == {"classifier.weight", "classifier.bias"}
    assert torch.equal(reg.bert.embeddings.word_embeddings.weight, two.bert.embeddings.word_embeddings.weight)
    # Re-heading a regression checkpoint back to classes must not keep problem_type=regression.
    reg.save_pretrained(tmp_path / "reg")
    back = load_model(tmp_path / "reg", "classify", num_labels=4)
    assert back.config.problem_type is None and back.config.num_labels == 4


def test_load_decoder_without_pad_uses_eos(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    build_model("decoder", "test", VOCAB, seed=0, eos_token_id=EOS).save_pretrained(tmp_path)
    with caplog.at_level("WARNING", logger="honelm.models"):
        clf = load_model(tmp_path, "classify", num_labels=2)
    assert clf.config.pad_token_id == EOS
    assert "pad_token_id" in caplog.text


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(HonelmError, match="nope"):
        load_model(tmp_path / "nope", "lm")
    build_model("encoder", "test", VOCAB, seed=0).save_pretrained(tmp_path / "enc")
    with pytest.raises(ConfigError, match="mlm"):
        load_model(tmp_path / "enc", "lm")
    build_model("decoder", "test", VOCAB, seed=0).save_pretrained(tmp_path / "dec")
    with pytest.raises(ConfigError, match="'lm'"):
        load_model(tmp_path / "dec", "mlm")
    with pytest.raises(ConfigError, match="num_labels"):
        load_model(tmp_path / "dec", "classify", num_labels=2, id2label={0: "a"})


def test_model_kind() -> None:
    assert model_kind(build_config("decoder", "test", VOCAB)) == "decoder"
    assert model_kind(build_model("encoder", "test", VOCAB, seed=0)) == "encoder"
    assert model_kind(BertConfig(is_decoder=True)) == "decoder"
    with pytest.raises(ConfigError):
        model_kind(object())  # type: ignore[arg-type]


def test_flops_per_token_matches_hand_computation() -> None:
    cfg = build_config("decoder", "test", VOCAB)
    d, n_layers, inter, seq = 32, 2, 64, 16
    per_layer = 4 * d * d + 3 * d * inter  # q,k,v,o + gate,up,down
    n_matmul = n_layers * per_layer + VOCAB * d  # + (tied) lm_head
    assert n_matmul == 24_320
    expected = 6 * n_matmul + 12 * n_layers * d * seq
    assert flops_per_token(cfg, seq) == expected == 158_208
    # Attention term grows linearly with sequence length.
    assert flops_per_token(cfg, 2 * seq) - flops_per_token(cfg, seq) == 12 * n_layers * d * seq

    enc = build_config("encoder", "test", VOCAB)
    enc_n = n_layers * (4 * d * d + 2 * d * inter) + VOCAB * d + d * d
    assert flops_per_token(enc, seq) == 6 * enc_n + 12 * n_layers * d * seq
