"""tokensmith.analysis.probes: ridge next-token probes per layer and the equi-learning law fit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.hidden_states import depth_states
from tests.tolerance import fp32_atol
from tokensmith.analysis.probes import law_fit, prediction_residual_by_layer, ridge_prediction_residual
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
    "Old maps show roads that no longer exist, or never did.",
]
CAUSAL = [a for a in TINY_ARCHS if a not in ("bert", "t5")]


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _direct_pr(X, Y, ridge, Xt=None, Yt=None):
    """Independent float64 reference: ridge on [X, 1] with the intercept unpenalised, one ``linalg.solve``."""
    X, Y = X.double(), Y.double()
    n, d = X.shape
    Xc = X - X.mean(0)
    lam = ridge * float((Xc * Xc).sum()) / d
    Xa = torch.cat([X, torch.ones(n, 1, dtype=torch.float64)], 1)
    P = torch.diag(torch.cat([torch.full((d,), lam, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)]))
    B = torch.linalg.solve(Xa.T @ Xa + P, Xa.T @ Y)
    pr = float(((Y - Xa @ B) ** 2).sum() / ((Y - Y.mean(0)) ** 2).sum())
    if Xt is None:
        return pr, None
    Xt, Yt = Xt.double(), Yt.double()
    Xta = torch.cat([Xt, torch.ones(len(Xt), 1, dtype=torch.float64)], 1)
    return pr, float(((Yt - Xta @ B) ** 2).sum() / ((Yt - Yt.mean(0)) ** 2).sum())


def _onehot(labels: torch.Tensor, vocab: list[int]) -> torch.Tensor:
    col = {v: i for i, v in enumerate(vocab)}
    return torch.nn.functional.one_hot(torch.tensor([col[int(v)] for v in labels]), len(vocab)).double()


# ----------------------------------------------------------------------------------------------- pure function
@pytest.mark.parametrize("ridge", [0.0, 1e-3, 0.5])
def test_closed_form_equals_direct_solve(ridge):
    X = torch.randn(300, 12, dtype=torch.float64, generator=_g(0)) + 3.0
    y = torch.randint(0, 7, (300,), generator=_g(1))
    Xt = torch.randn(80, 12, dtype=torch.float64, generator=_g(2)) + 3.0
    yt = torch.randint(0, 8, (80,), generator=_g(3))  # label 7 never occurs in training
    vocab = sorted(set(y.tolist()) | set(yt.tolist()))
    pr, prt = ridge_prediction_residual(X, y, ridge=ridge, X_test=Xt, y_test=yt)
    ref, ref_t = _direct_pr(X, _onehot(y, vocab), ridge, Xt, _onehot(yt, vocab))
    assert abs(pr - ref) <= 1e-10 * ref and abs(prt - ref_t) <= 1e-10 * ref_t
    # dense targets give the same numbers
    pr2, prt2 = ridge_prediction_residual(X, _onehot(y, vocab), ridge=ridge, X_test=Xt, y_test=_onehot(yt, vocab))
    assert abs(pr2 - ref) <= 1e-10 * ref and abs(prt2 - ref_t) <= 1e-10 * ref_t


def test_onehot_in_features_gives_zero_residual():
    y = torch.randint(0, 6, (500,), generator=_g(4))
    noise = torch.randn(500, 4, dtype=torch.float64, generator=_g(5))
    X = torch.cat([torch.nn.functional.one_hot(y, 6).double(), noise], 1)
    pr, _ = ridge_prediction_residual(X, y, ridge=1e-10)
    assert pr < 1e-7
    pr_noise, _ = ridge_prediction_residual(noise, y, ridge=1e-10)  # the check can fail
    assert pr_noise > 0.9


def test_independent_features():
    n, d, k = 2000, 20, 10
    X = torch.randn(n, d, dtype=torch.float64, generator=_g(6))
    y = torch.randint(0, k, (n,), generator=_g(7))
    Xt = torch.randn(n, d, dtype=torch.float64, generator=_g(8))
    yt = torch.randint(0, k, (n,), generator=_g(9))
    pr, prt = ridge_prediction_residual(X, y, ridge=0.0, X_test=Xt, y_test=yt)
    # OLS with d regressors + intercept and X independent of y: E[RSS/TSS] = (n - 1 - d)/(n - 1) per target
    # column (Beta((n-1-d)/2, d/2), sd ~ 3e-3 per column, ~1e-3 over k columns); out of sample ~ 1 + d/n
    assert abs(pr - (1 - d / (n - 1))) < 5e-3
    assert prt > 1.0 - 5e-3 and prt > pr


def test_pure_bad_inputs():
    X = torch.randn(30, 4)
    y = torch.randint(0, 3, (30,), generator=_g(0))
    with pytest.raises(ValueError, match="rows"):
        ridge_prediction_residual(X, y[:20])
    with pytest.raises(ValueError, match="ridge"):
        ridge_prediction_residual(X, y, ridge=-1)
    with pytest.raises(ValueError, match="both"):
        ridge_prediction_residual(X, y, X_test=X)
    with pytest.raises(ValueError, match="ridge > 0"):
        ridge_prediction_residual(torch.randn(5, 8), y[:5], ridge=0.0)
    with pytest.raises(ValueError, match="same"):
        ridge_prediction_residual(X, torch.zeros(30, dtype=torch.long))
    with pytest.raises(ValueError, match="integer labels"):
        ridge_prediction_residual(X, y.float())
    with pytest.raises(ValueError, match="X_test"):
        ridge_prediction_residual(X, y, X_test=torch.randn(5, 3), y_test=y[:5])
    with pytest.raises(TypeError):
        ridge_prediction_residual(X.numpy(), y)


# ----------------------------------------------------------------------------------------------- streaming


@pytest.fixture(scope="module")
def llama_reference(shared_tiny):
    """In-memory hidden states of every text (one at a time) and the direct-solve PR per depth."""
    ad = shared_tiny("llama")
    base = prediction_residual_by_layer(ad, TEXTS, ridge=1e-3, holdout=0.25, seed=3, progress=False)
    held = set(base.meta["heldout_texts"])
    X = {s: [[] for _ in range(ad.structure.num_layers + 1)] for s in ("train", "held")}
    Y: dict[str, list[int]] = {"train": [], "held": []}
    for i, t in enumerate(TEXTS):
        ids = ad.encode(t).input_ids.tolist()
        s = "held" if i in held else "train"
        for d, h in enumerate(depth_states(ad, ids)):
            X[s][d].append(h[1:-1])  # skip_first=True: the first token is no input
        Y[s] += ids[2:]
    vocab = sorted(set(Y["train"]) | set(Y["held"]))
    ref = {}
    for d in range(ad.structure.num_layers + 1):
        ref[d] = _direct_pr(torch.cat(X["train"][d]), _onehot(torch.tensor(Y["train"]), vocab), 1e-3,
                            torch.cat(X["held"][d]), _onehot(torch.tensor(Y["held"]), vocab))
    return ad, base, ref, (len(Y["train"]), len(Y["held"]), len(vocab))


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch_size=st.integers(1, 8))
def test_streamed_equals_in_memory(llama_reference, batch_size):
    ad, base, ref, (n_train, n_held, k) = llama_reference
    rtol = fp32_atol(1.0, ad.structure.hidden_size, depth=ad.structure.num_layers)
    f = prediction_residual_by_layer(ad, TEXTS, ridge=1e-3, holdout=0.25, seed=3, batch_size=batch_size,
                                     progress=False)
    assert f.meta["heldout_texts"] == base.meta["heldout_texts"] and f.meta["vocab_seen"] == k
    assert f.n_train.tolist() == [n_train] * len(f) and f.n_heldout.tolist() == [n_held] * len(f)
    for row in f.itertuples():
        r_train, r_held = ref[row.layer]
        # fp32 hidden states from padded vs unpadded batches differ by rounding (relative ~ε·√d per layer); PR
        # is a smooth function of them through a ridge solve (λ = 1e-3·mean eigenvalue); measured ~1e-7
        assert abs(row.pr_train - r_train) <= rtol * r_train
        assert abs(row.pr_heldout - r_held) <= rtol * r_held
        assert abs(row.log_pr_train - math.log(row.pr_train)) < 1e-12


def test_law_fit_meta(llama_reference):
    _, f, _, _ = llama_reference
    x = f.layer.to_numpy(float)
    y = f.log_pr_train.to_numpy(float)
    slope = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    intercept = float(y.mean() - slope * x.mean())
    r2 = 1 - float(((y - slope * x - intercept) ** 2).sum() / ((y - y.mean()) ** 2).sum())
    law = f.meta["law"]
    assert abs(law["slope"] - slope) < 1e-10 and abs(law["intercept"] - intercept) < 1e-10
    assert abs(law["r2"] - r2) < 1e-10 and abs(law["decay_ratio"] - math.exp(slope)) < 1e-10
    assert law_fit(f, min_layer=1)["r2"] == 1.0  # two points: an exact line
    assert math.isnan(law_fit(f[f.layer == 0])["slope"])


@pytest.mark.parametrize("arch", CAUSAL)
def test_every_causal_arch_runs(arch, shared_tiny):
    f = prediction_residual_by_layer(shared_tiny(arch), TEXTS, progress=False)
    L = shared_tiny(arch).structure.num_layers
    assert f.layer.tolist() == list(range(L + 1))
    assert ((f.pr_train > 0) & (f.pr_train < 1)).all() and np.isfinite(f.pr_heldout).all()
    assert (f.pr_heldout > f.pr_train).all()  # the training fit is optimal on its own tokens
    assert np.isfinite(f.meta["law"]["slope"])


def test_no_holdout_and_ridge_zero(shared_tiny):
    ad = shared_tiny("gpt2")
    f = prediction_residual_by_layer(ad, TEXTS * 2, layers=[1], ridge=0.0, holdout=0.0, progress=False)
    assert f.n_heldout.tolist() == [0] and math.isnan(f.pr_heldout.iloc[0]) and f.pr_train.iloc[0] > 0
    assert f.meta["heldout_texts"] == []


def test_bad_inputs(shared_tiny):
    ad = shared_tiny("llama")
    with pytest.raises(ValueError, match="causal"):
        prediction_residual_by_layer(shared_tiny("bert"), TEXTS, progress=False)
    with pytest.raises(ValueError, match="encoder-decoder"):
        prediction_residual_by_layer(shared_tiny("t5"), TEXTS, progress=False)
    with pytest.raises(ValueError, match="depths in"):
        prediction_residual_by_layer(ad, TEXTS, layers=[9], progress=False)
    with pytest.raises(ValueError, match="empty"):
        prediction_residual_by_layer(ad, [], progress=False)
    with pytest.raises(ValueError, match="ridge"):
        prediction_residual_by_layer(ad, TEXTS, ridge=-0.1, progress=False)
    for h in (1.0, -0.1):
        with pytest.raises(ValueError, match="holdout"):
            prediction_residual_by_layer(ad, TEXTS, holdout=h, progress=False)
    with pytest.raises(ValueError, match="at least 2 texts"):
        prediction_residual_by_layer(ad, TEXTS[:1], progress=False)
    with pytest.raises(ValueError, match=r"more than d = 64 .*ridge > 0"):
        prediction_residual_by_layer(ad, TEXTS[:3], ridge=0.0, holdout=0.0, progress=False)
    with pytest.raises(ValueError, match="at least 2 training tokens"):
        prediction_residual_by_layer(ad, ["a", "b", "c"], holdout=0.0, progress=False)
    with pytest.raises(ValueError, match="same"):
        prediction_residual_by_layer(ad, [" a a a a a"] * 3, holdout=0.0, progress=False)


def test_plot(llama_reference):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    _, f, _, _ = llama_reference
    ax = f.plot()
    assert len(ax.get_lines()) == 4  # train/held-out points and their fitted lines
    plt.close(ax.figure)


def test_skip_first_counts(shared_tiny):
    ad = shared_tiny("llama")
    on = prediction_residual_by_layer(ad, TEXTS, layers=[1], holdout=0.0, progress=False)
    off = prediction_residual_by_layer(ad, TEXTS, layers=[1], holdout=0.0, skip_first=False, progress=False)
    n_pred = sum(len(ad.encode(t).input_ids) - 1 for t in TEXTS)
    assert off.n_train.tolist() == [n_pred] and on.n_train.tolist() == [n_pred - len(TEXTS)]
    assert on.meta["skip_first"] and not off.meta["skip_first"]
