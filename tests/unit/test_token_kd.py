"""Token-level KD losses against numbers worked by hand and by explicit loops: forward KL, reverse KL
and generalized JSD(beta) on the teacher's top-k, T and T^2, alpha, k = V equal to the exact KL, the
JSD limits, gradients reaching only the student, and the objective on a tiny model (chunked ≡ plain)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from honelm.errors import ConfigError, HonelmError
from honelm.objectives.lm import CausalLM
from honelm.objectives.logprobs import plain_head
from honelm.objectives.token_kd import TokenKD, divergence

X = -100


# ---------------------------------------------------------------------------------------------
# explicit loops over plain floats: the definitions, written out one term at a time


def softmax(xs: list[float]) -> list[float]:
    top = max(xs)
    e = [math.exp(x - top) for x in xs]
    return [v / sum(e) for v in e]


def kl(a: list[float], b: list[float]) -> float:
    return sum(ai * math.log(ai / bi) for ai, bi in zip(a, b) if ai > 0)


def by_hand_bucket(z: list[float], ids: list[int], lps: list[float], kind: str, beta: float, t: float) -> float:
    """tail="bucket": both sides seen through the partition {each top-k id, the rest}, then tempered."""
    probs = [math.exp(lp) for lp in lps]
    teacher = [lp for lp in lps] + [math.log(max(1 - sum(probs), 1e-300))]
    q_full = softmax(z)
    student = [math.log(q_full[i]) for i in ids] + [math.log(sum(q for j, q in enumerate(q_full) if j not in ids))]
    p, q = softmax([c / t for c in teacher]), softmax([c / t for c in student])
    if kind == "forward":
        return kl(p, q)
    if kind == "reverse":
        return kl(q, p)
    m = [beta * pj + (1 - beta) * qj for pj, qj in zip(p, q)]
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def by_hand(z: list[float], ids: list[int], lps: list[float], kind: str, beta: float, t: float) -> float:
    p = softmax([lp / t for lp in lps])  # the teacher at T, renormalised over its top-k
    q_full = softmax([v / t for v in z])  # the student's full softmax at T
    if kind == "forward":
        return sum(p[j] * (math.log(p[j]) - math.log(q_full[i])) for j, i in enumerate(ids))
    q = softmax([z[i] / t for i in ids])  # the student renormalised on the top-k
    if kind == "reverse":
        return kl(q, p)
    m = [beta * pj + (1 - beta) * qj for pj, qj in zip(p, q)]
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def random_case(n: int = 5, v: int = 7, k: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g) * 2
    teacher = torch.log_softmax(torch.randn(n, v, generator=g) * 2, dim=-1)
    lps, ids = teacher.topk(k, dim=-1)
    return z, ids.to(torch.int32), lps.to(torch.float16)


# ---------------------------------------------------------------------------------------------
# the divergences


def paper_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The student uniform over V = 4 (q = 1/4 each); the teacher's top-2, ids 0 and 1, with p = 0.5 and 0.3."""
    return torch.zeros(1, 4), torch.tensor([[0, 1]]), torch.log(torch.tensor([[0.5, 0.3]]))


def test_divergences_worked_on_paper():
    # renormalised over the top-2: p~ = 0.625, 0.375
    z, ids, lps = paper_case()
    # forward: 0.625 ln(0.625 / 0.25) + 0.375 ln(0.375 / 0.25) = 0.625 * 0.916291 + 0.375 * 0.405465
    assert float(divergence(z, ids, lps, "forward", tail="renormalise")) == pytest.approx(0.724731, abs=1e-6)
    # reverse, q~ = 0.5, 0.5: 0.5 ln(0.5 / 0.625) + 0.5 ln(0.5 / 0.375) = 0.5 (-0.223144 + 0.287682)
    assert float(divergence(z, ids, lps, "reverse", tail="renormalise")) == pytest.approx(0.032269, abs=1e-6)
    # jsd(0.5), m = 0.5625, 0.4375: KL(p~||m) = 0.065850 - 0.057807 = 0.008044, KL(q~||m) = -0.058892 + 0.066766
    # = 0.007874; D = 0.5 * 0.008044 + 0.5 * 0.007874
    assert float(divergence(z, ids, lps, "jsd", beta=0.5, tail="renormalise")) == pytest.approx(0.007959, abs=2e-6)


