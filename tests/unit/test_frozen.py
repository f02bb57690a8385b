"""`train.bf16_frozen`: under bf16 autocast, frozen Linear weights are held in bf16 while training.

It must change nothing but memory: the same losses and trained weights bit for bit as with fp32
frozen weights, the exact fp32 weights back after training (also after an error), in every
checkpoint and in a written base; and only plain, untied, non-DoRA Linear weights are touched.
"""

from __future__ import annotations

import contextlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from honelm import runtime as rt
from honelm.boosters.lora import LoraConfig, apply_lora
from honelm.checkpoint import best_writes_base, save_pretrained_atomic
from honelm.config import TrainConfig
from honelm.errors import TrainingError
from honelm.loop import BatchStream, TrainPlan, fit
from honelm.models import LoadedModel, build_model
from honelm.objectives.classify import Classify
from honelm.objectives.lm import CausalLM
from honelm.speed import FrozenBf16, eligible

VOCAB = 120


def lm_rows(n: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(2, VOCAB, (int(torch.randint(4, 10, (1,), generator=g)),), generator=g) for _ in range(n)]


def collate_for(rows: list[torch.Tensor], classify: bool):
    def collate(idx: list[int]) -> dict[str, torch.Tensor]:
        width = max(len(rows[i]) for i in idx)
        ids = torch.zeros(len(idx), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(idx):
            ids[r, : len(rows[i])], mask[r, : len(rows[i])] = rows[i], 1
        labels = torch.tensor([int(rows[i][0]) % 3 for i in idx]) if classify else ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return collate


class Spy:
    """Wraps an objective; records the dtype of one frozen weight (a LoRA base, a reference's) at every step."""

    def __init__(self, inner, probe: nn.Parameter):
        self.inner, self.probe, self.dtypes = inner, probe, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, model, batch):
        return self.inner(model, batch)

    def step(self, model, batch, scale, autocast):
        self.dtypes.append(self.probe.dtype)
        return self.inner.step(model, batch, scale, autocast)


def build(task: str, seed: int = 0, **lora_kw):
    torch.manual_seed(seed)
    if task == "lm":
        base = build_model("decoder", "test", VOCAB, task="lm", seed=seed, pad_token_id=0, eos_token_id=1)
    else:
        base = build_model("encoder", "test", VOCAB, task="classify", num_labels=3, seed=seed,
                           id2label={0: "a", 1: "b", 2: "c"})
    cfg = LoraConfig(enabled=True, **{"r": 4, "alpha": 8, "dropout": 0.1, **lora_kw})
    return apply_lora(LoadedModel.built(base), cfg, task, lambda _: None).model


def run_fit(tmp_path, name: str, task: str, bf16_frozen: bool, resume: bool = False, max_steps: int = 6,
            seed: int = 0, objective=None, spy: bool = False, **lora_kw):
    """fit() a LoRA model under bf16 autocast; `spy=True` wraps the objective in a `Spy` on a base weight."""
    rows = lm_rows()
    collate = collate_for(rows, classify=task == "classify")
    model = build(task, seed=seed, **lora_kw)
    obj = objective or (Classify() if task == "classify" else CausalLM())
    if spy:
        # a frozen Linear's weight (FrozenBf16 holds Linear weights; an adapted embedding stays fp32)
        obj = Spy(obj, next(p for n, p in model.named_parameters() if "base_layer.weight" in n and "embeddings" not in n))
    cfg = TrainConfig(lr=1e-2, batch_size=4, max_steps=max_steps, eval_every=3, save_every=3, log_every=1,
                      precision="bf16", bf16_frozen=bf16_frozen, progress=False, tensorboard=False,
                      warmup_steps=1, keep_checkpoints=10)
    val = collate(list(range(4)))
    run = tmp_path / name
    torch.manual_seed(0)
    plan = TrainPlan(obj, BatchStream(len(rows), collate, 4, 1, seed=0),
                     lambda m: {"val_loss": float(obj(m, val).value)},
                     lambda m, info: save_pretrained_atomic(m, None, run / "best", info, base_pending=True),  # random init
                     "val_loss", best_writes_base=lambda: best_writes_base(model, True, run))
    fit(model, plan, cfg, rt.Runtime(device=torch.device("cpu")), run, resume=resume)
    return model, obj, run


