"""KernelSHAP and LIME: exact Shapley values by brute force, efficiency, and the surrogate solvers against
independent float64 references."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import tokensmith.attribution.surrogate as sur
from tokensmith.attribution import attribute, get_method, prepare

PROMPT, TARGET = "The capital of France is", " Paris is nice"


@pytest.fixture(autouse=True, scope="module")
def _one_thread(torch_one_thread):
    yield


def _rows_logprobs(ad, ids: list[int], positions: list[int]) -> list[float]:
    x = torch.tensor([ids])
    tm = torch.zeros_like(x, dtype=torch.bool)
    tm[0, positions] = True
    lp = ad.token_logprobs(x, tm)[0]
    return [float(lp[p]) for p in positions]


def test_kernel_shap_with_every_coalition_is_the_exact_shapley_value(shared_tiny):
    ad = shared_tiny("llama")
    r = attribute(ad, PROMPT, target=TARGET, method="kernel_shap", baseline="pad", n_samples=64)
    assert r.extra["exact"] and r.extra["n_coalitions"] == 2**5 - 2
    ids, tp = r.ids.tolist(), r.target_positions.tolist()
    players = list(range(tp[0]))  # the 5 prompt tokens
    assert len(players) == 5
    pad = ad.pad_token_id
    # brute force: v(S) from one explicit forward per subset, Shapley's formula with factorial weights
    v = {}
    for k in range(len(players) + 1):
        for S in itertools.combinations(players, k):
            x = [t if (p in S or p not in players) else pad for p, t in enumerate(ids)]
            v[frozenset(S)] = torch.tensor(_rows_logprobs(ad, x, tp), dtype=torch.float64)
    M = len(players)
    want = torch.zeros(len(tp), M, dtype=torch.float64)
    for i in players:
        others = [p for p in players if p != i]
        for k in range(M):
            wgt = math.factorial(k) * math.factorial(M - k - 1) / math.factorial(M)
            for S in itertools.combinations(others, k):
                want[:, i] += wgt * (v[frozenset(S) | {i}] - v[frozenset(S)])
    # fp32 forwards (batched vs single) differ by ~1e-6 per value; the solve itself is float64
    torch.testing.assert_close(r.scores[:, :M].double(), want, atol=5e-5, rtol=0)
    assert not r.valid[:, M:].any()
    # efficiency on every row
    torch.testing.assert_close(r.scores.sum(-1).double(), (r.target_scores - r.baseline_scores).double(),
                               atol=2e-5, rtol=0)


def test_sampled_kernel_shap_is_efficient_seeded_and_rows_batch(shared_tiny):
    ad = shared_tiny("llama")
    prompt = "Once upon a time in a small village there lived"
    kw = dict(method="kernel_shap", baseline="pad", n_samples=24)
    r = attribute(ad, prompt, target=" a kind old", seed=3, **kw)
    assert not r.extra["exact"] and r.extra["n_coalitions"] == 24
    torch.testing.assert_close(r.scores.sum(-1).double(), (r.target_scores - r.baseline_scores).double(),
                               atol=2e-5, rtol=0)
    again = attribute(ad, prompt, target=" a kind old", seed=3, **kw)
    assert torch.equal(r.scores, again.scores) and r.seed == 3
    other = attribute(ad, prompt, target=" a kind old", seed=4, **kw)
    assert not torch.equal(r.scores, other.scores)
    # the multi-row run equals one run per row (same players, same coalitions), also micro-batched
    players = [[i] for i in range(int(r.target_positions.min()))]
    multi = attribute(ad, prompt, target=" a kind old", seed=3, features=players, batch_size=5, **kw)
    torch.testing.assert_close(multi.scores, r.scores, atol=1e-5, rtol=0)
    for t in range(multi.shape[0]):
        s, e = multi.offsets[int(multi.target_positions[t])]
        t0 = multi.offsets[int(multi.target_positions[0])][0]
        one = attribute(ad, prompt, target=" a kind old", target_span=(s - t0, e - t0), seed=3,
                        features=players, **kw)
        assert one.shape[0] == 1
        torch.testing.assert_close(one.scores[0], multi.scores[t], atol=1e-5, rtol=0)


def _additive_problem(ad, coef: dict[int, float], bias: float):
    """A prepared problem whose scorer is exactly additive in which source tokens are present."""
    p = prepare(ad, "one two three four five six seven", target=" eight")
    pad = ad.pad_token_id
    orig = p.ids.tolist()

    def score_ids(rows, keep=None):
        assert keep is None  # replacement baseline: lengths kept
        vals = [bias + sum(c for i, c in coef.items() if r[i] == orig[i] != pad) for r in rows]
        return torch.tensor(vals, dtype=torch.float64)[:, None]

    p.score_ids = score_ids
    return p


@pytest.mark.parametrize("method", ["kernel_shap", "lime"])
def test_surrogates_recover_an_additive_game(shared_tiny, method):
    ad = shared_tiny("llama")
    gen = torch.Generator().manual_seed(0)
    p0 = prepare(ad, "one two three four five six seven", target=" eight")
    n_players = int(p0.target_positions.min())
    coef = {i: float(c) for i, c in enumerate(torch.randn(n_players, generator=gen))}
    p = _additive_problem(ad, coef, bias=-2.0)
    m = get_method(method, baseline="pad", n_samples=40, **({"alpha": 0.0} if method == "lime" else {}))
    out = m.attribute_batch(p)
    want = torch.tensor([coef[i] for i in range(n_players)])
    # additive game: Shapley values (even from sampled coalitions) and the LIME coefficients are exactly c_i
    assert not out.extra.get("exact", False)  # 2^7 - 2 > 40: sampled
    torch.testing.assert_close(out.scores[0, :n_players], want, atol=1e-5, rtol=0)
    if method == "lime":
        assert abs(out.extra["intercept"][0] - (-2.0)) < 1e-9


def test_constrained_wls_against_kkt_reference():
    gen = torch.Generator().manual_seed(1)
    for M, K in [(3, 6), (6, 40), (8, 15)]:
        Z = (torch.rand(K, M, generator=gen) < 0.5).double()
        y = torch.randn(K, 2, generator=gen, dtype=torch.float64)
        w = torch.rand(K, generator=gen, dtype=torch.float64) + 0.1
        total = torch.randn(2, generator=gen, dtype=torch.float64)
        phi = sur.constrained_wls(Z, y, w, total)
        torch.testing.assert_close(phi.sum(0), total, atol=1e-12, rtol=0)
        A = Z.T @ (w[:, None] * Z)
        if torch.linalg.matrix_rank(A) < M - 1:
            continue
        kkt = torch.zeros(M + 1, M + 1, dtype=torch.float64)
        kkt[:M, :M], kkt[:M, M], kkt[M, :M] = A, 1.0, 1.0
        rhs = torch.cat([Z.T @ (w[:, None] * y), total[None]], 0)
        ref = torch.linalg.solve(kkt, rhs)[:M]
        torch.testing.assert_close(phi, ref, atol=1e-10, rtol=0)


def test_weighted_ridge_against_normal_equations():
    gen = torch.Generator().manual_seed(2)
    K, M = 30, 5
    Z = (torch.rand(K, M, generator=gen) < 0.5).double()
    y = torch.randn(K, 3, generator=gen, dtype=torch.float64)
    w = torch.rand(K, generator=gen, dtype=torch.float64)
    for alpha in (0.0, 0.7):
        coef, b = sur.weighted_ridge(Z, y, w, alpha)
        X = torch.cat([torch.ones(K, 1, dtype=torch.float64), Z], 1)  # intercept column, not penalised
        P = alpha * torch.eye(M + 1, dtype=torch.float64)
        P[0, 0] = 0
        ref = torch.linalg.solve(X.T @ (w[:, None] * X) + P, X.T @ (w[:, None] * y))
        torch.testing.assert_close(b, ref[0], atol=1e-10, rtol=0)
        torch.testing.assert_close(coef, ref[1:], atol=1e-10, rtol=0)


def test_kernel_weights_closed_forms():
    Z = sur.all_coalitions(4)
    w = sur.shapley_kernel_weights(Z)
    for z, wz in zip(Z, w, strict=True):
        s = int(z.sum())
        assert abs(float(wz) - 3 / (math.comb(4, s) * s * (4 - s))) < 1e-15
    with pytest.raises(ValueError, match="infinite"):
        sur.shapley_kernel_weights(torch.ones(1, 4))
    lw = sur.lime_kernel_weights(torch.tensor([[1.0, 0, 0, 0]]), 0.5)
    assert abs(float(lw) - math.exp(-((1 - math.sqrt(0.25)) ** 2) / 0.25)) < 1e-15


def test_lime_on_a_tiny_model_and_a_chat_input(shared_tiny):
    ad = shared_tiny("llama")
    r = attribute(ad, PROMPT, target=TARGET, method="lime", n_samples=48, baseline="pad", seed=0)
    assert r.valid[:, :5].all() and not r.valid[:, 5:].any()
    assert torch.isfinite(r.scores).all() and r.scores[:, :5].abs().sum() > 0
    again = attribute(ad, PROMPT, target=TARGET, method="lime", n_samples=48, baseline="pad", seed=0)
    assert torch.equal(r.scores, again.scores)
    c = attribute(ad, "What is the capital of France?", target="Paris.", chat=True, method="kernel_shap",
                  n_samples=32)
    seg = c.segments
    assert all(seg[i] == "prompt" for i in torch.nonzero(c.valid.any(0)).flatten().tolist())
    torch.testing.assert_close(c.scores.sum(-1).double(), (c.target_scores - c.baseline_scores).double(),
                               atol=2e-5, rtol=0)


def test_bad_settings_raise(shared_tiny):
    ad = shared_tiny("llama")
    with pytest.raises(ValueError, match="n_samples"):
        attribute(ad, PROMPT, target=TARGET, method="kernel_shap", n_samples=0)
    with pytest.raises(ValueError, match="kernel_width"):
        attribute(ad, PROMPT, target=TARGET, method="lime", kernel_width=0)
    with pytest.raises(TypeError, match="settings"):
        attribute(ad, PROMPT, target=TARGET, method="lime", n_permutations=3)


def test_deleting_every_feature_without_a_bos_is_a_clear_error(shared_tiny):
    ad = shared_tiny("llama")  # its tokenizer adds no BOS: the empty coalition leaves the target unpredictable
    for method in ("kernel_shap", "lime"):
        with pytest.raises(ValueError, match="replacement baseline"):
            attribute(ad, "The capital of France is", target=" Paris", method=method, n_samples=8, baseline="delete")
    with pytest.raises(ValueError, match="replacement baseline"):
        attribute(ad, "The capital of France is", target=" Paris", method="shapley", n_permutations=1,
                  baseline="delete")
