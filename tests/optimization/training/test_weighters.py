"""tokensmith.optimization.training.weighters: Rho-1 (exact keep count, ties, value and gradient), TLDR and focal
(value and gradient against float64 hand derivatives), PRIOR weights, the reference helpers on ts.tiny("llama"),
the registry, bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.tolerance import fp32_atol
from tokensmith.optimization.training import (
    TLDR,
    ContextDependence,
    Focal,
    Rho1,
    TokenBatch,
    Uniform,
    check_reference_vocab,
    compute_token_objective,
    context_dependence_weights,
    excess_loss,
    get_weighter,
    keep_count,
    no_context_logprobs,
    reference_token_loss,
    selective_lm_loss,
    shift_labels,
    token_loss,
    top_k_mask,
    weighted_token_loss,
    weighter_names,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")

F64 = torch.float64


def ce64(z, y, m):
    """Per-token CE and dCE/dz in float64, token by token."""
    B, T, V = z.shape
    ce = torch.zeros(B, T, dtype=F64)
    grad = torch.zeros(B, T, V, dtype=F64)
    for b in range(B):
        for t in range(T):
            if m[b, t]:
                zz = z[b, t].double()
                lse = torch.logsumexp(zz, 0)
                ce[b, t] = lse - zz[y[b, t]]
                p = torch.exp(zz - lse)
                p[y[b, t]] -= 1
                grad[b, t] = p
    return ce, grad


def batch(B=3, T=6, V=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = 2 * torch.randn(B, T, V, generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    m = torch.rand(B, T, generator=g) < 0.75
    m[0, 0] = True
    return z, y, m, g


# ------------------------------------------------------------------------------------------- registry
def test_registry_names_build_the_classes():
    assert {"uniform", "rho1", "tldr", "focal", "prior"} <= set(weighter_names())
    for name, cls in (
        ("uniform", Uniform),
        ("rho1", Rho1),
        ("tldr", TLDR),
        ("focal", Focal),
        ("prior", ContextDependence),
    ):
        assert type(get_weighter(name)) is cls
    assert get_weighter("rho1", keep_ratio=0.3).keep_ratio == 0.3
    w = TLDR()
    assert get_weighter(w) is w


# ------------------------------------------------------------------------------------------- Rho-1
def test_excess_loss_is_signed_and_abs_variant():
    a, r = torch.tensor([[2.0, 1.0, 5.0]]), torch.tensor([[0.5, 3.0, 1.0]])
    m = torch.tensor([[True, True, False]])
    assert excess_loss(a, r, m).tolist() == [[1.5, -2.0, 0.0]]
    assert excess_loss(a, r, m, "abs").tolist() == [[1.5, 2.0, 0.0]]
    with pytest.raises(ValueError, match="variant"):
        excess_loss(a, r, variant="square")
    with pytest.raises(ValueError, match="same"):
        excess_loss(a, r[:, :2])


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 4),
    T=st.integers(1, 9),
    ratio=st.floats(0.001, 1.0),
    levels=st.integers(1, 4),
    seed=st.integers(0, 10**6),
)
def test_rho1_keeps_exactly_round_k_n_with_deterministic_ties(B, T, ratio, levels, seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(B, T, generator=g) < 0.7
    m.view(-1)[0] = True
    score = torch.randint(0, levels, (B, T), generator=g).float()  # few levels: many ties
    sel = top_k_mask(score, m, ratio)
    N = int(m.sum())
    k = max(1, math.floor(ratio * N + 0.5))
    assert int(sel.sum()) == k == keep_count(N, ratio)
    assert not bool((sel & ~m).any())
    kept, dropped = score[sel], score[m & ~sel]
    if dropped.numel():
        assert float(kept.min()) >= float(dropped.max())
        # ties at the boundary: the kept ones come first in row-major order
        thr = float(kept.min())
        flat_sel, flat_m, flat_s = sel.view(-1), m.view(-1), score.view(-1)
        tied = [i for i in range(B * T) if flat_m[i] and flat_s[i] == thr]
        chosen = [i for i in tied if flat_sel[i]]
        assert chosen == tied[: len(chosen)]
    assert torch.equal(sel, top_k_mask(score, m, ratio))
    # the weighter keeps the same count from (CE, reference CE)
    ce = torch.rand(B, T, generator=g)
    w = Rho1(ratio)(
        TokenBatch(None, torch.zeros(B, T, dtype=torch.long), m, ce, extra={"ref_token_loss": ce - score})
    )
    assert int(w.sum()) == k and set(w[m].unique().tolist()) <= {0.0, 1.0}


def test_rho1_selective_loss_value_and_gradient_against_hand_formula():
    z, y, m, g = batch(seed=1)
    ce, dce = ce64(z, y, m)
    ref = (ce.float() - 3 * torch.randn(m.shape, generator=g)).clamp_min(0)  # excess losses of both signs
    score = torch.where(m, ce - ref.double(), -math.inf)
    N = int(m.sum())
    k = math.floor(0.4 * N + 0.5)
    top = torch.zeros(m.numel(), dtype=torch.bool)
    top[torch.argsort(score.view(-1), descending=True)[:k]] = True  # no ties in random floats
    top = top.view(m.shape)
    expect = float(ce[top].sum()) / k  # −(1/(N·k%)) Σ 1[top] log P
    zr = z.clone().requires_grad_(True)
    loss = selective_lm_loss(zr, y, m, ref, keep_ratio=0.4)
    assert loss.item() == pytest.approx(expect, abs=fp32_atol(float(z.abs().max()), 11))
    loss.backward()
    expect_g = torch.where(top, 1.0 / k, 0.0).double()[..., None] * dce
    torch.testing.assert_close(zr.grad.double(), expect_g, atol=fp32_atol(1.0, 11), rtol=0)
    # the signed score matters: ranking by |L_Δ| selects a different set here
    out_abs = compute_token_objective(z, y, m, Rho1(0.4, "abs"), ref_token_loss=ref)
    out_sig = compute_token_objective(z, y, m, Rho1(0.4), ref_token_loss=ref)
    assert not torch.equal(out_abs.weights, out_sig.weights)
    assert out_sig.kept_fraction.item() == pytest.approx(k / N)
    assert out_sig.logs["excess_loss_mean"].item() == pytest.approx(
        float((ce - ref.double())[m].mean()), abs=1e-5
    )


def test_rho1_softmax_variant_weights():
    ce = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    m = torch.ones(1, 4, dtype=torch.bool)
    b = TokenBatch(
        None, torch.zeros(1, 4, dtype=torch.long), m, ce, extra={"ref_token_loss": torch.zeros(1, 4)}
    )
    w = Rho1(0.5, "softmax", temperature=2.0)(b)
    # kept: the two largest scores (3, 4); w ∝ exp(L_Δ/τ), scaled to sum k = 2
    e3, e4 = math.exp(3 / 2), math.exp(4 / 2)
    assert w[0].tolist() == pytest.approx([0, 0, 2 * e3 / (e3 + e4), 2 * e4 / (e3 + e4)], abs=1e-6)
    full = Rho1(1.0, "softmax")(b)
    assert full[0].tolist() == pytest.approx((4 * torch.softmax(ce[0], 0)).tolist(), abs=1e-6)


def test_rho1_bad_input():
    for bad in (0, 0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="keep_ratio"):
            Rho1(bad)
    with pytest.raises(ValueError, match="variant"):
        Rho1(0.5, "hard")
    with pytest.raises(ValueError, match="temperature"):
        Rho1(0.5, "softmax", temperature=0)
    z, y, m, _ = batch(seed=2)
    with pytest.raises(ValueError, match="ref_token_loss"):
        compute_token_objective(z, y, m, "rho1")
    with pytest.raises(ValueError, match="shape"):
        compute_token_objective(z, y, m, "rho1", ref_token_loss=torch.zeros(2, 2))
    ref = torch.zeros(m.shape)
    ref[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        compute_token_objective(z, y, m, "rho1", ref_token_loss=ref)


# ------------------------------------------------------------------------------------------- TLDR and focal
def _hand_weighted(z, y, m, w_fn, dw_dce, detach):
    """L = Σ m·w(CE)·CE / Σ m and its gradient: dL/dz = (w + CE·w'(CE)·[not detached])·dCE/dz / Σ m."""
    ce, dce = ce64(z, y, m)
    n = int(m.sum())
    w = torch.where(m, w_fn(ce), 0.0)
    loss = float((w * ce).sum()) / n
    coef = w + (0.0 if detach else ce * dw_dce(ce))
    return loss, torch.where(m, coef, 0.0)[..., None] * dce / n


@pytest.mark.parametrize("detach", [False, True])
def test_tldr_value_and_gradient_flow_through_the_weight(detach):
    z, y, m, _ = batch(seed=3)
    zr = z.clone().requires_grad_(True)
    loss = weighted_token_loss(zr, y, m, weighter=TLDR(detach=detach))
    loss.backward()
    # w = cos(π p) + 1, p = e^{−CE}: dw/dCE = π·p·sin(π p)
    exp_loss, exp_g = _hand_weighted(
        z,
        y,
        m,
        lambda ce: torch.cos(math.pi * torch.exp(-ce)) + 1,
        lambda ce: math.pi * torch.exp(-ce) * torch.sin(math.pi * torch.exp(-ce)),
        detach,
    )
    assert loss.item() == pytest.approx(exp_loss, abs=fp32_atol(float(z.abs().max()), 11))
    torch.testing.assert_close(zr.grad.double(), exp_g, atol=fp32_atol(2.0, 11), rtol=0)
    # the two gradients differ measurably (the not-detached weight is not a constant)
    if not detach:
        _, g_det = _hand_weighted(z, y, m, lambda ce: torch.cos(math.pi * torch.exp(-ce)) + 1, None, True)
        assert float((g_det - exp_g).abs().max()) > 1e-3


@pytest.mark.parametrize(("gamma", "detach"), [(2.0, False), (2.0, True), (0.5, False), (0.0, False)])
def test_focal_value_and_gradient(gamma, detach):
    z, y, m, _ = batch(seed=4)
    zr = z.clone().requires_grad_(True)
    loss = weighted_token_loss(zr, y, m, weighter=Focal(gamma, detach=detach))
    loss.backward()
    # w = (1 − p)^γ: dw/dCE = γ (1 − p)^{γ−1}·p
    exp_loss, exp_g = _hand_weighted(
        z,
        y,
        m,
        lambda ce: (1 - torch.exp(-ce)) ** gamma,
        lambda ce: gamma * (1 - torch.exp(-ce)) ** (gamma - 1) * torch.exp(-ce),
        detach,
    )
    assert loss.item() == pytest.approx(exp_loss, abs=fp32_atol(float(z.abs().max()), 11))
    torch.testing.assert_close(zr.grad.double(), exp_g, atol=fp32_atol(4.0, 11), rtol=0)
    if gamma == 0.0:
        assert loss.item() == pytest.approx(weighted_token_loss(z, y, m).item(), abs=1e-6)


def test_focal_and_tldr_hand_values_and_finite_gradient_at_p_one():
    ce = torch.tensor([[0.0, math.log(2.0), math.log(4.0)]])
    b = TokenBatch(None, torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.bool), ce)
    assert Focal(2.0)(b)[0].tolist() == pytest.approx([0.0, 0.25, 0.5625])
    assert TLDR()(b)[0].tolist() == pytest.approx([0.0, 1.0, math.cos(math.pi / 4) + 1])
    # γ < 1 at p = 1 (a very confident correct token): the gradient stays finite
    z = torch.tensor([[[60.0, 0.0, 0.0]]], requires_grad=True)
    weighted_token_loss(z, torch.tensor([[0]]), torch.tensor([[True]]), weighter=Focal(0.5)).backward()
    assert bool(torch.isfinite(z.grad).all())
    with pytest.raises(ValueError, match="gamma"):
        Focal(-1.0)


