"""tokensmith.optimization.training.losses: shift_labels, per-token CE (value and gradient against a float64
implementation written here), the reductions, masks never counting, HF parity, memory, bad input.

(Named test_weighted_losses.py: tests/alignment/test_losses.py already owns the module name test_losses.)
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.tolerance import fp32_atol
from tokensmith.optimization.training import (
    TokenLoss,
    compute_token_objective,
    reduce_token_loss,
    shift_labels,
    token_loss,
    weighted_token_loss,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")

F64 = torch.float64


# ------------------------------------------------------------------------------------------- float64 reference
def ce64(z: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token CE and dCE/dz in float64, one token at a time: lse = max + log Σ exp(z − max)."""
    B, T, V = z.shape
    ce = torch.zeros(B, T, dtype=F64)
    grad = torch.zeros(B, T, V, dtype=F64)
    for b in range(B):
        for t in range(T):
            if not m[b, t]:
                continue
            zz = z[b, t].double()
            mx = zz.max()
            lse = mx + torch.log(torch.exp(zz - mx).sum())
            ce[b, t] = lse - zz[y[b, t]]
            p = torch.exp(zz - lse)
            p[y[b, t]] -= 1.0
            grad[b, t] = p
    return ce, grad


def reduce64(ce, w, m, reduction, normalize):
    """The documented reductions, by hand in float64 (sum over rows and tokens with loops)."""
    B, T = ce.shape
    if reduction == "token":
        num = sum(float(w[b, t] * ce[b, t]) for b in range(B) for t in range(T) if m[b, t])
        den = sum(
            float(w[b, t] if normalize == "weights" else 1.0) for b in range(B) for t in range(T) if m[b, t]
        )
        return num / den
    per = []
    for b in range(B):
        num = sum(float(w[b, t] * ce[b, t]) for t in range(T) if m[b, t])
        den = sum(float(w[b, t] if normalize == "weights" else 1.0) for t in range(T) if m[b, t])
        if den > 0:
            per.append(num / den)
    return sum(per) / len(per)


def batch(B=3, T=6, V=11, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    z = scale * torch.randn(B, T, V, generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    m = torch.rand(B, T, generator=g) < 0.7
    m[0, 0] = True
    return z, y, m, g


# ------------------------------------------------------------------------------------------- shift_labels
def test_shift_labels_right_left_padding_target_mask_and_hf_labels():
    ids = torch.tensor([[5, 6, 7, 0, 0], [0, 0, 8, 9, 10]])
    am = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])
    labels, mask = shift_labels(ids, am)
    assert labels.tolist() == [[6, 7, -100, -100, -100], [-100, -100, 9, 10, -100]]
    assert mask.tolist() == [[True, True, False, False, False], [False, False, True, True, False]]
    # target mask in input coordinates: only the last two tokens of row 0 are targets
    tm = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 0, 0, 1]])
    labels, mask = shift_labels(ids, am, tm)
    assert mask.tolist() == [[True, True, False, False, False], [False, False, False, True, False]]
    # HF-style labels (-100 where ignored) given as input_ids
    hf = torch.tensor([[5, -100, 7, 8]])
    labels, mask = shift_labels(hf)
    assert labels.tolist() == [[-100, 7, 8, -100]] and mask.tolist() == [[False, True, True, False]]
    # too short to predict anything; bad inputs
    assert not shift_labels(torch.tensor([[3]]))[1].any()
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        shift_labels(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        shift_labels(ids, am[:, :3])
    with pytest.raises(TypeError):
        shift_labels(ids.float())


# ------------------------------------------------------------------------------------------- CE: value and grad
@pytest.mark.parametrize("chunk", [1, 4, 4096])
def test_token_loss_value_and_gradient_match_float64(chunk):
    z, y, m, g = batch()
    V = z.shape[-1]
    zr = z.clone().requires_grad_(True)
    ce = token_loss(zr, y, m, chunk=chunk)
    ref, dref = ce64(z, y, m)
    atol = fp32_atol(float(z.abs().max()), V)
    torch.testing.assert_close(ce.double(), ref, atol=atol, rtol=0)
    assert bool((ce[~m] == 0).all())
    c = torch.randn(ce.shape, generator=g)  # upstream gradient per token
    (ce * c).sum().backward()
    expect = dref * c.double()[..., None]
    torch.testing.assert_close(zr.grad.double(), expect, atol=fp32_atol(float(expect.abs().max()), V), rtol=0)
    assert bool((zr.grad[~m] == 0).all())


def test_token_loss_hand_case():
    # logits (0, log 3) over 2 tokens: p = (1/4, 3/4); CE of token 1 = log(4/3); of token 0 = log 4
    z = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]], requires_grad=True)
    ce = token_loss(z, torch.tensor([[1, 0]]), torch.tensor([[True, True]]))
    assert ce[0].tolist() == pytest.approx([math.log(4 / 3), math.log(4)], abs=1e-6)
    ce.sum().backward()
    # d CE / dz = p − onehot: row 0 (1/4, 3/4 − 1), row 1 (1/4 − 1, 3/4)
    assert z.grad[0].tolist() == [
        pytest.approx([0.25, -0.25], abs=1e-6),
        pytest.approx([-0.75, 0.75], abs=1e-6),
    ]