def train_losses(run) -> list[float]:
    return [e["loss"] for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if e["event"] == "train"]


@pytest.mark.parametrize("task", ["lm", "classify"])
def test_same_training_bit_for_bit_and_fp32_weights_back(tmp_path, task):
    reference = build(task)  # the untrained model: its frozen weights must come back exactly
    plain, _, plain_run = run_fit(tmp_path, "plain", task, bf16_frozen=False)
    held, spy, held_run = run_fit(tmp_path, "held", task, bf16_frozen=True, spy=True)

    assert spy.dtypes and all(d == torch.bfloat16 for d in spy.dtypes)  # bf16 while training
    assert train_losses(plain_run) == train_losses(held_run)
    for (name, a), (_, b) in zip(plain.state_dict().items(), held.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    frozen_names = [n for n, p in held.named_parameters() if not p.requires_grad]
    ref = dict(reference.named_parameters())
    for n in frozen_names:
        assert torch.equal(dict(held.named_parameters())[n], ref[n]), n  # exact fp32 values restored
    assert not list(held_run.glob(".frozen-fp32*")), "the spill file is removed"
    assert "frozen weights:" in (held_run / "log.txt").read_text()
    # checkpoints hold the fp32 weights, equal to the plain run's checkpoint
    for ckpt in sorted((held_run / "checkpoints").iterdir()):
        a = load_file(str(ckpt / "model.safetensors"))
        b = load_file(str(plain_run / "checkpoints" / ckpt.name / "model.safetensors"))
        assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in b), ckpt.name


def test_a_written_base_is_the_exact_fp32_base(tmp_path):
    reference = build("lm")
    _, _, run = run_fit(tmp_path, "held", "lm", bf16_frozen=True)
    base = load_file(str(run / "base" / "model.safetensors"))  # random init: the base is written by the first save
    ref = {k.replace(".base_layer.", "."): v for k, v in reference.get_base_model().state_dict().items() if "lora_" not in k}
    assert base and all(v.dtype == torch.float32 and torch.equal(v, ref[k]) for k, v in base.items())


def test_resume_under_held_weights_is_bit_identical(tmp_path):
    full, _, _ = run_fit(tmp_path, "full", "lm", bf16_frozen=True)
    run_fit(tmp_path, "cut", "lm", bf16_frozen=True)
    for c in (tmp_path / "cut" / "checkpoints").iterdir():  # as if killed after step 3's checkpoint
        if not c.name.endswith("00000003"):
            shutil.rmtree(c)
    torch.manual_seed(123)
    resumed, _, _ = run_fit(tmp_path, "cut", "lm", bf16_frozen=True, resume=True, seed=99)
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), n


class Exploding(CausalLM):
    def __call__(self, model, batch):
        loss = super().__call__(model, batch)
        return type(loss)(value=loss.value * float("nan"), units=loss.units)


def test_weights_come_back_after_a_failed_run(tmp_path):
    reference = build("lm")
    with pytest.raises(TrainingError):
        model, _, _ = run_fit(tmp_path, "boom", "lm", bf16_frozen=True, objective=Exploding())
    # the model object is gone with the exception: rebuild the situation by hand
    model = build("lm")
    held = FrozenBf16(model, tmp_path / "spill.bin")
    with pytest.raises(RuntimeError), held:
        assert held.count > 0 and all(p.dtype == torch.bfloat16 for p in held.params.values())
        raise RuntimeError("mid-training failure")
    for (n, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), n
    assert not (tmp_path / "spill.bin").exists() and not list((tmp_path / "boom").glob(".frozen-fp32*"))


