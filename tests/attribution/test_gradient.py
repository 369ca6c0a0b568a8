"""Gradient attributions pinned to closed forms, plain-autograd references and axioms (completeness)."""

from __future__ import annotations

import pytest
import torch

from tokensmith.attribution import (
    AttributionProblem,
    IntegratedGradients,
    attribute,
    prepare,
    quadrature,
)
from tokensmith.attribution.gradient import baseline_embeddings

PROMPT, TARGET = "The capital of France is", " Paris is nice"
ARCHS = ["llama", "gpt2", "qwen2", "gemma3", "gpt_neox"]
BASE_ID = 42  # a token-id baseline: non-zero embedding (the pad row of a random init is zero; see below)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(torch_one_thread):
    yield


def test_quadrature_rules_integrate_polynomials():
    for n in (1, 3, 8):
        a, w = quadrature(n)
        assert abs(float(w.sum()) - 1) < 1e-12
        for deg in range(2 * n):  # Gauss-Legendre is exact up to degree 2n - 1
            assert abs(float((w * a**deg).sum()) - 1 / (deg + 1)) < 1e-12
    a, w = quadrature(4, "riemann_trapezoid")
    assert a.tolist() == [0, 1 / 3, 2 / 3, 1] and abs(float((w * a).sum()) - 0.5) < 1e-12
    with pytest.raises(ValueError, match="unknown quadrature rule"):
        quadrature(4, "simpson")
    with pytest.raises(ValueError, match="positive"):
        quadrature(0)


@pytest.mark.parametrize("arch", ARCHS)
def test_ig_completeness_within_1_percent_at_64_gauss_legendre_steps(arch, shared_tiny):
    ad = shared_tiny(arch)
    r = attribute(ad, PROMPT, target=TARGET, method="ig", n_steps=64, baseline=BASE_ID)
    diff = (r.target_scores - r.baseline_scores).abs()
    assert r.delta.shape == (r.shape[0],)
    # the axiom: sum_i a_ti = f_t(x) - f_t(x'), to 1% of the difference on every row
    assert (r.delta.abs() <= 0.01 * diff + 1e-6).all(), (r.delta, diff)


def test_zero_baseline_warns_about_the_discontinuity_of_pre_norm_models(shared_tiny):
    ad = shared_tiny("llama")
    with pytest.warns(UserWarning, match="almost\\) zero"):
        attribute(ad, PROMPT, target=" Paris", method="ig", n_steps=4, baseline="zero")


class QuadraticProblem(AttributionProblem):
    """f_t(x) = (a_t · x)^2 summed over sources: IG has a closed form along the straight path."""

    def score_embeds(self, embeds: torch.Tensor, grad: bool = False) -> torch.Tensor:
        src = self.sources.to(embeds.device)[None, :, None]
        x = (embeds * src).reshape(embeds.shape[0], -1)
        return (x.double() @ self.meta["A"].t()) ** 2


def test_ig_equals_the_closed_form_on_a_model_polynomial_in_its_embeddings(shared_tiny):
    ad = shared_tiny("llama")
    base = prepare(ad, PROMPT, TARGET)
    L, d = len(base.encoded), ad.structure.hidden_size
    g = torch.Generator().manual_seed(0)
    A = torch.randn(2, L * d, generator=g, dtype=torch.float64)
    p = QuadraticProblem(ad, base.encoded, base.sources, base.target_positions[:2], base.target_labels[:2],
                         meta={"A": A})
    out = IntegratedGradients(n_steps=2, baseline=BASE_ID).attribute_batch(p)  # degree 1 integrand: 2 points exact
    with torch.no_grad():
        e = ad.embed(p.ids[None])[0].double()
        b = baseline_embeddings(p, BASE_ID).double()
    src = p.sources[:, None].double()
    # a_ti = (e - b)_i · ∫ 2 (A_t·x(α)) A_t,i dα = (e - b)_i · A_t,i (A_t·e + A_t·b), with x masked to the sources
    for t in range(2):
        At = A[t].view(L, d) * src
        want = ((e - b) * At).sum(-1) * ((At * e).sum() + (At * b).sum())
        # the scores are returned in fp32: compare to fp32 rounding of the float64 closed form
        torch.testing.assert_close(out.scores[t].double(), want, atol=4e-7 * float(want.abs().max()), rtol=0)
    assert out.delta.abs().max() < 4e-7 * float(out.target_scores.abs().max())  # fp32 path points