def test_no_grad_path_equals_grad_path_and_bf16_keeps_dtype():
    z, y, m, _ = batch(seed=1)
    with torch.no_grad():
        a = token_loss(z, y, m)
    b = token_loss(z.clone().requires_grad_(True), y, m)
    assert torch.equal(a, b.detach())
    zb = z.bfloat16().requires_grad_(True)
    ce = token_loss(zb, y, m)
    assert ce.dtype == torch.float32
    ce.sum().backward()
    assert zb.grad.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------- reductions
@pytest.mark.parametrize("reduction", ["token", "sequence"])
@pytest.mark.parametrize("normalize", ["mask", "weights"])
def test_weighted_reductions_match_hand_formulas_value_and_grad(reduction, normalize):
    z, y, m, g = batch(B=4, T=5, V=9, seed=2)
    m[3] = False  # a sequence with no counted token is left out of the sequence mean
    w = 2 * torch.rand(m.shape, generator=g)
    zr = z.clone().requires_grad_(True)
    loss = weighted_token_loss(zr, y, m, w, reduction=reduction, normalize=normalize)
    ce, dce = ce64(z, y, m)
    expect = reduce64(ce, w.double(), m, reduction, normalize)
    assert loss.item() == pytest.approx(expect, abs=fp32_atol(float(z.abs().max()), 9))
    loss.backward()
    # gradient by hand: coefficient of each token's CE in the reduced loss times dCE/dz
    coef = torch.zeros(m.shape, dtype=F64)
    if reduction == "token":
        den = float((w * m).sum()) if normalize == "weights" else float(m.sum())
        coef = torch.where(m, w.double() / den, 0.0)
    else:
        rows = [b for b in range(m.shape[0]) if m[b].any()]
        for b in rows:
            den = float((w[b] * m[b]).sum()) if normalize == "weights" else float(m[b].sum())
            coef[b] = torch.where(m[b], w[b].double() / den / len(rows), 0.0)
    expect_g = coef[..., None] * dce
    torch.testing.assert_close(zr.grad.double(), expect_g, atol=fp32_atol(1.0, 9), rtol=0)


def test_reduce_token_loss_hand_case_and_uniform_weights_equal_mean_ce():
    ce = torch.tensor([[1.0, 3.0, 7.0], [2.0, 0.0, 0.0]])
    m = torch.tensor([[True, True, False], [True, False, False]])
    assert reduce_token_loss(ce, m).item() == pytest.approx(2.0)  # (1 + 3 + 2) / 3
    assert reduce_token_loss(ce, m, reduction="sequence").item() == pytest.approx(2.0)  # (2 + 2) / 2
    w = torch.tensor([[3.0, 1.0, 100.0], [0.5, 9.0, 9.0]])
    assert reduce_token_loss(ce, m, w).item() == pytest.approx((3 + 3 + 1) / 3)
    assert reduce_token_loss(ce, m, w, normalize="weights").item() == pytest.approx((3 + 3 + 1) / 4.5)
    z, y, mm, _ = batch(seed=3)
    plain = torch.nn.functional.cross_entropy(z[mm], y[mm])
    assert weighted_token_loss(z, y, mm).item() == pytest.approx(plain.item(), abs=1e-5)
    assert weighted_token_loss(z, y, mm, torch.ones(mm.shape)).item() == pytest.approx(plain.item(), abs=1e-5)
    assert weighted_token_loss(z, y, mm, weighter="uniform").item() == pytest.approx(plain.item(), abs=1e-5)