def test_only_plain_untied_non_dora_linear_weights_are_held():
    lm = build("lm")
    names = set(eligible(lm))
    assert names and all(n.endswith("base_layer.weight") or n.endswith("base_layer.bias") for n in names)
    tied = lm.get_base_model().lm_head.weight is lm.get_base_model().get_input_embeddings().weight
    assert tied  # the test preset ties its head; a tied head must stay fp32 (the embedding lookup is not autocast)
    assert not any("lm_head" in n or "embed" in n for n in names)
    assert not any("base_layer" in n for n in eligible(build("classify", dora=True)))

    class Sub(nn.Linear):
        pass

    net = nn.Sequential(nn.Linear(3, 3), Sub(3, 3), nn.Linear(3, 3))
    for p in net.parameters():
        p.requires_grad_(False)
    net[2].weight.requires_grad_(True)
    assert set(eligible(net)) == {"0.weight", "0.bias", "2.bias"}


def test_off_in_fp32_and_when_asked(tmp_path):
    rows = lm_rows()
    collate = collate_for(rows, classify=False)
    for precision, flag in (("fp32", True), ("bf16", False)):
        model = build("lm")
        spy = Spy(CausalLM(), next(p for n, p in model.named_parameters() if "base_layer.weight" in n))
        cfg = TrainConfig(lr=1e-2, batch_size=4, max_steps=2, eval_every=0, save_every=0, precision=precision,
                          bf16_frozen=flag, progress=False, tensorboard=False)
        plan = TrainPlan(spy, BatchStream(len(rows), collate, 4, 1, seed=0), None, lambda m, info: None, "val_loss")
        fit(model, plan, cfg, rt.Runtime(device=torch.device("cpu")), tmp_path / f"{precision}-{flag}")
        assert spy.dtypes and all(d == torch.float32 for d in spy.dtypes)


def test_nothing_is_cast_when_the_model_would_report_another_dtype(tmp_path):
    """A transformers model reports the dtype of its first parameter; if that is a frozen Linear
    weight, casting would change it (and masks built in that dtype), so everything stays fp32."""

    class FirstIsLinear(nn.Module):
        config = object()

        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.embed = nn.Embedding(10, 4)
            self.proj.requires_grad_(False)

        def get_input_embeddings(self):
            return self.embed

        @property
        def dtype(self):
            return next(self.parameters()).dtype

    model = FirstIsLinear()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with FrozenBf16(model, tmp_path / "spill.bin") as held:
        assert held.count == 0 and "different dtype" in held.describe()
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not (tmp_path / "spill.bin").exists()


def pair_collate(n_pairs: int):
    """Right-padded [chosen; rejected] rows with a 3-token prompt masked out of the labels."""
    g = torch.Generator().manual_seed(2)
    rows = [torch.randint(2, VOCAB, (int(torch.randint(5, 9, (1,), generator=g)),), generator=g)
            for _ in range(2 * n_pairs)]

    def collate(idx: list[int]) -> dict[str, torch.Tensor]:
        picked = [rows[2 * i] for i in idx] + [rows[2 * i + 1] for i in idx]
        width = max(len(r) for r in picked)
        ids = torch.zeros(len(picked), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, row in enumerate(picked):
            ids[r, : len(row)], mask[r, : len(row)] = row, 1
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :3] = -100
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return collate


