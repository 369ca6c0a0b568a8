"""Integrated Jacobians (ATT-12): closed forms on linear / quadratic encoders, the completeness identity
Σ A = s(a,b) − s(r_a,b) − s(a,r_b) + s(r_a,r_b) on tiny BERT and on the bundled MiniLM, bad input."""

from __future__ import annotations

import math

import pytest
import torch

import tokensmith as ts
from tokensmith.attribution.siamese import (
    PairAttribution,
    encoder_function,
    integrated_contributions,
    integrated_jacobians,
)

A_TEXT, B_TEXT = "a cat sat on the mat", "the dog lay down"


@pytest.fixture(autouse=True, scope="module")
def _one_thread(torch_one_thread):
    yield


# ---------------------------------------------------------------------------------------------- pure function
def _toy(T: int = 5, d: int = 3, D: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D, T * d, generator=g, dtype=torch.float64)
    x = torch.randn(T, d, generator=g, dtype=torch.float64)
    r = torch.randn(T, d, generator=g, dtype=torch.float64)
    return W, x, r


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_linear_encoder_gives_the_closed_form_pair_matrix(mode):
    # f(z) = W vec(z): J = W everywhere, so A_ij = Δa_iᵀ W_iᵀ W_j Δb_j exactly, for any rule and step count
    W, x, r = _toy()
    _, y, q = _toy(seed=1)
    T, d = x.shape

    def f(z):
        return z.flatten(1) @ W.T

    move = torch.tensor([True, True, False, True, True])
    Ua = integrated_contributions(f, x, r, move, n_steps=1, rule="riemann_left", mode=mode)
    Ub = integrated_contributions(f, y, q, n_steps=3, mode=mode, batch_size=2)
    Wi = W.reshape(-1, T, d)  # [D, T, d]
    ua = torch.einsum("ktd,td->tk", Wi, x - r) * move[:, None]
    ub = torch.einsum("ktd,td->tk", Wi, y - q)
    torch.testing.assert_close(Ua, ua, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(Ua @ Ub.T, ua @ ub.T, rtol=1e-12, atol=1e-12)
    assert (Ua[2] == 0).all()


def test_quadratic_encoder_is_exact_with_one_gauss_legendre_node_and_not_with_riemann():
    # f(z) = W vec(z)²: ∫₀¹ 2(r + κΔ) dκ ⊙ Δ = x² − r², so U_i = W_i (x_i² − r_i²); the integrand is linear
    # in κ, which one Gauss-Legendre node (the midpoint) integrates exactly and a left Riemann sum does not
    W, x, r = _toy()
    T, d = x.shape

    def f(z):
        return (z.flatten(1) ** 2) @ W.T

    U = integrated_contributions(f, x, r, n_steps=1)
    want = torch.einsum("ktd,td->tk", W.reshape(-1, T, d), x**2 - r**2)
    torch.testing.assert_close(U, want, rtol=1e-12, atol=1e-12)
    left = integrated_contributions(f, x, r, n_steps=1, rule="riemann_left")
    assert (left - want).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------- tiny BERT
def test_encoder_function_is_the_adapters_pooling(shared_tiny):
    ad = shared_tiny("bert")
    enc = ad.encode(A_TEXT)
    e = ad.embed(enc.input_ids[None])
    with torch.no_grad():
        dot, cos = encoder_function(ad, "dot")(e), encoder_function(ad, "cosine")(e)
    ref = ad.pool(enc)
    torch.testing.assert_close(dot, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(cos, torch.nn.functional.normalize(ref, dim=-1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("score", ["cosine", "dot"])
def test_sum_equals_the_score_difference_from_the_references_on_tiny_bert(shared_tiny, score):
    ad = shared_tiny("bert")
    pa = integrated_jacobians(ad, A_TEXT, B_TEXT, n_steps=8, baseline=42, score=score)
    assert isinstance(pa, PairAttribution)
    assert pa.shape == (len(pa.tokens_a), len(pa.tokens_b))
    # the reference terms, recomputed independently: pool the token sequences with id 42 at the attributed
    # positions (special tokens kept), as the adapter pools any input
    def pooled(ids):
        v = ad.pool({"input_ids": ids[None], "attention_mask": torch.ones(1, len(ids), dtype=torch.long)})[0].double()
        return torch.nn.functional.normalize(v, dim=0) if score == "cosine" else v

    ia, ib = pa.ids_a, pa.ids_b
    ra = torch.where(pa.moved_a, torch.full_like(ia, 42), ia)
    rb = torch.where(pa.moved_b, torch.full_like(ib, 42), ib)
    fa, fb, fra, frb = pooled(ia), pooled(ib), pooled(ra), pooled(rb)
    terms = [float(fa @ fb), float(fra @ fb), float(fa @ frb), float(fra @ frb)]
    tol = 1e-5 * max(1.0, float(fa.norm() * fb.norm()))
    assert list(pa.reference_terms.values()) == pytest.approx(terms, abs=tol)
    expected = terms[0] - terms[1] - terms[2] + terms[3]
    assert pa.expected_sum == pytest.approx(expected, abs=4 * tol)
    assert abs(float(pa.matrix.double().sum()) - expected) <= 0.01 * abs(expected) + 4 * tol
    # per side: Σ_i u_i = f(a) − f(r_a) (the identity's two factors)
    torch.testing.assert_close(pa.contrib_a.double().sum(0), fa - fra, rtol=0, atol=0.01 * float((fa - fra).norm()))
    # special tokens are held, flagged and get zero rows / columns
    assert pa.special_a[0] and pa.special_a[-1] and not pa.moved_a[0]
    assert (pa.matrix[~pa.moved_a] == 0).all() and (pa.matrix[:, ~pa.moved_b] == 0).all()


def test_delta_shrinks_with_n_steps(shared_tiny):
    ad = shared_tiny("bert")
    riemann = [abs(integrated_jacobians(ad, A_TEXT, B_TEXT, n_steps=n, rule="riemann_left", baseline=42).delta)
               for n in (1, 4)]
    gl = [integrated_jacobians(ad, A_TEXT, B_TEXT, n_steps=n, baseline=42) for n in (1, 4)]
    assert riemann[1] < riemann[0] / 2  # first-order rule: error ~ 1/n
    assert abs(gl[1].delta) < abs(gl[0].delta) / 100
    assert gl[1].relative_delta < 0.01  # measured 1.7e-5 at 4 nodes


def test_forward_and_reverse_mode_agree_and_micro_batching_changes_nothing(shared_tiny):
    ad = shared_tiny("bert")
    fwd = integrated_jacobians(ad, A_TEXT, B_TEXT, n_steps=3, baseline=42)
    rev = integrated_jacobians(ad, A_TEXT, B_TEXT, n_steps=3, baseline=42, mode="reverse", batch_size=2)
    small = integrated_jacobians(ad, A_TEXT, B_TEXT, n_steps=3, baseline=42, batch_size=5)
    scale = float(fwd.matrix.abs().max())
    # fp32 forwards of different batch shapes: rounding of a 64-wide, 2-layer model (tests/README.md rule)
    tol = 4 * 2**-23 * math.sqrt(64) * 2 * 16 * scale
    torch.testing.assert_close(rev.matrix, fwd.matrix, rtol=0, atol=tol)
    torch.testing.assert_close(small.matrix, fwd.matrix, rtol=0, atol=tol)
    assert scale > 100 * tol


def test_shift_reports_the_shifted_score_with_zero_reference_terms(shared_tiny):
    ad = shared_tiny("bert")
    plain = integrated_jacobians(ad, A_TEXT, B_TEXT, n_steps=4, baseline=42, score="dot")
    sh = integrated_jacobians(ad, A_TEXT, B_TEXT, n_steps=4, baseline=42, score="dot", shift=True)
    torch.testing.assert_close(sh.matrix, plain.matrix, rtol=0, atol=0)
    assert sh.score_ref_a == sh.score_ref_b == sh.score_ref_ab == 0.0
    assert sh.score == pytest.approx(plain.expected_sum, rel=1e-9)
    assert sh.delta == pytest.approx(plain.delta, abs=1e-9 * abs(sh.score))


def test_include_special_moves_cls_and_sep(shared_tiny):
    ad = shared_tiny("bert")
    pa = integrated_jacobians(ad, A_TEXT, B_TEXT, n_steps=4, baseline=42, include_special=True)
    assert pa.moved_a.all() and pa.special_a[0] and pa.matrix[0].abs().sum() > 0
    assert pa.relative_delta < 0.01


def test_exports_top_pandas_plot(shared_tiny):
    ad = shared_tiny("bert")
    pa = integrated_jacobians(ad, A_TEXT, B_TEXT, n_steps=2, baseline=42)
    top = pa.top(3)
    assert len(top) == 3 and abs(top[0][2]) == pytest.approx(float(pa.matrix.abs().max()))
    ta, tb, v, i, j = pa.top(1, by="value")[0]
    assert (ta, tb) == (pa.tokens_a[i], pa.tokens_b[j]) and v == pytest.approx(float(pa.matrix.max()))
    df = pa.to_pandas()
    assert len(df) == pa.shape[0] * pa.shape[1] and df["value"].sum() == pytest.approx(float(pa.matrix.sum()), abs=1e-5)
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    ax = pa.plot()
    assert len(ax.get_xticklabels()) == int(pa.moved_b.sum())
    assert "delta" in repr(pa)


def test_a_decoder_encoder_works_too(shared_tiny):
    # mean pooling over a causal LM's final-normed states (LLM embedders); baseline 42, not the zero pad row
    ad = shared_tiny("llama")
    pa = integrated_jacobians(ad, "Hello there", "Hi you", n_steps=6, baseline=42, score="dot")
    assert pa.relative_delta < 0.01


def test_bad_input_raises(shared_tiny):
    ad = shared_tiny("bert")
    with pytest.raises(ValueError, match="text a is empty"):
        integrated_jacobians(ad, "  ", B_TEXT)
    with pytest.raises(TypeError, match="text b must be a str"):
        integrated_jacobians(ad, A_TEXT, 3)
    with pytest.raises(ValueError, match="score must be"):
        integrated_jacobians(ad, A_TEXT, B_TEXT, score="euclidean")
    with pytest.raises(ValueError, match="NaN"):
        integrated_jacobians(ad, A_TEXT, B_TEXT, baseline=torch.full((ad.structure.hidden_size,), math.nan))
    with pytest.raises(ValueError, match="n_steps"):
        integrated_jacobians(ad, A_TEXT, B_TEXT, n_steps=0)
    with pytest.raises(ValueError, match="mode"):
        integrated_jacobians(ad, A_TEXT, B_TEXT, mode="sideways")
    with pytest.raises(ValueError, match="no non-special token"):
        integrated_jacobians(ad, ad.encode("[CLS]", allow_special=True), B_TEXT)


# ---------------------------------------------------------------------------------------------- MiniLM
@pytest.mark.real_model
def test_minilm_identity_and_top_pair():
    ad = ts.load("minilm-l6")
    a, b = "A man plays a guitar.", "Someone is playing music."
    pa = integrated_jacobians(ad, a, b, n_steps=16)
    cos = float(torch.nn.functional.cosine_similarity(ad.pool(a), ad.pool(b)))
    assert pa.score == pytest.approx(cos, abs=1e-5)
    # measured 0.73% at 16 Gauss-Legendre nodes (55% at 4, 33% at 8)
    assert pa.relative_delta < 0.02
    assert pa.top(1)[0][:2] == ("guitar", "music")