# ------------------------------------------------------------------------------------------- masks never count
@pytest.mark.parametrize("weighter", [None, "tldr", "focal"])
@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_masked_positions_change_nothing_not_even_gradients(weighter, reduction):
    z, y, m, g = batch(seed=4)
    z2 = z.clone()
    z2[~m] = torch.randn(int((~m).sum()), z.shape[-1], generator=g) * 50
    z2.view(-1, z.shape[-1])[(~m).view(-1).nonzero()[0]] = float("nan")  # a NaN row at a masked position
    y2 = torch.where(m, y, torch.randint(-100, 10**6, y.shape, generator=g))  # garbage labels where masked
    out = []
    for zz, yy in ((z, y), (z2, y2)):
        zr = zz.clone().requires_grad_(True)
        loss = weighted_token_loss(zr, yy, m, weighter=weighter, reduction=reduction)
        loss.backward()
        out.append((loss.detach(), zr.grad))
    assert torch.equal(out[0][0], out[1][0])
    assert torch.equal(out[0][1][m], out[1][1][m])
    assert bool((out[1][1][~m] == 0).all()) and bool(torch.isfinite(out[1][1]).all())


def test_hf_loss_equals_uniform_weighted_loss_on_tiny_llama(llama):
    tok = llama.tokenizer
    enc = tok(["the cat sat on the mat today", "hello"], return_tensors="pt", padding=True)
    ids, am = enc["input_ids"], enc["attention_mask"]
    hf_labels = ids.masked_fill(am == 0, -100)
    with torch.no_grad():
        out = llama.model(input_ids=ids, attention_mask=am, labels=hf_labels)
    labels, mask = shift_labels(hf_labels, am)
    ours = weighted_token_loss(out.logits, labels, mask)
    V = out.logits.shape[-1]
    assert ours.item() == pytest.approx(out.loss.item(), abs=fp32_atol(float(out.logits.abs().max()), V))
    # a wrong alignment (unshifted labels) is far off: the comparison can fail
    wrong = weighted_token_loss(out.logits, torch.where(mask, ids, 0), mask)
    assert abs(wrong.item() - out.loss.item()) > 1e-2


# ------------------------------------------------------------------------------------------- memory
def test_graph_saves_no_copy_of_the_logits():
    """Every saved tensor the size of the logits IS the logits (same storage): no fp32 copy, also for bf16."""
    B, T, V = 2, 8, 64
    for dtype in (torch.float32, torch.bfloat16):
        z = torch.randn(B, T, V).to(dtype).requires_grad_(True)
        y, m = torch.randint(0, V, (B, T)), torch.ones(B, T, dtype=torch.bool)
        big: list[tuple[int, int]] = []

        def pack(t, big=big):
            if t.numel() >= B * T * V:
                big.append((t.untyped_storage().data_ptr(), t.numel()))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = weighted_token_loss(z, y, m, weighter="tldr")
        assert big and all(p == z.untyped_storage().data_ptr() for p, _ in big), (dtype, big)
        loss.backward()
    # the check can fail: a plain fp32 cross-entropy of bf16 logits saves a full fp32 copy
    big.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        torch.nn.functional.cross_entropy(z.float().view(-1, V), y.view(-1))
    assert any(p != z.untyped_storage().data_ptr() for p, _ in big)


# ------------------------------------------------------------------------------------------- objective
class _MeanLogitTerm(TokenLoss):
    """A test term (unregistered: no name): mean of the logits at counted tokens."""

    def loss(self, batch):
        return batch.logits[batch.mask].mean()


class _CETerm(TokenLoss):
    includes_ce = True

    def loss(self, batch):
        return 2.0 * batch.token_loss[batch.mask].mean()


