"""Token geometry: closed forms, axioms and known manifolds for the point statistics; streamed == in-memory."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokensmith.analysis.geometry as geo
from tokensmith.analysis.geometry import (
    METRICS,
    Whitening,
    anisotropy,
    effective_rank,
    entropy_effective_rank,
    knn_overlap,
    shuffle_tokens,
    token_geometry,
    twonn,
    whiten,
)
from tokensmith.analysis.stream import Moments, stream_hidden

pytestmark = pytest.mark.usefixtures("torch_one_thread")

F64 = torch.float64
ARCHS = ["gpt2", "llama", "qwen2", "gemma3", "gpt_neox", "bert"]  # t5: encoder-decoder, refused (tested below)
TEXTS = [
    "The cat sat on the mat and looked at the birds outside the window.",
    "Rivers flow to the sea, carrying sand, stones and leaves from the hills.",
    "A quick brown fox jumps over the lazy dog near three old trees.",
    "In 1999, prices rose by four percent; the central bank did not react.",
    "She said no, not again, and then she left the room very quietly.",
    "Why would anyone write code like this? Nobody knows, nobody asks.",
    "Mountains are tall.",
    "The library opens at nine and closes at five on most weekdays.",
]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rotation(D: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(D, D, generator=g, dtype=F64))[0]


# ----------------------------------------------------------------------------------------------- anisotropy
def test_anisotropy_of_isotropic_gaussians_is_zero_within_its_standard_error():
    # cos(x_i, x_j) of independent isotropic vectors: mean 0, variance 1/d, and distinct pairs are uncorrelated
    # (E[c_ij c_ik] = E[x̂_iᵀ x̂_j x̂_kᵀ x̂_i] = 0), so the mean over P = N(N−1)/2 pairs has std 1/√(d·P).
    N, d = 2000, 16
    X = torch.randn(N, d, generator=_gen(0), dtype=F64)
    sd = 1 / math.sqrt(d * N * (N - 1) / 2)
    assert abs(anisotropy(X)) < 5 * sd


def test_anisotropy_of_a_large_shared_offset_is_one_minus_d_over_norm_squared():
    # x = c + z: cos ≈ 1 − ‖z_i⊥ − z_j⊥‖² / (2‖c‖²), whose mean is 1 − (d−1)/‖c‖² (z⊥: the d−1 directions ⊥ c).
    # The mean over pairs has a relative spread ~√(2/(d−1))/√N ≈ 2%; 10% is 5 of those.
    N, d, c = 300, 16, 1000.0
    X = torch.randn(N, d, generator=_gen(1), dtype=F64)
    X[:, 0] += c
    a = anisotropy(X)
    assert 1 - 1e-4 < a <= 1
    assert (1 - a) == pytest.approx((d - 1) / c**2, rel=0.1)


def test_anisotropy_closed_form_equals_brute_force_pairwise_mean():
    g = _gen(2)
    X = torch.randn(50, 7, generator=g, dtype=F64) + torch.randn(7, generator=g, dtype=F64)
    U = X / X.norm(dim=1, keepdim=True)
    C = U @ U.T
    brute = float((C.sum() - C.diagonal().sum()) / (50 * 49))
    assert anisotropy(X) == pytest.approx(brute, abs=1e-14)
    # cosines ignore each row's positive scale; float32 input is computed in float64
    s = torch.rand(50, 1, generator=g, dtype=F64) + 0.1
    assert anisotropy(X * s) == pytest.approx(brute, abs=1e-14)
    assert anisotropy(X.float()) == pytest.approx(brute, abs=1e-6)
    # the minimum −1/(N−1): two antipodal vectors
    assert anisotropy(torch.tensor([[1.0, 2.0], [-1.0, -2.0]])) == pytest.approx(-1.0, abs=1e-15)


def test_anisotropy_bad_inputs():
    with pytest.raises(ValueError, match="zero"):
        anisotropy(torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="at least 2"):
        anisotropy(torch.ones(1, 3))
    with pytest.raises(ValueError, match=r"\[N, d\]"):
        anisotropy(torch.ones(5))
    with pytest.raises(ValueError, match="NaN"):
        anisotropy(torch.tensor([[1.0, float("nan")], [1.0, 2.0]]))
    with pytest.raises(TypeError):
        anisotropy("not points")


# ----------------------------------------------------------------------------------------------- whitening
def _anisotropic_cloud(N: int, d: int, seed: int) -> torch.Tensor:
    g = _gen(seed)
    Z = torch.randn(N, d, generator=g, dtype=F64) * torch.logspace(0, 2, d, dtype=F64)
    return Z @ _rotation(d, g) + 100.0 * torch.randn(d, generator=g, dtype=F64)


def test_whitening_gives_identity_covariance_and_no_anisotropy_on_the_fit_set():
    N, d = 600, 12
    X = _anisotropic_cloud(N, d, 3)
    assert anisotropy(X) > 0.5
    w = Whitening.fit(X)
    Z = w.transform(X)
    assert Z.dtype == F64 and Z.shape == (N, d) and w.rank == d
    cov = (Z - Z.mean(0)).T @ (Z - Z.mean(0)) / N
    torch.testing.assert_close(cov, torch.eye(d, dtype=F64), atol=1e-8, rtol=0)
    torch.testing.assert_close(Z.mean(0), torch.zeros(d, dtype=F64), atol=1e-8, rtol=0)
    # whitened points are (sample-)isotropic: anisotropy within the isotropic-Gaussian bound of the first test
    assert abs(anisotropy(Z)) < 5 / math.sqrt(d * N * (N - 1) / 2)
    torch.testing.assert_close(whiten(X), Z, atol=1e-12, rtol=0)


def test_whitening_k_keeps_the_top_variance_components():
    X = _anisotropic_cloud(400, 10, 4)
    w = Whitening.fit(X, k=3)
    lam = torch.linalg.eigvalsh(torch.cov(X.T, correction=0)).flip(0)
    torch.testing.assert_close(w.eigenvalues, lam[:3], rtol=1e-10, atol=0)
    Z = w.transform(X)
    assert Z.shape == (400, 3)
    torch.testing.assert_close(torch.cov(Z.T, correction=0), torch.eye(3, dtype=F64), atol=1e-8, rtol=0)
    # the kept directions are the top principal subspace: projecting X on W's span loses only the rest
    P = torch.linalg.qr(w.W)[0]
    Xc = X - X.mean(0)
    kept = float(((Xc @ P) ** 2).sum() / 400)
    assert kept == pytest.approx(float(lam[:3].sum()), rel=1e-10)


def test_whitening_with_fewer_points_than_dimensions_keeps_the_rank():
    X = torch.randn(5, 10, generator=_gen(5), dtype=F64)
    w = Whitening.fit(X)
    assert w.rank == 4  # 5 centred points span 4 directions
    Z = w.transform(X)
    torch.testing.assert_close(torch.cov(Z.T, correction=0), torch.eye(4, dtype=F64), atol=1e-8, rtol=0)
    with pytest.raises(ValueError, match="non-degenerate"):
        Whitening.fit(X, k=5)
    with pytest.raises(ValueError, match="fitted on 10-dim"):
        w.transform(torch.ones(3, 9))
    with pytest.raises(ValueError, match="zero variance"):
        Whitening.fit(torch.ones(4, 3))
    with pytest.raises(ValueError, match=">= 1"):
        Whitening.fit(X, k=0)


# ----------------------------------------------------------------------------------------------- ranks
def _exact_spectrum(N: int, s: list[float], D: int, seed: int) -> torch.Tensor:
    """Points in R^D whose centred matrix has singular values exactly ``s`` (orthonormal centred columns)."""
    g = _gen(seed)
    A = torch.randn(N, len(s), generator=g, dtype=F64)
    Qa = torch.linalg.qr(A - A.mean(0))[0]  # columns orthonormal and ⊥ 1 (they span centred columns)
    V = _rotation(D, g)[: len(s)]
    return Qa @ torch.diag(torch.tensor(s, dtype=F64)) @ V + torch.randn(D, generator=g, dtype=F64)


def test_effective_rank_of_data_in_a_random_k_dim_subspace_is_k():
    g = _gen(6)
    for k in (1, 3, 7):
        X = torch.randn(500, k, generator=g, dtype=F64) @ _rotation(20, g)[:k] + 5.0
        assert effective_rank(X, var=0.999) == k
        assert effective_rank(X, var=1.0) == k


def test_effective_rank_thresholds_and_entropy_rank_on_a_known_spectrum():
    s = [4.0, 3.0, 2.0, 1.0]  # variances ∝ 16, 9, 4, 1: cumulative 16/30, 25/30, 29/30, 1
    X = _exact_spectrum(200, s, 9, 7)
    for var, want in [(0.5, 1), (0.53, 1), (0.54, 2), (0.8, 2), (0.9, 3), (29 / 30, 3), (0.97, 4), (1.0, 4)]:
        assert effective_rank(X, var) == want, var
    p = np.array(s) / sum(s)
    assert entropy_effective_rank(X) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-10)
    for k in (1, 2, 5):  # k equal singular values: exp(log k) = k
        assert entropy_effective_rank(_exact_spectrum(100, [3.0] * k, 12, k)) == pytest.approx(k, rel=1e-10)
    # streamed Moments give the same numbers
    m = Moments().update(X[:70]).update(X[70:])
    assert effective_rank(m, 0.9) == 3
    assert entropy_effective_rank(m) == pytest.approx(entropy_effective_rank(X), rel=1e-9)


def test_rank_bad_inputs():
    X = torch.randn(10, 3, generator=_gen(8))
    for bad in (0, 0.0, 1.5, -0.1, True):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            effective_rank(X, bad)
    with pytest.raises(ValueError, match="zero variance"):
        entropy_effective_rank(torch.ones(5, 3))
    with pytest.raises(ValueError, match="at least 2"):
        effective_rank(torch.ones(1, 3))
    with pytest.raises(ValueError, match="at least 2"):
        entropy_effective_rank(Moments().update(torch.ones(1, 3)))


# ----------------------------------------------------------------------------------------------- TwoNN
def _square_in_r10(N: int, seed: int) -> torch.Tensor:
    g = _gen(seed)
    return torch.rand(N, 2, generator=g, dtype=F64) @ _rotation(10, g)[:2]


def _three_sphere_in_r10(N: int, seed: int) -> torch.Tensor:
    g = _gen(seed)
    z = torch.randn(N, 4, generator=g, dtype=F64)
    return (z / z.norm(dim=1, keepdim=True)) @ _rotation(10, g)[:4]


@pytest.mark.parametrize("method", ["fit", "mle"])
def test_twonn_recovers_the_dimension_of_known_manifolds(method):
    # the MLE's std is ~d/√N (log μ ~ Exp(d)): 0.045 at d=2, 0.07 at d=3 for N=2000; the fit's is ~1.5x that.
    # Tolerances ±0.25 / ±0.3 are >3 of those, plus the square's small boundary bias.
    assert twonn(_square_in_r10(2000, 0), method=method).dim == pytest.approx(2.0, abs=0.25)
    assert twonn(_three_sphere_in_r10(2000, 1), method=method).dim == pytest.approx(3.0, abs=0.3)


def test_twonn_is_invariant_to_rotation_translation_and_scale():
    g = _gen(9)
    X = _three_sphere_in_r10(500, 2)
    Y = 7.5 * X @ _rotation(10, g) + 3.0
    for method in ("fit", "mle"):
        assert twonn(Y, method=method).dim == pytest.approx(twonn(X, method=method).dim, rel=1e-9)


def _brute_mu(X: np.ndarray) -> np.ndarray:
    D = np.sqrt(((X[:, None, :] - X[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(D, np.inf)
    r = np.sort(D, axis=1)
    return r[:, 1] / r[:, 0]


def test_twonn_equals_the_papers_formulas_computed_independently():
    X = torch.randn(40, 3, generator=_gen(10), dtype=F64)
    mu = _brute_mu(X.numpy())
    N = len(mu)
    assert twonn(X, method="mle").dim == pytest.approx(N / np.log(mu).sum(), rel=1e-12)
    # Facco et al.: line through the origin of −log(1 − i/N) on log μ_(i), the largest 10% discarded
    x = np.log(np.sort(mu))[: int(N * 0.9)]
    y = -np.log(1 - np.arange(1, len(x) + 1) / N)
    slope = np.linalg.lstsq(x[:, None], y, rcond=None)[0][0]
    r = twonn(X, discard=0.1)
    assert r.dim == pytest.approx(slope, rel=1e-12) and r.n_fit == 36 and float(r) == r.dim
    # discard=0 still leaves out i = N, where −log(1 − F) is infinite
    assert twonn(X, discard=0.0).n_fit == N - 1


def test_twonn_collapses_duplicates_and_chunked_search_equals_one_block(monkeypatch):
    X = _square_in_r10(300, 3)
    Xd = torch.cat([X, X[:40], X[:5]])
    r, rd = twonn(X), twonn(Xd)
    assert rd.n_duplicates == 45 and rd.n_distinct == 300 and rd.n_points == 345
    assert rd.dim == pytest.approx(r.dim, rel=1e-12)
    Y = torch.randn(300, 10, generator=_gen(11), dtype=F64)
    one = (twonn(X).dim, knn_overlap(X, Y, 7))
    monkeypatch.setattr(geo, "_BLOCK_ELEMS", 7 * 300 + 13)  # blocks of 7 rows, a ragged last one
    assert (twonn(X).dim, knn_overlap(X, Y, 7)) == pytest.approx(one, rel=1e-12)


def test_twonn_bad_inputs_say_what_to_do():
    with pytest.raises(ValueError, match="at least 3 distinct"):
        twonn(torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="discard"):
        twonn(torch.randn(20, 2), discard=1.0)
    with pytest.raises(ValueError, match="method"):
        twonn(torch.randn(20, 2), method="lsq")
    with pytest.raises(ValueError, match="ratios left"):
        twonn(torch.randn(4, 2, generator=_gen(0)), discard=0.6)
    square = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])  # r2 = r1 = 1 at every vertex
    for method in ("fit", "mle"):
        with pytest.raises(ValueError, match="equidistant"):
            twonn(square, method=method, discard=0.0)
    with pytest.warns(UserWarning, match="fewer points than dimensions"):
        twonn(torch.randn(8, 20, generator=_gen(1)))


# ----------------------------------------------------------------------------------------------- k-NN overlap
def test_knn_overlap_axioms():
    g = _gen(12)
    X = torch.randn(400, 6, generator=g, dtype=F64)
    assert knn_overlap(X, X, 10) == 1.0
    assert knn_overlap(X, 0.3 * X @ _rotation(6, g) - 2.0, 10) == 1.0
    assert knn_overlap(X.float(), X, 5) == 1.0


def test_knn_overlap_of_unrelated_clouds_is_k_over_n_minus_1():
    # |kNN_X(i) ∩ kNN_Y(i)| is hypergeometric with mean k²/(N−1) and std ≈ √(k·p) (p = k/(N−1)); per point /k
    # that is 0.045, over N = 500 points ~0.002 (x√2 for mutual-neighbour correlation): 0.01 is > 3.5 of those.
    N, k = 500, 10
    g = _gen(13)
    v = knn_overlap(torch.randn(N, 8, generator=g), torch.randn(N, 8, generator=g), k)
    assert v == pytest.approx(k / (N - 1), abs=0.01)


def test_knn_overlap_equals_brute_force_sets():
    g = _gen(14)
    X = torch.randn(60, 4, generator=g, dtype=F64)
    Y = X + 0.5 * torch.randn(60, 4, generator=g, dtype=F64)  # partly related: overlap strictly between 0 and 1

    def nn(A: np.ndarray, k: int) -> list[set[int]]:
        D = ((A[:, None] - A[None]) ** 2).sum(-1)
        np.fill_diagonal(D, np.inf)
        return [set(row[:k].tolist()) for row in np.argsort(D, axis=1)]

    for k in (1, 5, 20):
        a, b = nn(X.numpy(), k), nn(Y.numpy(), k)
        want = sum(len(s & t) for s, t in zip(a, b, strict=True)) / (60 * k)
        assert 0 < want < 1 and knn_overlap(X, Y, k) == pytest.approx(want, abs=1e-15)


def test_knn_overlap_bad_inputs():
    X = torch.randn(10, 3)
    with pytest.raises(ValueError, match="smaller k"):
        knn_overlap(X, X, 10)
    with pytest.raises(ValueError, match="same points"):
        knn_overlap(X, X[:9], 3)
    with pytest.raises(ValueError, match=">= 1"):
        knn_overlap(X, X, 0)
    with pytest.raises(TypeError, match="int"):
        knn_overlap(X, X, 2.5)


# ----------------------------------------------------------------------------------------------- corpus
def test_shuffle_tokens_permutes_within_texts_and_keeps_special_tokens(shared_tiny):
    for arch in ("llama", "bert"):
        ad = shared_tiny(arch)
        a, b = shuffle_tokens(ad, TEXTS, seed=3), shuffle_tokens(ad, TEXTS, seed=3)
        assert a == b and a != shuffle_tokens(ad, TEXTS, seed=4)
        special = set(ad.tokenizer.all_special_ids)
        for text, s in zip(TEXTS, a, strict=True):
            ids = ad.encode(text).input_ids.tolist()
            assert sorted(s) == sorted(ids)
            assert [t for t, i in zip(s, ids, strict=True) if i in special] == [i for i in ids if i in special]
            assert all((t in special) == (i in special) for t, i in zip(s, ids, strict=True))
        assert sum(s != ad.encode(t).input_ids.tolist() for t, s in zip(TEXTS, a, strict=True)) >= len(TEXTS) - 1
    assert len(shuffle_tokens(ad, TEXTS[:1], max_length=4)[0]) == 4


def _in_memory(ad, data, bs: int, depths: list[int], skip_first: bool) -> dict[int, torch.Tensor]:
    """All hidden states of the corpus (stream order), first token of each row dropped by hand."""
    H: dict[int, list[torch.Tensor]] = {d: [] for d in depths}
    for hb in stream_hidden(ad, data, depths, batch_size=bs, progress=False):
        keep = hb.mask.clone()
        if skip_first:
            keep[torch.arange(keep.shape[0]), hb.mask.float().argmax(1)] = False
        for d in depths:
            H[d].append(hb.hidden[d][keep])
    return {d: torch.cat(v).double() for d, v in H.items()}


def _check_against_memory(ad, frame, texts, bs, k=5, seed=0, skip_first=True, var=0.9):
    depths = sorted(set(frame.layer))
    for cond, data in [("text", texts), ("shuffled", shuffle_tokens(ad, texts, seed))]:
        H = _in_memory(ad, data, bs, depths, skip_first)
        rows = frame[frame.condition == cond].set_index("layer")
        for j, d in enumerate(depths):
            X, r = H[d], rows.loc[d]
            assert r.n_tokens == r.n_sample == X.shape[0]
            assert r.anisotropy == pytest.approx(anisotropy(X), abs=1e-12)
            assert r.mean_norm == pytest.approx(float(X.norm(dim=1).mean()), rel=1e-12)
            assert r.effective_rank == effective_rank(X, var)
            assert r.entropy_effective_rank == pytest.approx(entropy_effective_rank(X), rel=1e-9)
            assert r.intrinsic_dim == pytest.approx(twonn(X).dim, rel=1e-9)
            w = Whitening.fit(X[0::2])
            assert r.anisotropy_whitened == pytest.approx(anisotropy(w.transform(X[1::2])), abs=1e-9)
            if j + 1 < len(depths):
                assert r.knn_overlap_next == pytest.approx(knn_overlap(X, H[depths[j + 1]], k), abs=1e-12)
            else:
                assert math.isnan(r.knn_overlap_next)


_ALONE: dict[str, object] = {}


@settings(max_examples=4, deadline=None)
@given(bs=st.integers(2, 9))
def test_streamed_token_geometry_equals_in_memory_statistics(shared_tiny, bs):
    ad = shared_tiny("llama")
    f = token_geometry(ad, TEXTS, k=5, max_points=10_000, batch_size=bs, progress=False)
    _check_against_memory(ad, f, TEXTS, bs)
    # across batch sizes only fp32 rounding of the forward differs (hidden states agree to ~1e-7 relative):
    # cosines move by at most 2× the relative error of the vectors, ~4·ε·√d·L·(max|h| / min‖h‖) ≈ 1e-4 here.
    if "g" not in _ALONE:  # every row alone (batch_size=1), computed once
        _ALONE["g"] = token_geometry(ad, TEXTS, k=5, max_points=10_000, batch_size=1, progress=False)
    g = _ALONE["g"]
    assert f.anisotropy.to_numpy() == pytest.approx(g.anisotropy.to_numpy(), abs=1e-4)
    assert f.mean_norm.to_numpy() == pytest.approx(g.mean_norm.to_numpy(), rel=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_token_geometry_runs_and_matches_in_memory_on_every_arch(arch, shared_tiny):
    ad = shared_tiny(arch)
    f = token_geometry(ad, TEXTS, k=5, max_points=10_000, batch_size=3, progress=False)
    L = ad.structure.num_layers
    assert f.kind == "geometry" and len(f) == 2 * (L + 1)
    assert list(f.columns) == ["layer", "condition", "n_tokens", "n_sample", "n_distinct", *METRICS[:5],
                               "intrinsic_dim", "knn_overlap_next"]
    assert f.meta["skip_first"] and f.meta["model"] == ad.name
    n = sum(len(ad.encode(t).input_ids) - 1 for t in TEXTS)
    assert (f.n_tokens == n).all()
    _check_against_memory(ad, f, TEXTS, 3)
    last = f.layer == L
    assert f[last].knn_overlap_next.isna().all()
    assert f[~last].knn_overlap_next.between(0, 1).all()
    assert f.intrinsic_dim.gt(0).all() and f.entropy_effective_rank.between(1, 64).all()


@pytest.mark.filterwarnings("ignore:fewer points than dimensions")
def test_sampled_token_geometry_uses_the_same_tokens_at_every_layer(shared_tiny):
    ad = shared_tiny("llama")
    f = token_geometry(ad, TEXTS, layers=[1, 2], k=3, max_points=40, shuffled=False, progress=False)
    assert (f.n_sample == 40).all() and (f.n_tokens > 40).all() and set(f.condition) == {"text"}
    f2 = token_geometry(ad, TEXTS, layers=[1, 2], k=3, max_points=40, shuffled=False, progress=False)
    assert f.equals(f2)  # seeded
    # exact statistics do not depend on the sample; point statistics do, through the seed
    f3 = token_geometry(ad, TEXTS, layers=[1, 2], k=3, max_points=40, shuffled=False, seed=1, progress=False)
    assert f3.anisotropy.tolist() == f.anisotropy.tolist()
    assert f3.intrinsic_dim.tolist() != f.intrinsic_dim.tolist()


def test_skip_first_false_includes_every_token(shared_tiny):
    ad = shared_tiny("bert")
    f = token_geometry(ad, TEXTS, layers=[0, 2], k=5, max_points=10_000, skip_first=False, shuffled=False,
                       progress=False)
    assert (f.n_tokens == sum(len(ad.encode(t).input_ids) for t in TEXTS)).all()
    H = _in_memory(ad, TEXTS, 8, [0, 2], skip_first=False)
    assert f.anisotropy.tolist() == pytest.approx([anisotropy(H[0]), anisotropy(H[2])], abs=1e-12)


def test_token_geometry_bad_inputs_say_what_to_do(shared_tiny):
    ad = shared_tiny("llama")
    with pytest.raises(ValueError, match="depths"):
        token_geometry(ad, TEXTS, layers=[5], progress=False)
    with pytest.raises(ValueError, match=">= 1"):
        token_geometry(ad, TEXTS, k=0, progress=False)
    with pytest.raises(ValueError, match="must exceed k"):
        token_geometry(ad, TEXTS, k=10, max_points=10, progress=False)
    with pytest.raises(ValueError, match="var"):
        token_geometry(ad, TEXTS, var=0, progress=False)
    with pytest.raises(ValueError, match="id_method"):
        token_geometry(ad, TEXTS, id_method="lsq", progress=False)
    with pytest.raises(ValueError, match="skip_first"):
        token_geometry(ad, ["Hi", "Yo"], progress=False)
    with pytest.raises(ValueError, match="empty"):
        token_geometry(ad, [], progress=False)
    with pytest.raises(ValueError, match="encoder-decoder"):
        token_geometry(shared_tiny("t5"), TEXTS, progress=False)
    with pytest.warns(UserWarning, match="fewer points than dimensions"):
        token_geometry(ad, TEXTS[:3], k=3, progress=False)


def test_geometry_plot_returns_one_axes_per_metric(shared_tiny):
    plt = pytest.importorskip("matplotlib.pyplot")
    f = token_geometry(shared_tiny("llama"), TEXTS, k=5, progress=False)
    axes = f.plot()
    assert len(axes) == len(METRICS) and all(hasattr(a, "plot") for a in axes)
    assert [a.get_title() for a in axes] == list(METRICS)
    assert len(axes[1].get_lines()) == 2  # text and shuffled
    _, ax = plt.subplots()
    assert f.plot(metrics="anisotropy", ax=ax)[0] is ax
    with pytest.raises(ValueError, match="choose from"):
        f.plot(metrics=["nope"])
    plt.close("all")