def _autograd_reference(ad, problem):
    """Per-row gradient of log p(token) wrt the input embeddings, one plain backward per row."""
    e = ad.embed(problem.ids[None]).detach().clone().requires_grad_(True)
    logits = ad.model(inputs_embeds=e).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    grads = []
    for p in problem.target_positions.tolist():
        (g,) = torch.autograd.grad(lp[p - 1, int(problem.ids[p])], e, retain_graph=True)
        grads.append(g[0])
    return e.detach()[0], torch.stack(grads)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_input_x_gradient_and_saliency_equal_plain_autograd(arch, shared_tiny):
    ad = shared_tiny(arch)
    prob = prepare(ad, PROMPT, TARGET)
    e, G = _autograd_reference(ad, prob)
    valid = prob.valid()
    ixg = attribute(ad, PROMPT, target=TARGET, method="input_x_gradient")
    sal = attribute(ad, PROMPT, target=TARGET, method="saliency")
    want_ixg = torch.where(valid, (G * e).sum(-1).float(), torch.zeros(()))
    want_sal = torch.where(valid, G.norm(dim=-1).float(), torch.zeros(()))
    tol = 1e-4 * float(want_sal.max())
    torch.testing.assert_close(ixg.scores, want_ixg, atol=tol, rtol=1e-3)
    torch.testing.assert_close(sal.scores, want_sal, atol=tol, rtol=1e-3)
    assert (sal.scores >= 0).all()


@pytest.mark.parametrize("method", ["ig", "input_x_gradient", "smoothgrad", "layer_ig"])
def test_batched_multi_target_equals_each_target_separately(method, shared_tiny):
    ad = shared_tiny("llama")
    kw = {"ig": {"n_steps": 8, "baseline": BASE_ID}, "layer_ig": {"n_steps": 8, "layer": "layers.1.resid_post"}}.get(method, {})
    full = attribute(ad, PROMPT, target=TARGET, method=method, **kw)
    t0 = ad.encode(PROMPT, target=TARGET).spans["target"].char_start
    starts = []
    for t, pos in enumerate(full.target_positions.tolist()):
        cs, ce = full.offsets[pos]
        one = attribute(ad, PROMPT, target=TARGET, method=method, target_span=(cs - t0, ce - t0), **kw)
        assert one.shape[0] == 1 and int(one.target_positions[0]) == pos
        scale = max(1.0, float(full.scores.abs().max()))
        torch.testing.assert_close(one.scores[0], full.scores[t], atol=1e-5 * scale, rtol=0)
        starts.append(pos)
    assert len(starts) == full.shape[0] >= 2


def test_template_tokens_are_held_and_excluded_in_chat_mode(shared_tiny):
    ad = shared_tiny("llama")
    r = attribute(ad, "Tell me a joke", target="Sure, here", chat=True, method="ig", n_steps=16, baseline=BASE_ID)
    seg = r.segments
    assert all(not r.sources[i] for i, s in enumerate(seg) if s == "template")
    assert not r.valid[:, [i for i, s in enumerate(seg) if s == "template"]].any()
    assert (r.delta.abs() <= 0.05 * (r.target_scores - r.baseline_scores).abs() + 1e-5).all()
    inc = attribute(ad, "Tell me a joke", target="Sure, here", chat=True, method="input_x_gradient", include_template=True)
    assert inc.valid[:, [i for i, s in enumerate(seg) if s == "template"]].any()


def test_contrast_and_callable_targets(shared_tiny):
    from tokensmith.attribution import Contrast

    ad = shared_tiny("llama")
    r = attribute(ad, "The capital is", target=Contrast(" Paris", " London"), method="ig", n_steps=32, baseline=BASE_ID)
    with torch.no_grad():
        lp = ad.token_logprobs(ad.encode("The capital is", target=" Paris")).sum() - ad.token_logprobs(
            ad.encode("The capital is", target=" London")).sum()
    assert abs(float(r.target_scores[0]) - float(lp)) < 1e-4
    assert abs(float(r.delta[0])) <= 0.01 * abs(float(r.target_scores[0] - r.baseline_scores[0])) + 1e-6
    assert not r.valid[0, 3:].any()  # only the shared prompt is attributed
    tid = int(ad.tokenizer(" Paris", add_special_tokens=False).input_ids[0])
    r2 = attribute(ad, "The capital is", target=lambda out, p: out.logits[:, -1, tid], method="input_x_gradient")
    assert r2.shape[0] == 1 and r2.extra["target_kind"] == "callable"


