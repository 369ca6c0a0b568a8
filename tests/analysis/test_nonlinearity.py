"""tokensmith.analysis.nonlinearity: LLM-Microscope token nonlinearity, linearity scores, contextualisation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import tokensmith as ts
from tests.hidden_states import depth_states
from tests.tolerance import fp32_atol
from tokensmith.analysis.nonlinearity import (
    by_class,
    contextualization,
    linear_map_residuals,
    linearity_scores,
    token_nonlinearity,
)
from tokensmith.analysis.token_classes import token_classes
from tokensmith.models.tiny import TINY_ARCHS

pytestmark = pytest.mark.usefixtures("torch_one_thread")

TEXTS = [
    "The cat sat on the mat, and then it slept for a while.",
    "In 1999, prices rose by 4 percent; the bank did not react.",
    "She said: 'no, not again!' and left the room quietly.",
    "Rivers flow to the sea, carrying sand, stones and leaves.",
    "A quick brown fox jumps over the lazy dog near 3 trees.",
    "Why would anyone write code like this? Nobody knows.",
    "Ten thousand birds flew north when the winter ended early.",
]
CAUSAL = [a for a in TINY_ARCHS if a not in ("bert", "t5")]
APPLICABLE = [a for a in TINY_ARCHS if a != "t5"]  # t5: encoder-decoder, the hidden-state stream covers one stack


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _close(a: torch.Tensor, b: torch.Tensor, atol: float) -> None:
    # (torch.testing.assert_close costs ~2 s of imports on its first call)
    assert a.shape == b.shape, (a.shape, b.shape)
    err = float((a.double() - b.double()).abs().max())
    assert err <= atol, f"max abs difference {err:.3g} > {atol:.3g}"




def _reference_nonlinearity(ad: ts.ModelAdapter, texts: list[str], ridge: float, skip_first: bool = True):
    """All hidden states in memory, one text at a time, then the pure float64 function per pair."""
    per_depth: list[list[torch.Tensor]] = [[] for _ in range(ad.structure.num_layers + 1)]
    ids_all = []
    for t in texts:
        ids = ad.encode(t).input_ids.tolist()
        st = depth_states(ad, ids)
        s = 1 if skip_first else 0
        for d, h in enumerate(st):
            per_depth[d].append(h[s:])
        ids_all += ids[s:]
    H = [torch.cat(x) for x in per_depth]
    return {k: linear_map_residuals(H[k], H[k + 1], ridge) for k in range(len(H) - 1)}, ids_all


# ----------------------------------------------------------------------------------------------- pure function
def test_linear_map_exact_map_gives_zero_residual():
    X = torch.randn(200, 8, dtype=torch.float64, generator=_g(0))
    A = torch.randn(8, 5, dtype=torch.float64, generator=_g(1))
    Y = X @ A + torch.randn(5, dtype=torch.float64, generator=_g(2))
    A_hat, r, score = linear_map_residuals(X, Y)
    assert A_hat.shape == (8, 5) and r.shape == (200,)
    assert float(r.max()) <= 1e-10
    assert abs(score - 1.0) <= 1e-12


def test_linear_map_nonlinear_target_matches_lstsq_and_is_positive():
    X = torch.randn(300, 6, dtype=torch.float64, generator=_g(3))
    W = torch.randn(6, 6, dtype=torch.float64, generator=_g(4))
    Y = torch.tanh(2 * X @ W)
    A, r, score = linear_map_residuals(X, Y)
    # independent float64 reference: lstsq on the centred, Frobenius-normalised matrices
    Xn = (X - X.mean(0)) / (X - X.mean(0)).norm()
    Yn = (Y - Y.mean(0)) / (Y - Y.mean(0)).norm()
    A_ref = torch.linalg.lstsq(Xn, Yn).solution
    R = Xn @ A_ref - Yn
    _close(A, A_ref, 1e-10)
    _close(r, R.norm(dim=1) * math.sqrt(300), 1e-10)
    assert abs(score - (1 - float((R**2).sum()))) < 1e-12
    assert float(r.mean()) > 0.1 and score < 0.99
    assert abs(float((r**2).mean()) - (1 - score)) < 1e-12  # the documented scaling: mean E^2 = 1 - linearity


def test_linear_map_invariant_to_scale_and_shift():
    X = torch.randn(120, 5, dtype=torch.float64, generator=_g(5))
    Y = torch.sin(X @ torch.randn(5, 4, dtype=torch.float64, generator=_g(6)))
    A, r, s = linear_map_residuals(X, Y)
    A2, r2, s2 = linear_map_residuals(7.5 * X - 3.0, 0.02 * Y + 11.0)
    _close(r2, r, 1e-10)
    _close(A2, A, 1e-10)
    assert abs(s2 - s) < 1e-12


def test_linear_map_ridge_for_singular_system():
    X = torch.randn(10, 30, dtype=torch.float64, generator=_g(7))  # N - 1 < d: singular Gram matrix
    Y = torch.randn(10, 3, dtype=torch.float64, generator=_g(8))
    _, r0, s0 = linear_map_residuals(X, Y)  # minimum-norm least squares: exact fit
    assert float(r0.max()) < 1e-9 and abs(s0 - 1) < 1e-12
    _, r1, s1 = linear_map_residuals(X, Y, ridge=1.0)
    assert float(r1.min()) > 1e-3 and s1 < s0  # a ridge shrinks the map


def test_linear_map_bad_inputs():
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match="same rows"):
        linear_map_residuals(x, torch.randn(9, 3))
    with pytest.raises(ValueError, match="2-D"):
        linear_map_residuals(x[0], x[0])
    with pytest.raises(ValueError, match="at least 2"):
        linear_map_residuals(x[:1], x[:1])
    with pytest.raises(ValueError, match="constant"):
        linear_map_residuals(torch.ones(10, 3), x)
    with pytest.raises(ValueError, match="ridge"):
        linear_map_residuals(x, x, ridge=-1.0)
    with pytest.raises(ValueError, match="finite"):
        linear_map_residuals(x, torch.full((10, 3), float("nan")))


# ----------------------------------------------------------------------------------------------- models
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_identity_blocks_are_perfectly_linear(arch, shared_tiny):
    ad = ts.tiny(arch)  # own copy: its weights are edited
    s = ad.structure
    with torch.no_grad():
        for m in list(s.o_proj) + list(s.mlp_out):  # attention output and MLP down projections
            m.weight.zero_()
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
    f = token_nonlinearity(ad, TEXTS, ridge=0.0, progress=False)
    assert float(f.nonlinearity.abs().max()) < 1e-9  # h_{l+1} == h_l exactly: the float64 solve is exact
    assert all(abs(v - 1) < 1e-12 for v in f.meta["linearity"].values())
    # with the default ridge λ: the residual in each eigen-direction σ is σλ²/(σ+λ)² <= λ/4, summed over d
    # directions of a unit-trace Gram matrix with λ_abs = ridge/d: 1 - linearity <= ridge/4
    f2 = token_nonlinearity(ad, TEXTS, progress=False)
    assert all(0 <= 1 - v <= 1e-6 / 4 * 1.0001 for v in f2.meta["linearity"].values())
    # the unedited model is not linear: the check above can fail
    g = token_nonlinearity(shared_tiny(arch), TEXTS, progress=False)
    assert max(1 - v for v in g.meta["linearity"].values()) > 1e-3
    assert float(g.nonlinearity.mean()) > 1e-2


def test_blocks_that_are_random_linear_maps_give_zero_residual():
    # each block's output replaced by h_in @ W_l (W_l random, full rank): consecutive depths are exact linear maps
    ad = ts.tiny("llama", seed=2)
    d = ad.structure.hidden_size
    maps = [torch.randn(d, d, generator=_g(10 + i)) / math.sqrt(d) for i in range(ad.structure.num_layers)]

    def make(W):
        def hook(_mod, args, kwargs, out):
            h = args[0] if args else kwargs["hidden_states"]
            new = h @ W
            return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new

        return hook

    handles = [layer.register_forward_hook(make(W), with_kwargs=True)
               for layer, W in zip(ad.structure.layers, maps, strict=True)]
    try:
        f = token_nonlinearity(ad, TEXTS, ridge=0.0, progress=False)
    finally:
        for h in handles:
            h.remove()
    assert len(f.meta["linearity"]) == ad.structure.num_layers
    # fp32 states: the map holds to rounding (~1e-7 relative per entry), and E_i is relative (unit Frobenius)
    assert float(f.nonlinearity.abs().max()) < 1e-4
    assert all(abs(v - 1) < 1e-8 for v in f.meta["linearity"].values())


@pytest.mark.parametrize("batch_size", [1, 3])
def test_streamed_equals_in_memory(batch_size, shared_tiny):
    ad = shared_tiny("llama")
    ref, ids = _reference_nonlinearity(ad, TEXTS, ridge=1e-6)
    f = token_nonlinearity(ad, TEXTS, ridge=1e-6, batch_size=batch_size, progress=False)
    assert f.token_id.tolist() == ids * len(ref)
    d = ad.structure.hidden_size
    for k, (_, r, score) in ref.items():
        got = torch.tensor(f[f.layer == k].nonlinearity.to_numpy())
        # fp32 hidden states of padded vs unpadded batches differ by rounding (all L layers); the residuals
        # (O(0.1)) carry that through a well-conditioned normal-equation solve (measured: ~1e-7 at d = 64)
        tol = fp32_atol(1.0, d, depth=ad.structure.num_layers)
        _close(got, r, tol)
        assert abs(f.meta["linearity"][k] - score) < tol
        # pass 1 (closed form from moments) and pass 2 (direct residuals) agree in float64
        assert abs(float((got.double() ** 2).mean()) - (1 - f.meta["linearity"][k])) < 1e-10


def test_rows_and_token_classes(shared_tiny):
    ad = shared_tiny("gpt2")
    f = token_nonlinearity(ad, TEXTS, layers=[1, 2], skip_first=False, progress=False)
    assert list(f.columns) == ["text", "position", "token", "token_id", "token_class", "layer", "nonlinearity"]
    assert f.layer.unique().tolist() == [1]
    enc = [ad.encode(t).input_ids.tolist() for t in TEXTS]
    assert len(f) == sum(len(e) for e in enc) == f.meta["n_tokens"]
    assert [enc[t][p] for t, p in zip(f.text, f.position, strict=True)] == f.token_id.tolist()
    assert f.token_class.tolist() == token_classes(ad.tokenizer, f.token_id.tolist())
    assert f.token.tolist() == [ad.tokenizer.decode([i]) for i in f.token_id]
    g = token_nonlinearity(ad, TEXTS, layers=[1, 2], progress=False)  # skip_first: positions >= 1 only
    assert int(g.position.min()) == 1 and len(g) == len(f) - len(TEXTS)
    s = linearity_scores(g)
    assert s.layer.tolist() == [1] and s.next_layer.tolist() == [2]


@pytest.mark.parametrize("arch", APPLICABLE)
def test_every_arch_runs(arch, shared_tiny):
    ad = shared_tiny(arch)
    f = token_nonlinearity(ad, TEXTS, progress=False)
    L = ad.structure.num_layers
    assert sorted(f.layer.unique().tolist()) == list(range(L))
    assert len(f) == L * f.meta["n_tokens"] and np.isfinite(f.nonlinearity).all()
    for k, v in f.meta["linearity"].items():
        assert 0 <= v <= 1
        assert abs(float((f[f.layer == k].nonlinearity ** 2).mean()) - (1 - v)) < 1e-10
    c = contextualization(ad, TEXTS[:2], layers=[0, L], progress=False)
    assert sorted(c.layer.unique().tolist()) == [0, L] and np.isfinite(c.contextualization).all()
    assert float(c.contextualization.min()) >= -1e-6 and float(c.contextualization.max()) <= 2 + 1e-6


def test_encoder_decoder_refused(shared_tiny):
    with pytest.raises(ValueError, match="encoder-decoder"):
        token_nonlinearity(shared_tiny("t5"), TEXTS, progress=False)
    with pytest.raises(ValueError, match="encoder-decoder"):
        contextualization(shared_tiny("t5"), TEXTS, progress=False)


def test_bad_inputs(shared_tiny):
    ad = shared_tiny("llama")
    with pytest.raises(ValueError, match="adjacent"):
        token_nonlinearity(ad, TEXTS, layers=[1], progress=False)
    with pytest.raises(ValueError, match="adjacent"):
        token_nonlinearity(ad, TEXTS, layers=[0, 2], progress=False)
    with pytest.raises(ValueError, match="depths in"):
        token_nonlinearity(ad, TEXTS, layers=[2, 3], progress=False)
    with pytest.raises(ValueError, match="empty"):
        token_nonlinearity(ad, [], progress=False)
    with pytest.raises(ValueError, match="empty"):
        token_nonlinearity(ad, ["ok", "  "], progress=False)
    with pytest.raises(ValueError, match=r"at least 66 tokens"):
        token_nonlinearity(ad, TEXTS[:2], progress=False)
    with pytest.raises(ValueError, match="ridge"):
        token_nonlinearity(ad, TEXTS, ridge=-1e-3, progress=False)
    with pytest.raises(ValueError, match="no tokens"):
        contextualization(ad, ["a", "b"], progress=False)
    with pytest.raises(ValueError, match="depths in"):
        contextualization(ad, TEXTS, layers=[7], progress=False)
    with pytest.raises(ValueError, match="linearity_scores"):
        linearity_scores(by_class(token_nonlinearity(ad, TEXTS, progress=False)))


# ----------------------------------------------------------------------------------------------- by_class
def test_by_class_matches_numpy(shared_tiny):
    f = token_nonlinearity(shared_tiny("llama"), TEXTS, progress=False)
    g = by_class(f)
    assert g.kind == "nonlinearity_by_class" and list(g.columns) == ["layer", "token_class", "mean", "sem", "count"]
    for row in g.itertuples():
        v = f[(f.layer == row.layer) & (f.token_class == row.token_class)].nonlinearity.to_numpy()
        assert row.count == len(v) and abs(row.mean - v.mean()) < 1e-12
        if len(v) > 1:
            assert abs(row.sem - v.std(ddof=1) / math.sqrt(len(v))) < 1e-12
        else:
            assert math.isnan(row.sem)
    assert g["count"].sum() == len(f)


# ----------------------------------------------------------------------------------------------- contextualisation
def _reference_context(ad: ts.ModelAdapter, texts: list[str], skip_first: bool) -> list[np.ndarray]:
    """1 - cos per (token, depth), one text at a time, each token's alone forward run separately."""
    enc0 = ad.encode("a")
    sp = enc0.special_mask.tolist()
    ids0 = enc0.input_ids.tolist()
    pre = ids0[: sp.index(False)]
    suf = ids0[len(ids0) - sp[::-1].index(False) :]
    out: list[list[float]] = [[] for _ in range(ad.structure.num_layers + 1)]
    for t in texts:
        ids = ad.encode(t).input_ids.tolist()
        ctx = depth_states(ad, ids)
        for p in range(1 if skip_first else 0, len(ids)):
            v = ids[p]
            alone, at = (pre + suf, (pre + suf).index(v)) if v in pre + suf else (pre + [v] + suf, len(pre))
            st = depth_states(ad, alone)
            for d in range(len(ctx)):
                a, b = ctx[d][p].double(), st[d][at].double()
                out[d].append(1 - float(a @ b / (a.norm() * b.norm())))
    return [np.array(x) for x in out]


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_contextualization_matches_reference(arch, shared_tiny):
    ad = shared_tiny(arch)
    texts = TEXTS[:2]
    f = contextualization(ad, texts, skip_first=False, alone_batch_size=5, progress=False)
    ref = _reference_context(ad, texts, skip_first=False)
    d = ad.structure.hidden_size
    for depth, r in enumerate(ref):
        got = f[f.layer == depth].contextualization.to_numpy()
        # 1 - cos of fp32 states computed at other batch shapes: rounding of all layers
        np.testing.assert_allclose(got, r, rtol=0, atol=fp32_atol(1.0, d, depth=ad.structure.num_layers))
    if arch == "bert":  # [CLS] x [SEP] wrapping; the [CLS] and [SEP] rows are the wrapper alone
        assert f.meta["wrap"] == [[101], [102]]
        assert set(f[f.token_class == "special"].token_id) == {101, 102}
    assert f.meta["n_distinct"] == len(set(f.token_id))