def test_the_tail_bucket_worked_on_paper():
    # the teacher's rest is 0.2; the student's coarse distribution on {0, 1, rest} is 0.25, 0.25, 0.5
    z, ids, lps = paper_case()
    # forward: 0.5 ln(0.5/0.25) + 0.3 ln(0.3/0.25) + 0.2 ln(0.2/0.5) = 0.346574 + 0.054696 - 0.183258
    assert float(divergence(z, ids, lps, "forward", tail="bucket")) == pytest.approx(0.218011, abs=1e-5)
    # reverse: 0.25 ln(0.25/0.5) + 0.25 ln(0.25/0.3) + 0.5 ln(0.5/0.2) = -0.173287 - 0.045580 + 0.458145
    assert float(divergence(z, ids, lps, "reverse", tail="bucket")) == pytest.approx(0.239278, abs=1e-5)


def test_the_tail_bucket_leaves_the_gold_token_outside_the_top_k_alone():
    """A student that matches the teacher on its top-k and in its total tail mass costs nothing under the bucket,
    however that tail is shared out; renormalisation charges it for every bit of tail mass."""
    ids = torch.tensor([[0, 1]])
    lps = torch.log(torch.tensor([[0.6, 0.2]]))  # the teacher's rest: 0.2
    z = torch.log(torch.tensor([[0.6, 0.2, 0.15, 0.05]]))  # the student: the same on {0, 1}, 0.2 elsewhere
    for kind in ("forward", "reverse", "jsd"):
        assert float(divergence(z, ids, lps, kind, beta=0.3, tail="bucket")) == pytest.approx(0.0, abs=1e-6), kind
    assert float(divergence(z, ids, lps, "forward", tail="renormalise")) == pytest.approx(-math.log(0.8), abs=1e-6)
    # and the gradient: renormalised forward KL lowers the tail tokens' logits (gold or not); the bucket does not
    for tail, pushed_down in (("renormalise", True), ("bucket", False)):
        zz = z.clone().requires_grad_(True)
        divergence(zz, ids, lps, "forward", tail=tail).sum().backward()
        assert bool((zz.grad[0, 2:] > 1e-6).all()) == pushed_down, tail  # descent lowers a logit of positive grad


@pytest.mark.parametrize("kind, beta", [("forward", 0.5), ("reverse", 0.5), ("jsd", 0.3)])
@pytest.mark.parametrize("t", [1.0, 2.0, 0.5])
def test_the_tail_bucket_matches_explicit_loops(kind, beta, t):
    z, ids, lps = random_case(seed=3)
    got = divergence(z, ids, lps, kind, beta, t, tail="bucket")
    for r in range(z.size(0)):
        want = by_hand_bucket(z[r].tolist(), ids[r].tolist(), lps[r].float().tolist(), kind, beta, t)
        assert float(got[r]) == pytest.approx(want, rel=1e-4, abs=1e-5), r
    assert (got >= -1e-6).all()


@pytest.mark.parametrize("kind, beta", [("forward", 0.5), ("reverse", 0.5), ("jsd", 0.1), ("jsd", 0.5), ("jsd", 0.9)])
@pytest.mark.parametrize("t", [1.0, 2.0, 0.5])
def test_divergences_match_explicit_loops(kind, beta, t):
    z, ids, lps = random_case()
    got = divergence(z, ids, lps, kind, beta, t, tail="renormalise")
    for r in range(z.size(0)):
        want = by_hand(z[r].tolist(), ids[r].tolist(), lps[r].float().tolist(), kind, beta, t)
        assert float(got[r]) == pytest.approx(want, rel=1e-5, abs=1e-6), r
    assert (got >= -1e-6).all()