@pytest.mark.parametrize("bf16_frozen", [False, True])
def test_dpo_reference_copy_is_held_in_bf16_and_changes_nothing(tmp_path, bf16_frozen):
    import copy

    from honelm.objectives.dpo import DPO

    runs = {}
    for flag in (False, bf16_frozen):  # the fp32 run first, then the one under test
        policy = build_model("decoder", "test", VOCAB, task="lm", seed=0, pad_token_id=0, eos_token_id=1)
        reference = copy.deepcopy(policy).eval().requires_grad_(False)
        start = {n: p.detach().clone() for n, p in reference.named_parameters()}
        probe = reference.get_submodule("model.layers.0.self_attn.q_proj").weight
        objective = Spy(DPO(beta=0.1, reference=reference), probe)
        collate = pair_collate(8)
        cfg = TrainConfig(lr=1e-3, batch_size=4, max_steps=4, eval_every=2, save_every=2, log_every=1,
                          precision="bf16", bf16_frozen=flag, progress=False, tensorboard=False, warmup_steps=1)
        run = tmp_path / f"run-{flag}-{len(runs)}"
        val = collate([0, 1])
        torch.manual_seed(0)
        plan = TrainPlan(objective, BatchStream(8, collate, 4, 1, seed=0),
                         lambda m: {"val_loss": float(objective(m, val).value)}, lambda m, info: None, "val_loss")
        fit(policy, plan, cfg, rt.Runtime(device=torch.device("cpu")), run)
        runs[flag if not runs else "test"] = (policy, objective, run)
        for n, p in reference.named_parameters():  # exact fp32 weights back after training
            assert p.dtype == torch.float32 and torch.equal(p, start[n]), n

    (plain, _, plain_run), (held, spy, held_run) = runs[False], runs["test"]
    want = torch.bfloat16 if bf16_frozen else torch.float32
    assert spy.dtypes and all(d == want for d in spy.dtypes)
    assert train_losses(plain_run) == train_losses(held_run)
    for (name, a), (_, b) in zip(plain.state_dict().items(), held.state_dict().items()):
        assert torch.equal(a, b), name


def test_extra_models_are_held_too_but_only_the_trained_model_comes_back_for_a_save(tmp_path):
    import copy

    from honelm.boosters.adversarial import Adversarial, AdversarialConfig
    from honelm.objectives.dpo import DPO

    model = build("lm")  # LoRA: its base is frozen
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    objective = Adversarial(DPO(reference=reference), AdversarialConfig(method="fgm"))
    assert objective.frozen_models() == [reference]  # the wrapper hands the inner objective's on

    base = next(p for n, p in model.named_parameters() if "base_layer.weight" in n)
    ref = next(p for n, p in reference.named_parameters() if "base_layer.weight" in n)
    ref_start = ref.detach().clone()
    with FrozenBf16(model, tmp_path / "spill.bin", extra=objective.frozen_models()) as held:
        assert base.dtype == ref.dtype == torch.bfloat16
        with held.restored():
            assert base.dtype == torch.float32  # what a checkpoint writes
            assert ref.dtype == torch.bfloat16  # never saved during training: left alone
        assert base.dtype == ref.dtype == torch.bfloat16
    assert ref.dtype == torch.float32 and torch.equal(ref, ref_start)