# ------------------------------------------------------------------------------------------- PRIOR
def test_context_dependence_weights_formula_and_mean_one():
    p = torch.tensor([[0.5, 0.75, 0.1, 0.2]])
    m = torch.tensor([[True, True, True, False]])
    for alpha in (1.0, 2.0, 0.0):
        w = context_dependence_weights(torch.log(p), m, alpha)
        f = (1 - p[0, :3]) ** alpha
        assert w[0, :3].tolist() == pytest.approx((f / f.mean()).tolist(), abs=1e-6)
        assert w[0, 3].item() == 0.0 and w[m].mean().item() == pytest.approx(1.0, abs=1e-6)
    # the loss is the re-weighted mean CE
    z, y, mm, g = batch(seed=5)
    lp = -3 * torch.rand(mm.shape, generator=g)
    out = compute_token_objective(z, y, mm, ContextDependence(1.5), ref_noctx_logprobs=lp)
    ce, _ = ce64(z, y, mm)
    f = torch.where(mm, (1 - torch.exp(lp.double())) ** 1.5, 0.0)
    w = f / (f.sum() / mm.sum())
    assert out.loss.item() == pytest.approx(float((w * ce).sum() / mm.sum()), abs=1e-5)


def test_context_dependence_bad_input():
    m = torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="alpha"):
        ContextDependence(-1)
    with pytest.raises(ValueError, match="all context-dependence weights are 0"):
        context_dependence_weights(torch.zeros(1, 2), m)
    with pytest.raises(ValueError, match="log-probabilities"):
        context_dependence_weights(torch.ones(1, 2), m)
    with pytest.raises(ValueError, match="NaN"):
        context_dependence_weights(torch.tensor([[float("nan"), -1.0]]), m)