def test_compute_token_objective_adds_weighted_terms_and_logs():
    z, y, m, _ = batch(seed=5)
    zr = z.clone().requires_grad_(True)
    term = _MeanLogitTerm()
    out = compute_token_objective(zr, y, m, "tldr", [(term, 0.5)])
    main = weighted_token_loss(z, y, m, weighter="tldr")
    assert out.loss.item() == pytest.approx(main.item() + 0.5 * z[m].mean().item(), abs=1e-5)
    assert set(out.logs) >= {
        "loss_ce",
        "loss_weighted",
        "loss__meanlogitterm",
        "kept_fraction",
        "weight_mean",
    }
    assert out.logs["loss_ce"].item() == pytest.approx(weighted_token_loss(z, y, m).item(), abs=1e-5)
    assert out.kept_fraction.item() == pytest.approx(1.0)
    out.loss.backward()
    # a term that includes the CE replaces the CE term
    o2 = compute_token_objective(z, y, m, token_losses=[_CETerm()])
    assert o2.loss.item() == pytest.approx(2 * o2.logs["loss_ce"].item(), abs=1e-5)
    with pytest.raises(ValueError, match="includes_ce"):
        compute_token_objective(z, y, m, "tldr", [_CETerm()])
    with pytest.raises(TypeError, match="token_losses"):
        compute_token_objective(z, y, m, token_losses=[3.0])


def test_nan_raise_names_skip_and_skip_returns_flag():
    z, y, m, _ = batch(seed=6)
    z[0, 0, 3] = float("nan")  # a counted position
    with pytest.raises(ValueError, match="nan='skip'"):
        token_loss(z, y, m)
    with pytest.raises(ValueError, match="NaN/inf at 1 counted"):
        weighted_token_loss(z, y, m)
    out = compute_token_objective(z.requires_grad_(True), y, m, nan="skip")
    assert out.skipped and out.loss.item() == 0.0 and not out.loss.requires_grad
    with pytest.raises(ValueError, match="nan must be"):
        compute_token_objective(z, y, m, nan="ignore")


# ------------------------------------------------------------------------------------------- errors
def test_bad_inputs_raise_clear_errors():
    z, y, m, _ = batch(seed=7)
    with pytest.raises(ValueError, match="disagree"):
        token_loss(z[:, :-1], y, m)
    with pytest.raises(ValueError, match="keeps no token"):
        token_loss(z, y, torch.zeros_like(m))
    with pytest.raises(ValueError, match="keeps no token"):
        weighted_token_loss(z, y, torch.zeros_like(m))
    bad = y.clone()
    bad[0, 0] = -100
    with pytest.raises(ValueError, match="outside the vocabulary"):
        token_loss(z, bad, m)
    bad[0, 0] = z.shape[-1]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        token_loss(z, bad, m)
    with pytest.raises(TypeError):
        token_loss(z, y.float(), m)
    with pytest.raises(TypeError):
        token_loss(z, y, m.float())
    with pytest.raises(ValueError, match="mask has shape"):
        token_loss(z, y, m[:, :2])
    with pytest.raises(ValueError, match="not both"):
        weighted_token_loss(z, y, m, torch.ones(m.shape), weighter="tldr")
    with pytest.raises(ValueError, match="weights has shape"):
        weighted_token_loss(z, y, m, torch.ones(2, 2))
    with pytest.raises(ValueError, match="reduction"):
        weighted_token_loss(z, y, m, reduction="mean")
    with pytest.raises(ValueError, match="normalize"):
        weighted_token_loss(z, y, m, normalize="sum")
    with pytest.raises(ValueError, match="weight 0"):
        weighted_token_loss(z, y, m, torch.zeros(m.shape), normalize="weights")
    w = torch.ones(m.shape)
    w[0, 0] = float("inf")
    with pytest.raises(ValueError, match="weights are NaN/inf"):
        weighted_token_loss(z, y, m, w)
    with pytest.raises(ValueError, match="unknown token weighter"):
        weighted_token_loss(z, y, m, weighter="nope")


# ------------------------------------------------------------------------------------------- property
@settings(max_examples=15, deadline=None)
@given(B=st.integers(1, 3), T=st.integers(2, 6), V=st.integers(2, 9), seed=st.integers(0, 10**6))
def test_token_mean_equals_torch_cross_entropy(B, T, V, seed):
    g = torch.Generator().manual_seed(seed)
    z = 4 * torch.randn(B, T, V, generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    m = torch.rand(B, T, generator=g) < 0.6
    m[0, 0] = True
    ref = torch.nn.functional.cross_entropy(z.double()[m], y[m])
    assert weighted_token_loss(z, y, m).item() == pytest.approx(ref.item(), abs=fp32_atol(16.0, V))