def word_tokenizer_of(size: int):
    """One token per word "t0".."t{size-1}" (t0 pads, t1 ends): ids equal the policy's own."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(size)}, unk_token="t2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t1", unk_token="t2")


def test_ppo_reference_copy_and_reward_model_are_held_in_bf16_and_change_nothing(tmp_path, tiny_llama):
    """PPO's sampler runs two frozen models outside the objective (`TrainPlan.frozen_models`): a reference copy
    of the policy and a reward model. Holding them in bf16 must leave rollouts, losses and the trained
    policy bit for bit as they are with fp32 copies, and give their exact fp32 weights back."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from honelm.objectives.ppo import PPO
    from honelm.rl.policy import PolicyWithValue, Reference
    from honelm.rl.prompts import EncodedPrompt
    from honelm.rl.rewards import PenalisedScorer, RewardModelScorer
    from honelm.rl.rollout import PPOOptions, RolloutStream, Sampler
    from honelm.tracking import Tracker

    tokenizer = word_tokenizer_of(64)
    reward_dir = tmp_path / "reward"
    torch.manual_seed(3)
    LlamaForSequenceClassification(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, num_labels=1, pad_token_id=0, eos_token_id=1,
    )).save_pretrained(reward_dir)
    tokenizer.save_pretrained(reward_dir)
    g = torch.Generator().manual_seed(0)
    prompts = [EncodedPrompt(torch.randint(2, 64, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist(),
                             f"p{i}", "test", i + 1) for i in range(16)]
    opts = PPOOptions(rollout_batch=8, ppo_epochs=2, response_length=6, temperature=1.0, kl_coef=0.1)

    runs = {}
    for flag in (False, True):  # fp32 copies first, then held in bf16
        runtime = rt.Runtime(device=torch.device("cpu"))
        policy = tiny_llama(seed=0)
        reference = Reference(policy, lora=False)
        scorer = PenalisedScorer(RewardModelScorer(str(reward_dir), tokenizer, runtime.device, runtime.autocast, 8), 0.5)
        sampler = Sampler(PolicyWithValue.shared(policy), reference, scorer, tokenizer, opts, 1, 0, runtime.autocast,
                          chunk=8)
        frozen = sampler.frozen_models()
        ref_model, reward_model = frozen
        assert ref_model is not policy and reward_model is scorer.base.model  # both reach the loop
        start = {f"{i}.{n}": p.detach().clone() for i, m in enumerate(frozen) for n, p in m.named_parameters()}
        probes = [m.get_submodule("model.layers.0.self_attn.q_proj").weight for m in frozen]
        dtypes: list[tuple[torch.dtype, ...]] = []
        objective = PPO(opts.temperature)
        inner_step = objective.step

        def spy_step(model, batch, scale, autocast, inner_step=inner_step, probes=probes, dtypes=dtypes):
            dtypes.append(tuple(p.dtype for p in probes))
            return inner_step(model, batch, scale, autocast)

        objective.step = spy_step
        run = tmp_path / f"run-{flag}-{len(runs)}"
        tracker = Tracker(run, tensorboard=False, progress=False)
        stream = RolloutStream(sampler, prompts, batch_size=4, grad_accum=1, seed=0, run_dir=run, tracker=tracker)
        cfg = TrainConfig(lr=1e-2, max_steps=2 * stream.steps_per_rollout, precision="bf16", bf16_frozen=flag,
                          eval_every=0, save_every=stream.steps_per_rollout, log_every=1, progress=False,
                          tensorboard=False, warmup_steps=0)
        torch.manual_seed(0)
        fit(sampler.model, TrainPlan(objective, stream, None, lambda m, info: None, metric="val_score",
                                     frozen_models=frozen), cfg, runtime, run, tracker=tracker)
        tracker.close()
        assert runtime.precision == "bf16"
        runs[flag] = (policy, dtypes, run)
        for i, m in enumerate(frozen):  # the exact fp32 weights back after training
            for n, p in m.named_parameters():
                assert p.dtype == torch.float32 and torch.equal(p, start[f"{i}.{n}"]), n

    (plain, plain_dtypes, plain_run), (held, dtypes, held_run) = runs[False], runs[True]
    assert plain_dtypes and all(d == (torch.float32, torch.float32) for d in plain_dtypes)
    assert dtypes and all(d == (torch.bfloat16, torch.bfloat16) for d in dtypes)
    events = [json.loads(x) for x in (held_run / "metrics.jsonl").read_text().splitlines()]
    plain_events = [json.loads(x) for x in (plain_run / "metrics.jsonl").read_text().splitlines()]
    timeless = lambda rows: [{k: v for k, v in e.items() if k not in ("time", "time_s")}  # noqa: E731
                             for e in rows if e["event"] == "rollout"]
    assert len(timeless(events)) == 2 and timeless(events) == timeless(plain_events)  # same samples, scores and KL
    assert train_losses(plain_run) == train_losses(held_run)
    for (name, a), (_, b) in zip(plain.state_dict().items(), held.state_dict().items()):
        assert torch.equal(a, b), name


# ----------------------------------------------------------------------------------------------
# LoRA branches under autocast take their input as it comes (honelm.speed.autocast_inputs)


def lora_input_dtypes(model) -> dict[str, torch.dtype]:
    """Hooks every lora_A; returns the dict they fill with the dtype of the input each one receives."""
    seen: dict[str, torch.dtype] = {}
    for name, module in model.named_modules():
        if name.endswith("lora_A.default"):
            module.register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(name, args[0].dtype))
    return seen