@pytest.mark.parametrize("t", [1.0, 3.0])
def test_k_equal_to_v_is_the_exact_kl(t):
    n, v = 4, 6
    z, ids, lps = random_case(n, v, k=v, seed=1)
    lps = lps.float()
    teacher = torch.full((n, v), float("-inf")).scatter(1, ids.long(), lps)  # the full teacher log-probs again
    p_t = torch.log_softmax(teacher / t, -1)
    q_t = torch.log_softmax(z / t, -1)
    exact_forward = F.kl_div(q_t, p_t, log_target=True, reduction="none").sum(-1)  # KL(p_T || q_T)
    exact_reverse = F.kl_div(p_t, q_t, log_target=True, reduction="none").sum(-1)  # KL(q_T || p_T)
    for tail in ("bucket", "renormalise"):
        assert torch.allclose(divergence(z, ids, lps, "forward", temperature=t, tail=tail), exact_forward, atol=1e-5)
        assert torch.allclose(divergence(z, ids, lps, "reverse", temperature=t, tail=tail), exact_reverse, atol=1e-5)


def test_forward_kl_penalises_student_mass_outside_the_top_k():
    """q~ = p~ on the top-k: reverse and jsd are 0; forward is -log(student mass on the top-k) > 0."""
    ids = torch.tensor([[0, 1]])
    lps = torch.log(torch.tensor([[0.6, 0.2]]))  # p~ = 0.75, 0.25
    z = torch.log(torch.tensor([[0.45, 0.15, 0.4]]))  # student: the same 3:1 ratio on {0, 1}, 0.4 elsewhere
    assert float(divergence(z, ids, lps, "reverse", tail="renormalise")) == pytest.approx(0.0, abs=1e-6)
    assert float(divergence(z, ids, lps, "jsd", beta=0.3, tail="renormalise")) == pytest.approx(0.0, abs=1e-6)
    assert float(divergence(z, ids, lps, "forward", tail="renormalise")) == pytest.approx(-math.log(0.6), abs=1e-6)


def test_jsd_limits():
    z, ids, lps = random_case(seed=2)
    fwd_restricted = torch.tensor([kl(softmax(lps[r].float().tolist()), softmax(z[r, ids[r].long()].tolist()))
                                   for r in range(z.size(0))])  # KL(p~ || q~)
    rev = divergence(z, ids, lps, "reverse", tail="renormalise")
    small, big = 1e-4, 1 - 1e-4
    assert torch.allclose(divergence(z, ids, lps, "jsd", beta=small, tail="renormalise") / small, fwd_restricted.float(), rtol=2e-3)
    assert torch.allclose(divergence(z, ids, lps, "jsd", beta=big, tail="renormalise") / (1 - big), rev, rtol=2e-3)
    half = divergence(z, ids, lps, "jsd", beta=0.5, tail="renormalise")
    assert (half <= math.log(2)).all() and (half > 0).all()
    # beta = 0.5 is symmetric: swapping teacher and student (on the top-k support) gives the same value
    logq = torch.log_softmax(z.gather(1, ids.long()), -1)
    local = torch.arange(ids.size(1)).expand_as(ids)  # student logits on the support only: V = k
    assert torch.allclose(divergence(logq, local, torch.log_softmax(lps.float(), -1), "jsd", beta=0.5, tail="renormalise"),
                          divergence(torch.log_softmax(lps.float(), -1), local, logq, "jsd", beta=0.5, tail="renormalise"),
                          atol=1e-6)