def test_contextualization_axioms(shared_tiny):
    ad = shared_tiny("llama")
    f = contextualization(ad, TEXTS, skip_first=False, progress=False)
    d = ad.structure.hidden_size
    tol = fp32_atol(1.0, d, depth=ad.structure.num_layers)
    # depth 0 of a model without absolute positions is the token embedding: no context at all
    assert float(f[f.layer == 0].contextualization.abs().max()) <= tol
    # the first token of a causal LM without BOS sees nothing but itself: equal to alone at every depth
    assert float(f[f.position == 0].contextualization.abs().max()) <= tol
    # later tokens at the last depth do depend on their context (the checks above can fail)
    assert float(f[(f.layer == 2) & (f.position > 0)].contextualization.mean()) > 1e-3
    g = contextualization(ad, TEXTS, alone_batch_size=1, progress=False)  # batching of the alone forwards
    h = f[f.position > 0].reset_index(drop=True)
    np.testing.assert_allclose(g.contextualization.to_numpy(), h.contextualization.to_numpy(), rtol=0, atol=tol)
    # gpt2 has learned absolute positions: depth 0 is contextual (position) except at position 0
    c = contextualization(shared_tiny("gpt2"), TEXTS[:1], layers=[0], skip_first=False, progress=False)
    assert float(c[c.position == 0].contextualization.abs().max()) <= tol
    assert float(c[c.position > 0].contextualization.min()) > 1e-3


def test_plots(shared_tiny):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    ad = shared_tiny("llama")
    f = token_nonlinearity(ad, TEXTS, progress=False)
    for frame in (f, by_class(f), contextualization(ad, TEXTS[:2], progress=False)):
        ax = frame.plot()
        assert len(ax.get_lines()) == frame.token_class.nunique() if "token_class" in frame else True
        plt.close(ax.figure)