def test_lora_branches_skip_the_fp32_round_trip_and_compute_the_same_bits():
    from honelm.speed import autocast_inputs

    model = build("lm", dropout=0.0)
    # B = 0 at init would hide a difference in the branch: give the adapters values
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(n)))
    batch = collate_for(lm_rows(), classify=False)(list(range(6)))
    seen = lora_input_dtypes(model)

    def loss_and_grads():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = CausalLM()(model, batch).value
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        return loss.detach(), grads, dict(seen)

    loss, grads, peft_dtypes = loss_and_grads()
    with autocast_inputs(model) as count:
        own_loss, own_grads, own_dtypes = loss_and_grads()
    assert count == len(peft_dtypes) > 0
    # peft's default hands every branch fp32; inside, o_proj and down_proj get the bf16 they receive
    assert set(peft_dtypes.values()) == {torch.float32}
    assert {n for n, d in own_dtypes.items() if d == torch.bfloat16} == {n for n in own_dtypes
                                                                         if ".o_proj." in n or ".down_proj." in n}
    assert torch.equal(loss, own_loss)
    assert grads.keys() == own_grads.keys() and all(torch.equal(grads[n], own_grads[n]) for n in grads)
    # and peft's own behaviour is back afterwards
    assert all(m.cast_input_dtype_enabled for m in model.modules() if hasattr(m, "cast_input_dtype_enabled"))


def test_lora_branches_that_read_their_input_otherwise_keep_peft_s_cast():
    from honelm.speed import autocast_inputs

    for kw in ({"dropout": 0.1}, {"dropout": 0.0, "dora": True}):
        with autocast_inputs(build("lm", **kw)) as count:
            assert count == 0, kw
    with autocast_inputs(build("lm", dropout=0.0), enabled=False) as count:
        assert count == 0


def test_fit_under_bf16_skips_the_round_trip_only_while_training_and_changes_nothing(tmp_path, monkeypatch):
    import honelm.speed as speed

    class Flags(CausalLM):
        """Records, at every step, whether peft would cast the inputs of the LoRA branches."""

        def __init__(self):
            super().__init__()
            self.flags: list[set[bool]] = []

        def __call__(self, model, batch):
            self.flags.append({m.cast_input_dtype_enabled for m in model.modules() if hasattr(m, "lora_A")})
            return super().__call__(model, batch)

    own, own_obj, own_run = run_fit(tmp_path, "own", "lm", bf16_frozen=True, objective=Flags(), dropout=0.0)
    monkeypatch.setattr(speed, "autocast_inputs", lambda model, enabled: contextlib.nullcontext(0))
    peft_, peft_obj, peft_run = run_fit(tmp_path, "peft", "lm", bf16_frozen=True, objective=Flags(), dropout=0.0)

    assert own_obj.flags and all(f == {False} for f in own_obj.flags)  # training and validation alike
    assert peft_obj.flags and all(f == {True} for f in peft_obj.flags)
    assert all(m.cast_input_dtype_enabled for m in own.modules() if hasattr(m, "lora_A"))  # back after fit
    assert train_losses(own_run) == train_losses(peft_run)
    for (name, a), (_, b) in zip(own.state_dict().items(), peft_.state_dict().items()):
        assert torch.equal(a, b), name