def test_a_zero_teacher_probability_is_no_nan():
    ids = torch.tensor([[0, 1, 2]])
    lps = torch.tensor([[0.0, float("-inf"), float("-inf")]], dtype=torch.float16)  # a masked teacher
    z = torch.randn(1, 5, requires_grad=True)
    for kind in ("forward", "reverse", "jsd"):
        for tail in ("bucket", "renormalise"):
            d = divergence(z, ids, lps, kind, beta=0.5, tail=tail)
            d.sum().backward()
            assert torch.isfinite(d).all() and torch.isfinite(z.grad).all(), (kind, tail)
            z.grad = None


# ---------------------------------------------------------------------------------------------
# the loss: alpha, T^2, sums


def test_loss_is_alpha_ce_plus_t_squared_divergence():
    z, ids, lps = random_case(n=4, seed=3)
    gold = torch.tensor([0, 3, 6, 2])
    t, alpha = 2.0, 0.3
    total, ce, d = TokenKD("reverse", temperature=t, alpha=alpha).rows_loss(z, gold, ids, lps)
    want_ce = sum(-math.log(softmax(z[r].tolist())[int(gold[r])]) for r in range(4))  # at T = 1
    want_d = sum(by_hand_bucket(z[r].tolist(), ids[r].tolist(), lps[r].float().tolist(), "reverse", 0.5, t)
                 for r in range(4))  # the default tail="bucket"
    assert float(ce) == pytest.approx(want_ce, rel=1e-5) and float(d) == pytest.approx(want_d, rel=1e-5)
    assert float(total) == pytest.approx(alpha * want_ce + (1 - alpha) * t * t * want_d, rel=1e-5)
    # Why T^2 (Hinton et al. 2015): d D / d z_i = (q_T - p_T)_i / T ≈ (z_i - v_i) / (V T^2) at high T
    # (v the teacher's centred logits), so T^2 D keeps a gradient of the same size whatever T
    # is, where D alone would shrink as 1/T^2. Exact with k = V (both distributions then tend to
    # the same uniform one).
    z, ids, lps = random_case(n=4, k=7, seed=3)
    z = z - z.mean(-1, keepdim=True)
    grads = []
    for temp in (10.0, 20.0):
        zz = z.clone().requires_grad_()
        TokenKD("forward", temperature=temp).rows_loss(zz, gold, ids, lps.float())[0].backward()
        grads.append(zz.grad.norm())
    assert float(grads[1] / grads[0]) == pytest.approx(1.0, abs=0.05)  # without T^2 it would be 1/4


def test_bad_settings_are_refused():
    for kwargs in ({"divergence": "kl"}, {"divergence": "jsd", "beta": 0.0}, {"divergence": "jsd", "beta": 1.0},
                   {"temperature": 0.0}, {"alpha": 1.5}, {"chunk_rows": 0}, {"tail": "drop"}):
        with pytest.raises(ConfigError):
            TokenKD(**kwargs)


# ---------------------------------------------------------------------------------------------
# the objective on a tiny model