# ------------------------------------------------------------------------------------------- reference helpers
@pytest.fixture(scope="module")
def right_padded(llama):
    enc = llama.tokenizer(["the cat sat on the mat", "a dog ran"], return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def test_reference_token_loss_adapter_and_module_paths_equal_the_policy_ce(llama, right_padded):
    ids, am = right_padded
    labels, mask = shift_labels(ids, am)
    with torch.no_grad():
        policy_ce = token_loss(llama.model(input_ids=ids, attention_mask=am).logits, labels, mask)
    via_adapter = reference_token_loss(llama, ids, am, labels, mask, policy=llama)  # token_logprobs path
    via_module = reference_token_loss(copy.deepcopy(llama.model), ids, am, labels, mask)  # forward path
    atol = 1e-4
    torch.testing.assert_close(via_adapter, policy_ce, atol=atol, rtol=0)
    torch.testing.assert_close(via_module, policy_ce, atol=atol, rtol=0)
    assert float(policy_ce[mask].min()) > 1.0  # a wrong token or position would be far off
    # labels that are not the next ids take the forward path too
    lab2 = torch.where(mask, (labels + 1) % llama.structure.vocab_size, labels)
    r2 = reference_token_loss(llama, ids, am, lab2, mask)
    with torch.no_grad():
        torch.testing.assert_close(
            r2,
            token_loss(llama.model(input_ids=ids, attention_mask=am).logits, lab2, mask),
            atol=atol,
            rtol=0,
        )


def test_reference_with_another_vocabulary_is_refused(llama, right_padded):
    ids, am = right_padded
    labels, mask = shift_labels(ids, am)
    other = copy.deepcopy(llama.tokenizer)
    other.add_tokens(["<only_in_the_reference>"])
    with pytest.raises(ValueError, match="another tokenizer"):
        check_reference_vocab(llama, other)
    bigger = copy.deepcopy(llama.model)
    bigger.resize_token_embeddings(llama.structure.vocab_size + 8)
    with pytest.raises(ValueError, match="another tokenizer"):
        reference_token_loss(bigger, ids, am, labels, mask, policy=llama)
    check_reference_vocab(llama, llama.tokenizer)


def test_no_context_logprobs_score_the_target_alone(llama):
    ids = llama.tokenizer(
        ["Question: what is two plus two? Answer: four, clearly"], return_tensors="pt"
    ).input_ids
    T = ids.shape[1]
    tm = torch.zeros_like(ids, dtype=torch.bool)
    tm[0, T - 3 :] = True
    tm[0, T - 5] = True  # a gap: the counted tokens are concatenated in order
    labels, mask = shift_labels(ids, target_mask=tm)
    lp = no_context_logprobs(llama, labels, mask)
    bos = llama.tokenizer.bos_token_id
    seq = torch.tensor([[bos] + labels[mask].tolist()])
    direct = llama.token_logprobs(seq)[0, 1:]  # log p(y_i | bos, y_<i)
    torch.testing.assert_close(lp[mask], direct, atol=1e-4, rtol=0)
    assert bool((lp[~mask] == 0).all())
    with torch.no_grad():  # with the context the values differ (the test can fail)
        ctx = -token_loss(llama.model(input_ids=ids).logits, labels, mask)
    assert float((ctx[mask] - lp[mask]).abs().max()) > 1e-3
    # the module path with an explicit bos_id gives the same values
    lp_mod = no_context_logprobs(llama.model, labels, mask, bos_id=bos)
    torch.testing.assert_close(lp_mod, lp, atol=1e-4, rtol=0)


def test_uniform_equals_plain_ce():
    z, y, m, _ = batch(seed=6)
    out = compute_token_objective(z, y, m, Uniform())
    assert out.loss.item() == pytest.approx(torch.nn.functional.cross_entropy(z[m], y[m]).item(), abs=1e-5)
    assert torch.equal(out.weights, m.float())