@pytest.mark.parametrize("layer", ["layers.0.resid_post", "layers.1.attn.out"])
def test_layer_ig_completeness_from_the_baseline_inputs_activation(layer, shared_tiny):
    ad = shared_tiny("llama")
    r = attribute(ad, PROMPT, target=TARGET, method="layer_ig", layer=layer, n_steps=64, baseline=BASE_ID)
    diff = (r.target_scores - r.baseline_scores).abs()
    assert (r.delta.abs() <= 0.01 * diff + 1e-6).all(), (r.delta, diff)
    if layer.endswith("resid_post"):
        # the residual stream is the whole state: its start point reproduces the baseline input's scores
        full = attribute(ad, PROMPT, target=TARGET, method="ig", n_steps=4, baseline=BASE_ID)
        torch.testing.assert_close(r.baseline_scores, full.baseline_scores, atol=1e-5, rtol=0)


class _Ridge:
    """A duck-typed problem: ``f(x) = tanh(k·(⟨u, x⟩ − c))``, one row — IG has the closed form
    ``a_i = (Σ_d d_id u_id / ⟨u, d⟩)·(f(e) − f(b))`` with ``d = e − b``, and a sharp step along the path."""

    def __init__(self, k: float, c: float, L: int = 5, D: int = 3):
        g = torch.Generator().manual_seed(0)
        self.u = torch.randn(L, D, generator=g, dtype=torch.float64)
        self.k, self.c = k, c

    def score_embeds(self, x, grad=False):
        return torch.tanh(self.k * ((x * self.u).sum((1, 2)) - self.c))[:, None]


def test_adaptive_ig_meets_completeness_where_uniform_rules_do_not():
    from tokensmith.attribution.gradient import adaptive_ig, point_contributions
    from tokensmith.attribution.quadrature import quadrature

    prob = _Ridge(k=40.0, c=0.3)
    b = torch.zeros(5, 3, dtype=torch.float64)
    e = torch.ones(5, 3, dtype=torch.float64) * (1.0 / prob.u.sum())  # ⟨u, e⟩ = 1: the step sits at α = 0.3
    d = e - b
    f = lambda z: torch.tanh(prob.k * ((z * prob.u).sum() - prob.c))  # noqa: E731
    closed = (d * prob.u).sum(-1) / (d * prob.u).sum() * (f(e) - f(b))
    sc, f1, f0, info = adaptive_ig(prob, e, b, tol=1e-3, max_points=256)
    assert info["max_relative_delta"] <= 1e-3
    torch.testing.assert_close(sc[0], closed, atol=2e-3 * float(abs(f(e) - f(b))), rtol=0)
    # uniform Gauss-Legendre with as many points misses the same tolerance
    a, w = quadrature(info["points"], "gausslegendre")
    C, _ = point_contributions(prob, b[None] + a[:, None, None] * d[None], w, d)
    uniform = C.sum(0)[0]
    assert abs(float(uniform.sum() - (f(e) - f(b)))) / abs(float(f(e) - f(b))) > 1e-3
    # the refinement concentrated its intervals around the step
    widths = {round(a1 - a0, 6) for a0, a1 in info["intervals"] if a0 <= 0.3 <= a1}
    assert min(widths) < 0.25


def test_adaptive_ig_on_a_tiny_model_and_its_budget_warning(shared_tiny, torch_one_thread):
    ad = shared_tiny("llama")
    kw = {"target": " Paris is nice", "method": "ig", "baseline": 42}
    ref = attribute(ad, "The capital of France is", n_steps=64, **kw)
    ada = attribute(ad, "The capital of France is", rule="adaptive", n_steps=64, tol=1e-3, **kw)
    assert float(ada.relative_delta().max()) <= 1e-3
    assert ada.extra["adaptive"]["points"] <= 64
    scale = float(ref.scores.abs().max())
    torch.testing.assert_close(ada.scores, ref.scores, atol=2e-3 * scale, rtol=0)
    with pytest.warns(UserWarning, match="budget"):
        attribute(ad, "The capital of France is", rule="adaptive", n_steps=8, tol=0.0, **kw)


def test_multi_token_contrast_is_one_row_and_meets_completeness(shared_tiny, torch_one_thread):
    from tokensmith.attribution import Contrast

    ad = shared_tiny("llama")
    r = attribute(ad, "The movie was", target=Contrast(" really great", " very bad"), method="ig", n_steps=32,
                  baseline=42)
    assert r.shape[0] == 1 and len(r.target_labels) == 1
    a = ad.encode("The movie was", target=" really great")
    b = ad.encode("The movie was", target=" very bad")
    fa = ad.token_logprobs(a.input_ids[None], a.target_mask[None]).sum()
    fb = ad.token_logprobs(b.input_ids[None], b.target_mask[None]).sum()
    torch.testing.assert_close(r.target_scores[0], (fa - fb).float(), atol=1e-4, rtol=0)
    assert float(r.relative_delta()[0]) < 0.01