def batch_with_teacher(teacher, k: int = 5) -> dict[str, torch.Tensor]:
    ids = torch.tensor([[5, 9, 11, 3, 7, 8, 2, 0], [4, 6, 12, 13, 1, 0, 0, 0]])
    labels = torch.tensor([[X, X, X, 3, 7, 8, 2, X], [X, X, 12, 13, 1, X, X, X]])
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    target = F.pad(labels[:, 1:], (0, 1), value=X) != X
    with torch.no_grad():
        lp = torch.log_softmax(teacher(input_ids=ids, attention_mask=mask).logits[target].float(), -1)
    lps, top = lp.topk(k, -1)
    return {**batch, "teacher_ids": top.to(torch.int32), "teacher_logprobs": lps.to(torch.float16)}


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_chunked_loss_equals_the_plain_rows_and_reaches_only_the_student(tiny_llama, kind):
    student, teacher = tiny_llama(seed=1), tiny_llama(seed=2)
    batch = batch_with_teacher(teacher)
    batch["teacher_logprobs"] = batch["teacher_logprobs"].float().requires_grad_()  # a target, never trained
    objective = TokenKD(kind, beta=0.3, temperature=1.5, alpha=0.2, chunk_rows=2)
    plain, rows = objective.outputs(student, batch)
    assert rows.shape == (objective.units(batch), 64) == (7, 64)
    plain.value.backward()
    want = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    chunked = objective(student, batch)
    chunked.value.backward()
    assert plain_head(student) is not None  # so the chunked path ran
    assert int(chunked.units) == 7 and float(chunked.value.detach()) == pytest.approx(float(plain.value.detach()), rel=1e-5)
    for key in ("ce", "kd"):
        assert float(chunked.metrics[key]) == pytest.approx(float(plain.metrics[key]), rel=1e-5, abs=1e-7)
    for n, p in student.named_parameters():
        assert torch.allclose(p.grad, want[n], atol=1e-6), n
    assert batch["teacher_logprobs"].grad is None
    assert all(p.grad is None for p in teacher.parameters())
    student.zero_grad()
    student.config.logit_scale = 2.0  # not applied by Llama; it only makes plain_head refuse: the full-logits path
    assert plain_head(student) is None
    full = objective(student, batch)
    full.value.backward()
    assert float(full.value.detach()) == pytest.approx(float(plain.value.detach()), rel=1e-5)
    for n, p in student.named_parameters():
        assert torch.allclose(p.grad, want[n], atol=1e-6), n


def test_alpha_one_is_the_causal_lm_loss_and_a_misaligned_teacher_is_refused(tiny_llama):
    student = tiny_llama(seed=1)
    batch = batch_with_teacher(tiny_llama(seed=2))
    with torch.no_grad():
        assert float(TokenKD(alpha=1.0)(student, batch).value) == pytest.approx(float(CausalLM()(student, batch).value),
                                                                               rel=1e-5)
        short = {**batch, "teacher_ids": batch["teacher_ids"][:-1], "teacher_logprobs": batch["teacher_logprobs"][:-1]}
        with pytest.raises(HonelmError, match="line up"):
            TokenKD()(student, short)
        with pytest.raises(HonelmError, match="teacher_ids"):
            TokenKD()(student, {k: v for k, v in batch.items() if k != "teacher_ids"})


def test_distilling_from_the_teacher_itself_costs_nothing_at_k_equal_v(tiny_llama):
    model = tiny_llama(seed=4)
    batch = batch_with_teacher(model, k=64)
    batch["teacher_logprobs"] = batch["teacher_logprobs"].float()
    with torch.no_grad():
        for kind in ("forward", "reverse", "jsd"):
            assert float(TokenKD(kind)(model, batch).value) == pytest.approx(0.0, abs=1e-4), kind


def test_the_distill_section_reaches_the_objective():
    """`distill.tail`, divergence, beta, temperature and alpha as a user sets them are the loss's own settings."""
    from honelm.objectives.distill import DistillOptions
    from honelm.objectives.token_kd import token_objective
    assert token_objective(DistillOptions()).tail == "bucket"  # the documented default
    made = token_objective(DistillOptions(tail="renormalise", divergence="jsd", beta=0.3, temperature=1.5, alpha=0.2))
    assert (made.tail, made.kind, made.beta, made.temperature, made.alpha) == ("renormalise", "jsd", 0.3, 1.5, 0.2)
    z, ids, lps = paper_case()
    gold = torch.tensor([2])
    bucket = token_objective(DistillOptions(alpha=0.0, temperature=1.0)).rows_loss(z, gold, ids, lps)[0]
    renorm = token_objective(DistillOptions(alpha=0.0, temperature=1.0, tail="renormalise")).rows_loss(z, gold, ids, lps)[0]
    assert float(bucket) == pytest.approx(0.218011, abs=1e-5) and float(renorm) == pytest.approx(0.724731, abs=1e-5)
